"""``batchrun.run`` and its kin: the library face of the run `batchrun run` is (api/batch.py).

The run goes on a thread of its own and its results are read back from the output files as
they land: the same files, resume and cap as the command, and a caller's thread (a notebook's,
with its event loop) that stays free to take Ctrl-C and stop the run gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
import gc
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from batchrun.api.batch import DEFAULT_ENDPOINT, RunConfig, RunEnd, run_batch
from batchrun.api.continuing import library_call, reword
from batchrun.api.errors import RequestsError
from batchrun.api.events import EventHandler, LoggedOutput
from batchrun.api.filetail import FileTail
from batchrun.api.requests import batch_lines, ids_of_file
from batchrun.api.results import Result, from_line, not_run
from batchrun.api.wording import in_python_words
from batchrun.endpoints import CONFIG_ENV
from batchrun.ops import hints
from batchrun.ops.collect import default_errors_path
from batchrun.policy.pricing import PriceTable
from batchrun.settings import BatchOptions, Limits
from batchrun.state.connections import connect, is_memory, resolve_url
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

# How often the caller's thread reads the new lines (and looks at an arun cancel): each read wakes
# it, and its turn at the GIL is taken from the sending thread. The end of the run and a Ctrl-C
# are seen at once, whatever this is.
POLL_SECONDS = 0.2


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C stopped the run gracefully: what finished is in ``results`` (the rest are
    ``not_run``), and the message says how to continue."""

    def __init__(self, message: str, results: list[Result] | None = None):
        super().__init__(message)
        self.results = results or []


@dataclass
class RunOptions:
    """``run``'s options, as the CLI's (see `batchrun run --help`)."""
    model: str | None = None
    endpoint: str = DEFAULT_ENDPOINT
    tpm: int | str | dict | None = None  # 2_000_000, "gpt-4o-mini=2000000", or {"gpt-4o-mini": 2_000_000}
    rpm: int | str | dict | None = None
    max_cost: float = 0.0
    max_attempts: int = 10
    cache: bool = True  # False: --no-cache (every request sent, none stored)
    refresh: bool = False  # send again what the cache holds, store the new answers
    cache_ttl: float = 0.0  # days a stored answer serves; 0: the batch's keep-days
    cache_max_mb: float = 512.0  # the response cache's size bound
    redis_url: str | None = None  # default: BATCHRUN_REDIS_URL, else the in-process Redis
    base_url: str | None = None  # default: OPENAI_BASE_URL
    api_key: str | None = None  # default: OPENAI_API_KEY; never stored
    concurrency: int | None = None
    processes: int = 1
    batch_id: str | None = None
    output: str | None = None  # keep the results file (and resume from it); default: a temporary one
    errors: str | None = None
    prices: str | None = None
    grace: float = 30.0
    skip_invalid: bool = False
    priority: str | float = "normal"  # high, normal, low or a weight: its share of a shared fleet and budget
    via: str = "live"  # "batch-api": through OpenAI's Batch API (half price, within 24 hours)
    resend_via: str = "live"  # where lines a remote batch expired or failed go again
    deadline: float = 0.0  # seconds; with via="auto": live what the budget carries by then, the rest via the Batch API
    progress: bool = True
    on_event: EventHandler | None = None  # each line the run says; default: the "batchrun" logger


def _options(options: dict) -> RunOptions:
    """``options`` as RunOptions; a misspelt keyword is named with the one meant (a TypeError, as
    Python says it of any function's keyword)."""
    known = [f.name for f in dataclasses.fields(RunOptions)]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}=?" if close else f"; the options are {', '.join(known)}"
            raise TypeError(f"batchrun got an unexpected keyword argument {name!r}{hint}")
    return RunOptions(**options)


def stream(requests: Iterable[dict] | str | os.PathLike, **options) -> Iterator[Result]:
    """Run ``requests`` and yield each Result as it ends (not in input order); the requests the
    batch does not get to (paused, cap) come last, as ``not_run`` results saying why."""
    return _stream(requests, _options(options))


