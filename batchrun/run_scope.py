"""Whose settings and whose stop flag a shard runner obeys.

A worker process (``batchrun worker``, an RQ work horse) serves one fleet: its runners take the
process's worker settings (settings.set_worker_settings) and stop on the process's flag
(``PROCESS_STOP``, set by SIGTERM). The in-process workers of a ``batchrun run`` or a library call
serve that one run: their thread carries the run's scope (its settings, with its base URL and API
key, and its own stop flag), so two runs in one process (two threads, two asyncio tasks) each
send with their own key and a Ctrl-C or cancel of one does not stop the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from batchrun.settings import WorkerSettings, current_worker_settings

# Set when this process should stop taking jobs (SIGTERM in a work horse): runners without a run's
# scope finish their in-flight requests within the grace period and give back the rest.
PROCESS_STOP = threading.Event()


@dataclass(frozen=True)
class RunScope:
    """One run's in-process workers: the settings they send with and the flag that stops them."""
    settings: WorkerSettings = field(repr=False)  # holds the API key
    stop: threading.Event = field(default_factory=threading.Event)
    batch_id: str | None = None  # the run's batch: the only one its workers run shards of (None: any)

    def serves(self, batch_id: str) -> bool:
        """Whether a shard of ``batch_id`` is this scope's to run. Runs of one process share its
        in-process Redis (and so their rate budgets) and its one queue: a worker of one run that
        dequeues another run's shard must not send it with its own key, nor stop it with its stop."""
        return self.batch_id is None or self.batch_id == batch_id


_thread = threading.local()


def current_scope() -> RunScope:
    """The scope of the runner about to start on this thread: its run's, else the process's."""
    scope = getattr(_thread, "scope", None)
    return scope if scope is not None else RunScope(current_worker_settings(), PROCESS_STOP)


def serve(scope: RunScope, work: Callable[..., object], *args, **kwargs) -> Callable[[], None]:
    """A thread target: ``work(*args, **kwargs)`` with every shard it runs in ``scope``."""

    def target() -> None:
        _thread.scope = scope
        try:
            work(*args, **kwargs)
        finally:
            _thread.scope = None

    return target
