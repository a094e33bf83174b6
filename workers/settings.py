"""RQ settings for running batchrun's shard jobs with the plain ``rq`` command.

    export BATCHRUN_REDIS_URL=redis://redis-host:6379/0 OPENAI_API_KEY=sk-...
    rq worker -c workers.settings -S json -w batchrun.worker.BatchWorker

``-S json``: batchrun enqueues with RQ's JSON serializer, never pickle.
``-w batchrun.worker.BatchWorker``: idle workers then also give back a dead
worker's jobs and wake shards whose retries are due (a plain ``rq.Worker``
runs shards too, but leaves that housekeeping to busy batchrun runners).
The API key and base URL are read from the environment by each job, never
from Redis. ``batchrun worker`` does the same with fewer flags.
"""

import os

REDIS_URL = os.environ.get("BATCHRUN_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUES = ["batchrun"]