def _stream(requests, opts: RunOptions, cancel: threading.Event | None = None) -> Iterator[Result]:
    with tempfile.TemporaryDirectory(prefix="batchrun-") as tmp:
        cfg, ids = _config(requests, opts, tmp)
        yield from _run_and_read(cfg, ids, opts, cancel)


def run(requests: Iterable[dict] | str | os.PathLike, **options) -> list[Result]:
    """Run ``requests`` (Batch API lines or bare request bodies, or a JSONL path) and return one
    Result per request, in input order. A failed request is a Result with ``ok`` False."""
    return _run(requests, _options(options))


def _run(requests, opts: RunOptions, cancel: threading.Event | None = None) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="batchrun-") as tmp:
        cfg, ids = _config(requests, opts, tmp)
        got: dict[str, Result] = {}
        try:
            for result in _run_and_read(cfg, ids, opts, cancel):
                got[result.custom_id] = result
        except Interrupted as exc:
            exc.results = _in_order(ids, got, str(exc))
            raise
    return _in_order(ids, got, "the run did not get to it")


def complete(prompts: Iterable[str], model: str, system: str | None = None, max_tokens: int | None = None,
             body: dict | None = None, **options) -> list[str | None]:
    """One chat completion per prompt; the answers' texts in order, None where a request failed."""
    def request(prompt: str) -> dict:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                   [{"role": "user", "content": prompt}]
        return {"model": model, "messages": messages, **({"max_tokens": max_tokens} if max_tokens is not None else {}),
                **(body or {})}

    if isinstance(prompts, str):  # iterating it would send one request per character
        raise RequestsError("prompts is a str; pass a list of strings, e.g. [prompt]")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestsError(f"prompt {index} is of type {type(prompt).__name__}, not a str; pass a list of strings")
    options.setdefault("endpoint", DEFAULT_ENDPOINT)
    return [r.text if r.ok else None for r in run([request(p) for p in prompts], **options)]


async def astream(requests: Iterable[dict] | str | os.PathLike, **options) -> AsyncIterator[Result]:
    """``stream`` for asyncio code: the run goes on its own thread, the event loop stays free."""
    cancel = threading.Event()
    results = _stream(requests, _options(options), cancel)
    done = object()
    waiting: asyncio.Future | None = None
    try:
        while True:
            # Shielded: a cancelled task leaves the thread inside the generator, which cannot be
            # closed until that thread is out of it (ValueError: generator already executing).
            waiting = asyncio.ensure_future(asyncio.to_thread(next, results, done))
            result = await asyncio.shield(waiting)
            waiting = None
            if result is done:
                return
            yield result
    finally:
        # A cancelled task, a break, a closed generator: stop the run as Ctrl-C would (the thread
        # in next() sees the flag within POLL_SECONDS), wait for it to be out, then close.
        cancel.set()
        if waiting is not None:
            with contextlib.suppress(BaseException):  # Interrupted: the stop asked for
                await waiting
        await asyncio.to_thread(results.close)


async def arun(requests: Iterable[dict] | str | os.PathLike, **options) -> list[Result]:
    """``run`` for asyncio code (``await batchrun.arun(...)``). Cancelling the task stops the run
    as Ctrl-C does (requests in flight finish and are kept), and returns once it has stopped."""
    cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(_run, requests,
                                                                                 _options(options), cancel))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):  # Interrupted: the stop the cancel asked for
            await future
        raise


def _config(requests, opts: RunOptions, tmp: str) -> tuple[RunConfig, list[str]]:
    with in_python_words():
        return _config_checked(requests, opts, tmp)


