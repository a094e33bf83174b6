"""A local worker process of `run` on a real Redis: ``python -m batchrun.cli.local_worker MODE worker …``.

In "summaries" mode it shows warnings and the retry summaries, as the in-process worker does;
`run` prints pause messages itself, with the command that works from there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from batchrun.cli.main import main
from batchrun.ops.local_workers import RunLogFilter
from batchrun.runner.worker import watch_parent


def _main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    # `run` killed (SIGKILL, OOM): this worker must not go on sending its batch unwatched. It
    # stops as on SIGTERM (requests in flight get the grace, the rest stays queued), and a
    # rerun of the same command continues that batch.
    watch_parent(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM))
    if mode == "summaries":
        # The process runs quiet (-q: RQ's own lines too); only its worker logger says more.
        logging.getLogger("batchrun.worker").setLevel(logging.INFO)
    # At every verbosity: a pause line's `batchrun resume ID` is dropped, `run` prints the command itself.
    logging.getLogger("batchrun.worker").addFilter(RunLogFilter(quiet=mode == "summaries"))
    main(args=(["-v"] if mode == "verbose" else ["-q"]) + args, prog_name="batchrun")


if __name__ == "__main__":
    _main()
