"""Where a library run's words go: to the caller's handler, else to the "batchrun" logger; and
its progress bar (tqdm.auto: a widget in Jupyter, a bar on a terminal)."""

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


class EventKind(StoredText):
    RESULT = "result"  # the run's summary line
    WARNING = "warning"  # what the user must see: a pause, an interrupt, how to continue
    NOTE = "note"  # informational


class RunEvent(NamedTuple):
    kind: EventKind
    text: str


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

    def progress(self, store: BatchStore, batch_id: str, total: int) -> "TqdmProgress | NoProgress":
        return TqdmProgress(store, batch_id, total) if self.show_progress else NoProgress()


def _log_event(event: RunEvent) -> None:
    log.log(logging.WARNING if event.kind is EventKind.WARNING else logging.INFO, "%s", event.text)


class NoProgress:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """Jobs ended of the batch's total, read from Redis at most every BAR_REFRESH_SECONDS."""

    def __init__(self, store: BatchStore, batch_id: str, total: int):
        from tqdm.auto import tqdm

        self.store, self.batch_id = store, batch_id
        self.bar = tqdm(total=total, unit="job", desc=f"batch {batch_id}")
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar is None or (not force and now - self._last < BAR_REFRESH_SECONDS):
            return
        self._last = now
        try:
            counts = self.store.counts(self.batch_id)
        except Exception:  # Redis away: the bar waits, the run says what is wrong
            return
        self.bar.n = jobs_ended(counts)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()
            self.bar = None
