"""Where a library run's words go: to the caller's handler, else to the "batchrun" logger; and
its progress: a bar (tqdm.auto: a widget in Jupyter, a bar on a terminal) and, every
PROGRESS_EVERY_SECONDS, a ``progress`` event: the line `run` prints (pace per model and, with
[[endpoints]], per endpoint, with any endpoint's spent day), and `status --json`'s dict as
``event.status``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from batchrun.enums import StoredText
from batchrun.state.jobcounts import jobs_ended
from batchrun.state.store import BatchStore

log = logging.getLogger("batchrun")

BAR_REFRESH_SECONDS = 0.5
PROGRESS_EVERY_SECONDS = 5.0  # as `run`'s plain progress line


class EventKind(StoredText):
    RESULT = "result"  # the run's summary line
    WARNING = "warning"  # what the user must see: a pause, an interrupt, how to continue
    NOTE = "note"  # informational
    PROGRESS = "progress"  # where the batch is: its text is `run`'s progress line, its status `status --json`


class _KindAndText(NamedTuple):
    kind: EventKind
    text: str


class RunEvent(_KindAndText):
    """What a run says: (kind, text), a pair as before (``kind, text = event`` still works), and
    ``status`` for progress events: the batch's status (`batchrun status --json`'s fields)."""

    status: dict | None

    def __new__(cls, kind: EventKind, text: str, status: dict | None = None):
        event = super().__new__(cls, kind, text)
        event.status = status
        return event


EventHandler = Callable[[RunEvent], None]


class LoggedOutput:
    """A RunOutput (api/batch.py) for library callers: nothing printed."""

    def __init__(self, on_event: EventHandler | None = None, *, progress: bool = True):
        self.on_event = on_event or _log_event
        self.show_progress = progress

    def result(self, line: str) -> None:
        self.on_event(RunEvent(EventKind.RESULT, line))

    def warn(self, line: str) -> None:
        self.on_event(RunEvent(EventKind.WARNING, line.strip()))

    def note(self, line: str) -> None:
        self.on_event(RunEvent(EventKind.NOTE, line))

    def progress(self, store: BatchStore, batch_id: str, total: int) -> "TqdmProgress":
        # (to the logger, progress events are DEBUG lines: not read at all unless those are shown)
        quiet = self.on_event is _log_event and not log.isEnabledFor(logging.DEBUG)
        return TqdmProgress(store, batch_id, total, bar=self.show_progress, on_event=None if quiet else self.on_event)


_LEVELS = {EventKind.WARNING: logging.WARNING, EventKind.PROGRESS: logging.DEBUG}


def _log_event(event: RunEvent) -> None:
    log.log(_LEVELS.get(event.kind, logging.INFO), "%s", event.text)


class NoProgress:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """Jobs ended of the batch's total, read from Redis at most every BAR_REFRESH_SECONDS (with
    ``bar``); and a progress event every PROGRESS_EVERY_SECONDS (with ``on_event``)."""

    def __init__(self, store: BatchStore, batch_id: str, total: int, *, bar: bool = True,
                 on_event: EventHandler | None = None):
        self.store, self.batch_id = store, batch_id
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="job", desc=f"batch {batch_id}")
        self.on_event = on_event
        self._last = 0.0
        self._last_event = time.monotonic()  # the first after PROGRESS_EVERY_SECONDS, as `run`'s line
        self._closed = False

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._closed:
            return
        if self.on_event is not None and now - self._last_event >= PROGRESS_EVERY_SECONDS:
            self._last_event = now
            self._progress_event()
        if self.bar is None or (not force and now - self._last < BAR_REFRESH_SECONDS):
            return
        self._last = now
        try:
            counts = self.store.counts(self.batch_id)
        except Exception:  # Redis away: the bar waits, the run says what is wrong
            return
        self.bar.n = jobs_ended(counts)
        self.bar.refresh()

    def _progress_event(self) -> None:
        from batchrun.ops.progress import summary
        from batchrun.ops.status import batch_status

        try:
            st = batch_status(self.store, self.batch_id)
        except Exception:  # Redis away: no event this time; the run says what is wrong
            return
        j = st["jobs"]
        text = (f"progress: {jobs_ended(j)}/{j['total']} jobs ended ({j['done']} done, {j['failed']} failed); "
                + summary(st, short=False))
        if self.bar is not None:
            self.bar.set_postfix_str(summary(st, short=True), refresh=False)
        self.on_event(RunEvent(EventKind.PROGRESS, text, st))

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()
            self.bar = None
        self._closed = True
