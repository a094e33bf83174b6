"""The progress display of ``run``: a bar on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time

import redis
from tqdm import tqdm

from batchrun.ops.endpoints import day_phrases, endpoint_pace_phrase
from batchrun.ops.status import batch_status, describe_conditions, eta_phrase, pace
from batchrun.state.jobcounts import jobs_ended
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.text import format_usd

PLAIN_EVERY = 5.0  # seconds between lines when output is not a terminal
REFRESH = 1.0  # seconds between reads of the batch's status


QUIET = False  # -q (set by the command line): only warnings and errors, so no banner, note or progress line


def quiet() -> bool:
    return QUIET


def note(message: str) -> None:
    """An informational line on stderr, unless -q."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, store: BatchStore, batch_id: str, *, total: int, stream=None):
        self.store = store
        self.batch_id = batch_id
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = total
        self._last = 0.0
        self._last_plain = 0.0
        self._closed = quiet()  # -q: nothing to show, now or at the end
        self._initial: int | None = None
        self.bar = None if self._closed else tqdm(total=total, unit="job", file=self.stream, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]") \
            if self.tty else None

    def update(self, force: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last < REFRESH:
            return
        self._last = now
        try:
            st = batch_status(self.store, self.batch_id)
        except (redis.ConnectionError, redis.TimeoutError, LookupError):
            return  # the display waits; collecting carries on (or says what is wrong)
        j = st["jobs"]
        ended = jobs_ended(j)
        if self._initial is None:  # jobs ended before this display began (a run continued) are no rate
            self._initial = ended
            if self.bar is not None:
                self.bar.initial = ended  # tqdm's rate is (n - initial) / elapsed
        if self.bar is not None:
            self.bar.total = j["total"]
            self.bar.n = ended
            self.bar.set_postfix_str(summary(st, short=True), refresh=False)
            self.bar.refresh()
        elif force or now - self._last_plain >= PLAIN_EVERY or ended >= j["total"]:
            self._last_plain = now
            print(f"progress: {ended}/{j['total']} jobs ended ({j['done']} done, {j['failed']} failed); "
                  + summary(st, short=False), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self.update(force=True)  # the last word: where the batch ended
        self._closed = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summary(st: dict, *, short: bool) -> str:
    """Pace against the limits, ETA, retries waiting and cost, from a `batch_status`."""
    j, cost = st["jobs"], st["cost"]
    if st["state"] == BatchState.CANCELLED:
        parts = [f"{j['queued'] + j['waiting_retry']} not sent (cancelled)", f"{j['in_flight']} in flight"]
    else:
        parts = [f"{j['queued']} queued", f"{j['in_flight']} in flight", f"{j['waiting_retry']} waiting to retry"]
    if not short:
        parts.append(f"{st['last_minute']['jobs_per_second']:.1f} jobs/s")
    for m in st["models"]:
        parts.append(f"{m['model']} " + " ".join(pace(m)))
    parts += [endpoint_pace_phrase(e) for e in st.get("endpoints") or []]  # [[endpoints]] only
    parts += day_phrases(st.get("endpoints") or [])
    eta = eta_phrase(st)
    if eta:
        parts.append(eta)
    money = f"{format_usd(cost['spent_usd'])}"
    if cost["max_cost_usd"]:
        money += f" of {format_usd(cost['max_cost_usd'])} cap"
    parts.append(money)
    if st.get("cache", {}).get("hits"):
        parts.append(f"{st['cache']['hits']:,} from the cache ({format_usd(st['cache']['saved_usd'])} saved)")
    held = describe_conditions(st["fleet"])
    if held:
        parts.append(held)
    return ", ".join(parts)
