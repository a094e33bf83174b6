"""What a run says and does about a batch it continues: an existing batch made ready, the batch an
earlier run of the same command made, and the command that continues a stopped run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchrun.api.run_settings import load_run_settings, settings_path
from batchrun.ops import hints
from batchrun.ops.resume import paused_at_cap, set_cap
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

if TYPE_CHECKING:
    from batchrun.api.batch import RunConfig, RunOutput

DEFAULT_ENDPOINT = "/v1/chat/completions"


def prepare_existing(store: BatchStore, cfg: RunConfig, skip: set[str]) -> None:
    """`run --batch-id ID` on a batch that exists: it continues that batch."""
    bid = cfg.batch_id
    meta = store.meta(bid)
    other_id = "call the same run with another batch_id=" if cfg.library else "run the file under another --batch-id"
    if meta.get("state") == BatchState.CANCELLED:
        raise ValueError(f"batch {bid} was cancelled; {other_id} (the jobs {cfg.output} holds are not sent again)")
    pending = _pending_in_batch(store, bid, skip)
    if pending:
        collect = ("give another output=" if cfg.library else f"collect batch {bid} into another file instead")
        raise ValueError(f"batch {bid} still has {len(pending)} job(s) to send whose custom_id {cfg.output} or its "
                         f"errors file already holds (e.g. {sorted(pending)[0]!r}): their answers would be paid "
                         f"for and then dropped; {collect}, or {other_id}")
    _apply_new_cap(store, bid, cfg.options.max_cost)
    meta = store.meta(bid)
    if meta.get("state") == BatchState.PAUSED:
        if paused_at_cap(meta):
            raise ValueError(f"batch {bid} is paused at its spending cap; give a higher one with "
                             f"{'max_cost=' if cfg.library else '--max-cost USD'}")
        store.resume(bid)  # a pause for the account (quota, key): the user runs it again once fixed


def _pending_in_batch(store: BatchStore, bid: str, ids: set[str]) -> set[str]:
    """Those of ``ids`` that batch ``bid`` holds and has not ended: they would be sent."""
    from batchrun.state import keys

    pending: set[str] = set()
    listed = list(ids)
    for i in range(0, len(listed), 1000):
        chunk = listed[i:i + 1000]
        found = store.redis.hmget(keys.sub(bid, "req"), chunk)
        pending.update(cid for cid, req in zip(chunk, found) if req is not None)
    return pending


def _apply_new_cap(store: BatchStore, bid: str, max_cost: float) -> None:
    """`run --batch-id ID --max-cost N` on a batch that exists: N becomes its cap, and a batch
    paused at its old cap runs again."""
    meta = store.meta(bid)
    if not max_cost or float(meta.get("max_cost") or 0) == max_cost:
        return
    set_cap(store, bid, max_cost)  # CapTooLow (a ValueError) when it would pause the batch again at once
    if paused_at_cap(meta):
        store.resume(bid)


def batch_to_continue(cfg: RunConfig, sidecar: str, store: BatchStore, out: RunOutput) -> str | None:
    """The batch an earlier `run` of this file onto this output made on this Redis, if it is still
    there: a rerun of the same command (after a crash, a kill) continues it."""
    if cfg.redis.memory:
        return None  # the in-process Redis died with that run
    saved = load_run_settings(sidecar) or {}
    bid = saved.get("batch_id")
    if not isinstance(bid, str) or saved.get("jobs") != cfg.jobs or not store.exists(bid):
        return None
    if store.meta(bid).get("state") == BatchState.CANCELLED:
        return None
    out.note(f"continuing batch {bid}, which the earlier run of this command made ({sidecar} names it)")
    return bid


def continue_command(cfg: RunConfig, bid: str, extra: list[str]) -> list[str]:
    """The command that continues this run where it stopped, as the user can paste it."""
    if cfg.redis.memory:
        # The in-process Redis is gone with this process: continue from the files, whose
        # sidecar keeps this run's settings.
        return hints.resume_files(cfg.jobs, cfg.output, cfg.errors, cfg.redis, mock=cfg.mock, extra=extra)
    kept: list[str] = []
    if cfg.endpoint != DEFAULT_ENDPOINT:
        kept += ["--endpoint", cfg.endpoint]
    if cfg.skip_invalid:
        kept += ["--skip-invalid"]
    if cfg.processes != 1:
        kept += ["--processes", str(cfg.processes)]
    if cfg.concurrency:
        kept += ["--concurrency", str(cfg.concurrency)]
    return hints.rerun(cfg.jobs, cfg.output, cfg.errors, bid, cfg.redis, mock=cfg.mock, extra=kept + extra)


def library_call(cfg: RunConfig, bid: str, extra: list[str]) -> str:
    """What continues this run from Python (the library's wording of ``continue_command``): the
    same call again, with ``batch_id=`` on a real Redis or ``output=`` on the in-process one."""
    more = (" and a higher max_cost=" if "--max-cost" in extra else "") + \
           (" and prices= a price file that names the model" if "--prices" in extra else "")
    if not cfg.redis.memory:
        return f"call the same run again with batch_id={bid!r}{more}"
    if cfg.output_kept:
        return f"call the same run again with output={cfg.output!r}{more}: what it holds is not sent again"
    return ("run again only the requests whose result is not_run" + more.replace(" and ", " with ", 1)
            + " (or give output=PATH, and a rerun with it sends only what that file lacks)")


def reword(cfg: RunConfig, message: str, bid: str | None = None) -> str:
    """A message with `batchrun resume ID` in it (a pause reason, a worker's line), with what
    continues the run from where the user is: the command for the CLI, the call for the library."""
    if cfg.library:
        return hints.complete_words(message, lambda found, extra: library_call(cfg, bid or found, extra))
    return hints.complete(message, lambda found, extra: continue_command(cfg, bid or found, extra))


def print_resume(cfg: RunConfig, bid: str, out: RunOutput, store: BatchStore | None = None) -> None:
    """The exact command that continues where this run stopped."""
    meta = store.meta(bid) if store is not None else {}
    capped = paused_at_cap(meta)
    if cfg.library:
        out.warn(f"to finish the batch: {library_call(cfg, bid, ['--max-cost', 'USD'] if capped else [])}")
        if capped and cfg.redis.memory:
            out.warn(f"(the next call's max_cost counts from zero: this run spent "
                     f"${float(meta.get('cost') or 0):.4f})")
        elif capped:
            out.warn("(give a max_cost above the old one: it caps the batch as a whole)")
        return
    command = continue_command(cfg, bid, ["--max-cost", "USD"] if capped else [])
    out.warn(f"to finish the batch: {hints.command(command)}")
    note = cfg.redis.note()
    if note:
        out.warn(note)
    if cfg.redis.memory:
        out.warn(f"(it reuses this run's settings, which {settings_path(cfg.output)} keeps)")
        if capped:
            out.warn(f"(the resumed run's cap counts from zero: this run spent "
                     f"${float(meta.get('cost') or 0):.4f})")
    elif capped:
        out.warn("(give a cap above the old one)")

