"""RQ settings for running batchrun's shard jobs with the plain ``rq`` command.

    export BATCHRUN_REDIS_URL=redis://redis-host:6379/0 OPENAI_API_KEY=sk-...
    rq worker -c workers.settings -S json -w batchrun.runner.worker.BatchWorker

``-S json``: batchrun enqueues with RQ's JSON serializer, never pickle.
``-w batchrun.runner.worker.BatchWorker``: it runs only batchrun's own jobs (any other
job in Redis is refused, not run), and idle workers also give back a dead
worker's jobs and wake shards whose retries are due. A plain ``rq.Worker``
would run whatever function a job in Redis names: do not use it.
The API key and base URL are read from the environment by each job, never
from Redis. ``batchrun worker`` does the same with fewer flags.
"""

import os

REDIS_URL = os.environ.get("BATCHRUN_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUES = ["batchrun"]
