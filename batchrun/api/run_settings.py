"""The settings file beside a run's output (``OUT.batchrun.json``): what `resume JOBS -o OUT`
repeats, and what each batch of the file spent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchrun.api.batch import RunConfig
    from batchrun.state.store import BatchStore


def settings_path(output: str) -> str:
    """The file beside OUT that keeps a run's settings, so that `resume JOBS -o OUT` repeats them."""
    p = Path(output)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return str(p.with_name(stem + ".batchrun.json"))


def save_run_settings(cfg: RunConfig, path: str, batch_id: str | None = None) -> dict:
    """Write the settings a resume repeats (never the Redis URL nor any key: they may hold secrets)."""
    previous = load_run_settings(path) if cfg.only_missing else None
    saved = {
        "jobs": cfg.jobs, "endpoint": cfg.endpoint, "skip_invalid": cfg.skip_invalid,
        "options": cfg.options.to_fields(), "concurrency": cfg.concurrency, "processes": cfg.processes,
        "grace": cfg.grace, "mock": cfg.mock, "prices": cfg.prices,
        "max_cost_total": cfg.options.max_cost if cfg.cap_total is None else cfg.cap_total,
        # USD each batch of this file spent: a resume's cap is what the first run's cap leaves.
        "spent_usd": dict((previous or {}).get("spent_usd") or {}),
    }
    if batch_id and not cfg.redis.memory:
        saved["batch_id"] = batch_id  # the batch a rerun of this command continues
    _write_json(path, saved)
    return saved


def load_run_settings(path: str) -> dict | None:
    from batchrun.files.outputs import OutputFileError

    try:
        with open(path) as f:
            text = f.read()
        if not text.strip():
            return None  # made empty by the check that the path is writable
        data = json.loads(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OutputFileError(f"{path}: cannot read the first run's settings ({exc}); "
                              f"remove it and give the options again") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise OutputFileError(f"{path}: not a batchrun settings file; remove it and give the options again")
    return data


def record_spent(path: str, saved: dict, bid: str, store: BatchStore) -> None:
    import redis

    try:
        saved["spent_usd"][bid] = float(store.meta(bid).get("cost") or 0)
    except (redis.ConnectionError, redis.TimeoutError):
        return  # Redis is gone: the next run counts from what it knows
    _write_json(path, saved)


def spent_usd(saved: dict) -> float:
    return sum(float(v) for v in (saved.get("spent_usd") or {}).values())


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # whole or not at all


