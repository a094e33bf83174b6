"""RQ settings for ``rq worker -c workers.settings`` from a checkout: see batchrun.runner.rq_settings."""

from batchrun.runner.rq_settings import *  # noqa: F401,F403
