"""RQ settings for ``rq worker -c workers.settings`` from a checkout: see batchrun.runner.rq_settings."""

from batchrun.runner.rq_settings import QUEUES, REDIS_URL

__all__ = ["QUEUES", "REDIS_URL"]  # read by rq, by name