def _config_checked(requests, opts: RunOptions, tmp: str) -> tuple[RunConfig, list[str]]:
    _check_iterable(requests)
    if isinstance(requests, (str, os.PathLike)):
        jobs = os.fspath(requests)
        ids = ids_of_file(jobs)
    else:
        jobs = ""  # no file: ops/submit.py's submit_requests validates and loads them as they are
        lines = batch_lines(requests, endpoint=opts.endpoint, model=opts.model)
        ids = [line["custom_id"] for line in lines]
    options = BatchOptions(max_attempts=opts.max_attempts, max_cost=opts.max_cost,
                           limits=Limits.parse(_specs(opts.rpm), _specs(opts.tpm)), priority=str(opts.priority),
                           via=opts.via, resend_via=opts.resend_via, deadline_seconds=opts.deadline,
                           cache=1 if opts.cache else 0, cache_refresh=time.time() if opts.refresh else 0.0,
                           cache_ttl_days=opts.cache_ttl, cache_max_mb=opts.cache_max_mb)
    cfg = RunConfig(jobs=jobs, output=opts.output or os.path.join(tmp, "results.jsonl"), errors=opts.errors,
                    redis_url=resolve_url(opts.redis_url), batch_id=opts.batch_id, endpoint=opts.endpoint,
                    skip_invalid=opts.skip_invalid, options=options, concurrency=opts.concurrency,
                    processes=opts.processes, mock=False, grace=opts.grace, prices=opts.prices,
                    base_url=opts.base_url, api_key=opts.api_key, library=True,
                    output_kept=opts.output is not None, requests=None if jobs else lines)
    problems = options.problems()
    if opts.refresh and not opts.cache:
        problems.append("refresh=True stores new answers in the response cache, which cache=False bypasses: "
                        "give one of them")
    config = os.environ.get(CONFIG_ENV, "").strip()
    if config and not os.path.isfile(config):  # the CLI refuses it too: its [[endpoints]] must not be ignored
        problems.append(f"{CONFIG_ENV} names {config}, which is not a file: fix the path, or unset "
                        f"{CONFIG_ENV} to send to the one endpoint of base_url= / OPENAI_BASE_URL")
    if opts.processes > 1 and is_memory(cfg.redis_url):  # the CLI's check_run, in the library's words
        problems.append(f"processes={opts.processes} needs a shared Redis (redis_url=, or BATCHRUN_REDIS_URL): "
                        f"without one the run keeps its Redis inside this process, with one in-process worker")
    if problems:
        from batchrun.settings import OptionsError

        raise OptionsError("; ".join(problems))
    return cfg, ids


def _check_iterable(requests: object) -> None:
    if isinstance(requests, dict):  # one body: iterating it would give its keys
        raise RequestsError("requests is a dict (one request?); pass a list of request bodies (dicts), "
                            "e.g. [body], or a JSONL path")
    if not isinstance(requests, (str, os.PathLike)) and not hasattr(requests, "__iter__"):
        raise RequestsError(f"requests is of type {type(requests).__name__}; pass a list of request bodies (dicts) "
                            f"or a JSONL path")


def _specs(limit: int | str | dict | None) -> list[str]:
    if limit is None:
        return []
    if isinstance(limit, dict):
        return [f"{model}={n}" for model, n in limit.items()]
    return [str(limit)]


class _RunThread(threading.Thread):
    """The run on its own thread; ``stop`` asks it to stop as a Ctrl-C does."""

    def __init__(self, cfg: RunConfig, opts: RunOptions):
        super().__init__(name="batchrun-run", daemon=True)
        self.cfg, self.opts = cfg, opts
        self.stop = threading.Event()
        self.end: RunEnd | None = None
        self.error: BaseException | None = None
        # Set as the run ends. Not is_alive(): a Ctrl-C inside Thread.join can leave it False
        # for a thread still running (CPython's join is not safe to interrupt).
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            with in_python_words():
                self.end = run_batch(self.cfg, LoggedOutput(self.opts.on_event, progress=self.opts.progress),
                                     stop_requested=self.stop.is_set)
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc
        if self.end is not None and is_memory(self.cfg.redis_url):
            # No later call can reach this batch (its outcomes are in the files): its keys would
            # only fill this process's memory.
            BatchStore(connect(self.cfg.redis_url)).purge(self.end.batch_id)
        self.finished.set()


