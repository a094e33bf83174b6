"""Watching batches: `collect` (write their outcomes), `status` (one batch) and `list` (recent ones)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from batchrun.cli.helpers import fail, open_store, source_of
from batchrun.cli.options import Number, redis_option
from batchrun.ops import hints
from batchrun.text import format_usd
from batchrun.state.states import BatchState


@click.command()
@click.argument("batch_id")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@click.option("--errors", type=click.Path(dir_okay=False), default=None, help="Errors JSONL (default: OUTPUT.errors.jsonl).")
@click.option("--follow", is_flag=True, help="Keep writing until the batch is finished.")
@redis_option
@click.pass_context
def collect(ctx, batch_id, output, errors, follow, redis_url):
    """Append BATCH_ID's results (and errors) that the files do not hold yet.

    Exit codes: 0 finished, 3 finished with errors, 4 not finished (paused, cancelled, or
    running without --follow), 1 an error, 2 a usage error.
    """
    from contextlib import nullcontext

    from batchrun.ops.collect import collect as do_collect, default_errors_path
    from batchrun.files.outputs import check_writable
    from batchrun.ops.progress import Progress

    store, url = open_store(redis_url)
    where = hints.RedisRef.of(url, source_of(ctx))
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis")
    errors = errors or default_errors_path(output)
    for path in (output, errors):
        check_writable(path)
    shown = Progress(store, batch_id, total=int(store.meta(batch_id).get("total", 0))) if follow else nullcontext()
    with shown as progress:
        report = do_collect(store, batch_id, output, errors, follow=follow,
                            on_note=lambda m: click.echo(m, err=True),
                            on_progress=_FollowNotes(store, batch_id, where, progress) if follow else None)
    _print_collected(store, batch_id, output, errors, report, where, follow)


class _FollowNotes:
    """`collect --follow`'s notes as it polls: a pause (once per reason) and a batch no worker serves."""

    def __init__(self, store, batch_id: str, where: hints.RedisRef, progress):
        from batchrun.ops.collect import UNSERVED_AFTER, UnservedWatch

        self.store, self.batch_id, self.where, self.progress = store, batch_id, where, progress
        self.watch = UnservedWatch(after=float(os.environ.get("BATCHRUN_UNSERVED_SECONDS") or UNSERVED_AFTER))
        self.told_paused, self.last_count = "", 0.0

    def say(self, message: str) -> None:
        if self.progress is not None and getattr(self.progress, "bar", None) is not None:
            self.progress.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)

    def __call__(self, report) -> None:
        import redis

        self.progress.update()
        try:  # Redis going away is waited out by collect, which says so: these notes wait too
            if report.state == BatchState.PAUSED:
                reason = self.store.meta(self.batch_id).get("reason") or ""
                if reason != self.told_paused:
                    self.told_paused = reason
                    self.say(f"batch {self.batch_id} is paused: "
                             + hints.complete(reason, lambda bid, extra: hints.resume_batch(bid, self.where, extra)))
            if time.monotonic() - self.last_count >= 2:  # counting costs a few Redis calls: not every poll
                self.last_count = time.monotonic()
                idle = self.watch.update(self.store.counts(self.batch_id))
                if idle is not None:
                    self.say(hints.unserved(self.batch_id, idle, self.where))
        except (redis.ConnectionError, redis.TimeoutError):
            return


def _print_collected(store, batch_id: str, output: str, errors: str, report, where: hints.RedisRef,
                     follow: bool) -> None:
    """What collect wrote, what continues from here; exits with the batch's exit code."""
    from batchrun.exitcodes import for_state
    from batchrun.ops.collect import default_errors_path

    click.echo(f"{report.results_written} result(s) written to {output}, {report.errors_written} error(s) to {errors}"
               + (f"; {report.already_there} were already there" if report.already_there else "")
               + f"; batch is {report.state}")
    if report.other_there:
        click.echo(f"{report.other_there} outcome(s) of batch {batch_id} were not written: the files already hold "
                   f"another outcome for their custom_id (from another batch?); collect into another file to keep "
                   f"them", err=True)
    meta = store.meta(batch_id)
    if meta.get("state") == BatchState.PAUSED and not follow:
        click.echo(f"batch {batch_id} is paused: " + hints.complete(
            meta.get("reason") or "", lambda bid, extra: hints.resume_batch(bid, where, extra)), err=True)
    elif meta.get("state") not in (BatchState.FINISHED, BatchState.CANCELLED) and not follow:  # exit 4: what continues
        args = ["collect", batch_id, "-o", output] + (["--errors", errors] if errors != default_errors_path(output)
                                                      else []) + where.args() + ["--follow"]
        click.echo(f"batch {batch_id} is still running; follow it with: {hints.command(args)}"
                   + (f" {where.note()}" if where.note() else ""), err=True)
    sys.exit(for_state(meta.get("state", ""), int(meta.get("failed") or 0)))


@click.command()
@click.argument("batch_id")
@redis_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fields documented in the README).")
@click.option("--watch", is_flag=True, help="Refresh every few seconds until the batch ends (Ctrl-C to stop watching).")
@click.option("--every", type=Number(0.2), default=2.0, show_default=True, help="Seconds between refreshes.")
@click.pass_context
def status(ctx, batch_id, redis_url, as_json, watch, every):
    """Where BATCH_ID's jobs are, its pace against the limits, its ETA and its cost."""
    from batchrun.ops.collect import unserved_for
    from batchrun.ops.status import batch_status, describe as describe_status

    store, url = open_store(redis_url)
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                data = batch_status(store, batch_id)
            except LookupError as exc:
                fail(str(exc))
            if as_json:
                click.echo(json.dumps(data))
            else:
                if watch and tty:
                    click.clear()
                where = hints.RedisRef.of(url, source_of(ctx))
                if data["reason"]:  # its command, as it works from here
                    data["reason"] = hints.complete(data["reason"],
                                                    lambda bid, extra: hints.resume_batch(bid, where, extra))
                click.echo("\n".join(describe_status(data)))
                idle = unserved_for(data)
                if idle is not None:
                    click.echo("  " + hints.unserved(batch_id, idle, where))
            if not watch or data["state"] in (BatchState.FINISHED, BatchState.CANCELLED):
                return
            time.sleep(every)
    except KeyboardInterrupt:  # stops watching; the batch goes on
        return


@click.command(name="list")
@redis_option
@click.option("-n", "--limit", type=click.IntRange(1), default=20, show_default=True, help="How many batches.")
def list_batches(redis_url, limit):
    """Recent batches, newest first, one line each."""
    store, _ = open_store(redis_url)
    ids = store.recent_batches(limit)
    if not ids:
        click.echo("no batch on this Redis")
    from batchrun.ops.priority import share_view
    from batchrun.state.fairshare import FairShare

    running = FairShare(store).running()
    for bid in ids:
        m = store.meta(bid)
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(m.get("created", 0) or 0)))
        cost = float(m.get("cost", 0) or 0)
        click.echo(f"{bid}  {created}  {m.get('state', '?'):9}  {m.get('done', 0)}/{m.get('total', 0)} done, "
                   f"{m.get('failed', 0)} failed, {format_usd(cost)}  {share_view(store, bid, running).short()}  "
                   f"{m.get('source', '')}")
