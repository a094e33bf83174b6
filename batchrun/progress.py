"""The progress display of ``run``: a bar on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from batchrun.store import BatchStore

PLAIN_EVERY = 5.0  # seconds between lines when output is not a terminal


class Progress:
    def __init__(self, store: BatchStore, batch_id: str, *, total: int, stream=None):
        self.store = store
        self.batch_id = batch_id
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = total
        self._last = 0.0
        self._last_plain = 0.0
        self._started = time.monotonic()
        self.bar = tqdm(total=total, unit="job", file=self.stream, dynamic_ncols=True) if self.tty else None

    def update(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        c = self.store.counts(self.batch_id)
        ended = c["done"] + c["failed"]
        held = describe_conditions(self.store.fleet_conditions())
        if self.bar is not None:
            self.bar.total = c["total"]
            self.bar.n = ended
            self.bar.set_postfix_str(f"{c['failed']} failed, {c['in_flight']} in flight, "
                                     f"{c['waiting_retry']} waiting to retry" + (f"; {held}" if held else ""),
                                     refresh=False)
            self.bar.refresh()
        elif now - self._last_plain >= PLAIN_EVERY or ended >= c["total"]:
            self._last_plain = now
            rate = ended / max(now - self._started, 1e-9)
            print(f"progress: {ended}/{c['total']} jobs ended ({c['done']} done, {c['failed']} failed), "
                  f"{c['in_flight']} in flight, {c['waiting_retry']} waiting to retry, {rate:.0f} jobs/s"
                  + (f"; {held}" if held else ""),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_conditions(conditions: dict[str, list[dict]]) -> str:
    """'circuit open for http://…/v1 (4.2 s left); rate limited (gpt-4o-mini): cooling down 1.3 s'."""
    parts = [f"circuit open for {c['endpoint']} ({c['seconds_left']:.1f} s left)" for c in conditions["circuits"]]
    parts += [f"rate limited ({c['model']}): cooling down {c['seconds_left']:.1f} s" for c in conditions["cooldowns"]]
    return "; ".join(parts)