_frozen_runs = 0  # library runs under way in this process, while the objects before the first are frozen
_freeze_lock = threading.Lock()


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """While runs go, the objects that existed before the first (the caller's requests among them:
    200,000 objects for 20,000 bodies) are left out of the garbage collector's passes (gc.freeze),
    and put back as the last run ends (gc.unfreeze). Scanning them again at each full collection
    made a 20,000-job run a third slower than `batchrun run` on the same file (bench/api_overhead.py)."""
    global _frozen_runs
    with _freeze_lock:
        if _frozen_runs == 0:
            gc.freeze()
        _frozen_runs += 1
    try:
        yield
    finally:
        with _freeze_lock:
            _frozen_runs -= 1
            if _frozen_runs == 0:
                gc.unfreeze()


def _run_and_read(cfg: RunConfig, ids: list[str], opts: RunOptions,
                  cancel: threading.Event | None = None) -> Iterator[Result]:
    # Several runs may go at once (threads, asyncio tasks): each has its own workers, settings and
    # stop flag (run_scope.py).
    with _gc_frozen():
        yield from _run_and_read_frozen(cfg, ids, opts, cancel)


def _run_and_read_frozen(cfg: RunConfig, ids: list[str], opts: RunOptions,
                         cancel: threading.Event | None) -> Iterator[Result]:
    prices = PriceTable.load(opts.prices)
    tails = [FileTail(cfg.output), FileTail(cfg.errors or default_errors_path(cfg.output))]
    seen: set[str] = set()
    thread = _RunThread(cfg, opts)
    thread.start()
    interrupted = False
    try:
        while True:
            try:
                alive = not thread.finished.is_set()
                for tail in tails:
                    for line in tail.new_lines():
                        if line.get("custom_id") not in seen:
                            seen.add(line["custom_id"])
                            yield from_line(line, prices)
                if not alive:
                    break
                if cancel is not None and cancel.is_set():
                    thread.stop.set()  # arun's task was cancelled: stop as on Ctrl-C
                thread.finished.wait(POLL_SECONDS)
            except KeyboardInterrupt:
                if interrupted:
                    raise  # a second Ctrl-C: stop waiting at once (the run's thread winds down alone)
                interrupted = True
                thread.stop.set()
    except GeneratorExit:
        thread.stop.set()
        thread.finished.wait()
        raise
    if thread.error is not None:
        raise thread.error
    end = thread.end
    why = _why_not_run(cfg, end)
    if end is not None and end.interrupted:
        raise Interrupted(f"batchrun: interrupted; {why}")
    for cid in ids:
        if cid not in seen:
            seen.add(cid)
            yield not_run(cid, why)


def _why_not_run(cfg: RunConfig, end: RunEnd | None) -> str:
    """For the requests without an outcome: where the batch stopped and how to continue it, in
    Python's words (continuing.library_call)."""
    if end is None:
        return "the run ended without an outcome for it"
    reason = reword(cfg, end.reason, end.batch_id) if end.reason else ""
    if end.state is BatchState.PAUSED:
        where = f"batch {end.batch_id} is paused: {reason or 'see the log'}"
    elif end.interrupted:
        where = f"batch {end.batch_id} was stopped with requests left"  # the Interrupted's message
    else:
        where = f"batch {end.batch_id} is {end.state} with work left"
    if hints.has_command(end.reason or ""):
        return where  # the reason says how to continue already
    capped = "max-cost" in (end.reason or "")
    return f"{where}; to continue, {library_call(cfg, end.batch_id, ['--max-cost', 'USD'] if capped else [])}"


def _in_order(ids: list[str], got: dict[str, Result], why: str) -> list[Result]:
    return [got.get(cid) or not_run(cid, why) for cid in ids]
