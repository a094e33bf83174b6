"""RQ settings for running batchrun's shard jobs with the plain ``rq`` command.

    export BATCHRUN_REDIS_URL=redis://redis-host:6379/0 OPENAI_API_KEY=sk-...
    rq worker -c batchrun.runner.rq_settings -S json -w batchrun.runner.worker.BatchWorker

Installed with the package, so the command works wherever batchrun is pip-installed (a
checkout's ``workers.settings`` re-exports this module).

``-S json``: batchrun enqueues with RQ's JSON serializer, never pickle.
``-w batchrun.runner.worker.BatchWorker``: it runs only batchrun's own jobs (any other
job in Redis is refused, not run), and idle workers also give back a dead
worker's jobs and wake shards whose retries are due. A plain ``rq.Worker``
would run whatever function a job in Redis names: do not use it.
The API key and base URL are read from the environment by each job, never
from Redis. ``batchrun worker`` does the same with fewer flags.
"""

import os

from batchrun.state.connections import ENV_URL
from batchrun.state.keys import QUEUE

__all__ = ["REDIS_URL", "QUEUES"]

REDIS_URL = os.environ.get(ENV_URL, "redis://127.0.0.1:6379/0")
QUEUES = [QUEUE]
