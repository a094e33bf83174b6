"""``batchrun run``: the library's run (batchrun.api.batch) with its words printed and its end
as the exit code."""

from __future__ import annotations

import click

from batchrun.api.batch import DEFAULT_ENDPOINT, RunConfig, RunOutput, run_batch as run_library_batch
from batchrun.api.errors import ApiKeyMissing
# The settings file's functions live in api/run_settings; these names stay importable from here.
from batchrun.api.run_settings import (load_run_settings,  # noqa: F401
                                       settings_path, spent_usd)
from batchrun.ops import hints
from batchrun.ops.progress import Progress, note
from batchrun.settings import BatchOptions
from batchrun.state.store import BatchStore

__all__ = ["DEFAULT_ENDPOINT", "RunConfig", "resume_config", "run_batch"]


class PrintedOutput(RunOutput):
    """The run's words on the terminal: the summary on stdout, the rest on stderr (notes unless -q)."""

    def result(self, line: str) -> None:
        click.echo(line)

    def warn(self, line: str) -> None:
        click.echo(line, err=True)

    def note(self, line: str) -> None:
        note(line)

    def progress(self, store: BatchStore, batch_id: str, total: int) -> Progress:
        return Progress(store, batch_id, total=total)


def run_batch(cfg: RunConfig) -> int:
    """Run the batch, printing as it goes; returns the exit code."""
    try:
        return run_library_batch(cfg, PrintedOutput()).exit_code
    except ApiKeyMissing as exc:
        raise click.ClickException(str(exc)) from None


def resume_config(jobs: str, output: str, errors: str | None, given: dict, *, max_cost: float | None,
                  prices: str | None, mock: bool, concurrency: int | None, grace: float, retry_failed: bool,
                  redis_url: str, redis_source: hints.RedisSource) -> tuple[RunConfig, str]:
    """`resume JOBS -o OUT`: the first run's settings (from OUT's settings file), with what the
    user gives now over them. Returns the config and the settings it took from the file, as
    options, for the user to see."""
    from batchrun.settings import Limits, OptionsError

    saved = load_run_settings(settings_path(output)) or {}
    options = BatchOptions.from_fields(saved["options"]) if saved else BatchOptions()
    before = BatchOptions.from_fields(options.to_fields())
    used: list[str] = []
    if given.get("rpm") or given.get("tpm"):
        try:
            options.limits = Limits.parse(given.get("rpm") or (), given.get("tpm") or ())
        except ValueError as exc:  # a bad value on the command line: a usage error
            raise OptionsError(str(exc)) from None
    elif options.limits:
        used += [f"--{kind} {model + '=' if model != '*' else ''}{n}"
                 for model, entry in sorted(options.limits.by_model.items()) for kind, n in sorted(entry.items())]
    for name in ("max_attempts", "backoff_base", "backoff_cap", "burst_seconds", "give_up_seconds"):
        if given.get(name) is not None:
            setattr(options, name, given[name])
        elif getattr(before, name) != getattr(BatchOptions(), name):
            option = "--give-up-after" if name == "give_up_seconds" else f"--{name.replace('_', '-')}"
            used.append(f"{option} {getattr(before, name)}")

    def pick(name: str, value, default):
        if value not in (None, False):
            return value
        if saved.get(name) not in (None, False) and saved.get(name) != default:
            used.append(f"--{name.replace('_', '-')}" + ("" if saved[name] is True else f" {saved[name]}"))
            return saved[name]
        return default

    endpoint = pick("endpoint", given.get("endpoint"), DEFAULT_ENDPOINT)
    skip_invalid = pick("skip_invalid", given.get("skip_invalid"), False)
    processes = pick("processes", given.get("processes"), 1)
    concurrency = pick("concurrency", concurrency, None)
    mock = pick("mock", mock, False)
    prices = pick("prices", prices, None)
    # The cap holds over every run of the file: a resume may spend what the earlier runs left.
    spent = spent_usd(saved)
    total = float(saved.get("max_cost_total") or 0)
    if max_cost is not None:
        options.max_cost, cap_total = max_cost, (spent + max_cost if max_cost else 0.0)
    elif total:
        if total - spent <= 0:
            raise ValueError(f"the first run's --max-cost of ${total:.4f} is spent (${spent:.4f}); "
                             f"give this run a cap of its own with --max-cost USD")
        options.max_cost, cap_total = total - spent, total
        used.append(f"--max-cost {total - spent:.6f} (what is left of the first run's ${total:.4f})")
    else:
        options.max_cost, cap_total = 0.0, 0.0
    problems = options.problems()
    if problems:  # refused before anything is saved or submitted; a bad stored value is the file's
        stored = set(before.problems())
        mine = [p for p in problems if p not in stored]
        theirs = [p for p in problems if p in stored]
        raise OptionsError("; ".join(mine + ([f"{settings_path(output)} (the first run's settings) holds values "
                                              f"that cannot work: {'; '.join(theirs)}; give new ones here or "
                                              f"remove the file"] if theirs else [])))
    cfg = RunConfig(jobs=jobs, output=output, errors=errors, redis_url=redis_url, batch_id=None, endpoint=endpoint,
                    skip_invalid=skip_invalid, options=options, concurrency=concurrency, processes=processes,
                    mock=mock, grace=grace, only_missing=True, retry_failed=retry_failed, prices=prices,
                    redis_source=redis_source, cap_total=cap_total)
    return cfg, ", ".join(used)

