"""What `run` checks about its files before it submits: that it can write them, and which
jobs they hold already."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from collections.abc import Callable

if TYPE_CHECKING:
    from batchrun.api.batch import RunConfig


def check_paths(cfg: RunConfig, errors_path: str, sidecar: str) -> None:
    from batchrun.files.outputs import OutputFileError, check_writable

    named = ({"output=": cfg.output, "errors=": errors_path} if cfg.library else
             {"-o": cfg.output, "--errors": errors_path})
    named["the settings file"] = sidecar
    jobs = os.path.realpath(cfg.jobs) if cfg.jobs else None  # None: the library's requests, no file
    seen: dict[str, str] = {}
    for what, path in named.items():
        real = os.path.realpath(path)
        if jobs is not None and (real == jobs or same_file(path, cfg.jobs)):  # samefile: a hard link too
            raise OutputFileError(f"{what} {path} is the jobs file itself; write the results to another file "
                                  f"(nothing was submitted)")
        if real in seen:
            raise OutputFileError(f"{what} {path} is also {seen[real]}; give them different files "
                                  f"(nothing was submitted)")
        seen[real] = f"{what} {path}"
        try:
            check_writable(path)
        except OutputFileError as exc:
            raise OutputFileError(f"{exc}; nothing was submitted") from None


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist (yet)


def held(output: str, errors_path: str) -> str:
    """After a resume from the files, which already held earlier runs' lines: what they hold now."""
    from batchrun.files.outputs import iter_custom_ids

    results, errors = (sum(1 for _ in iter_custom_ids(p)) if os.path.exists(p) else 0 for p in (output, errors_path))
    return f"; the files now hold {results} result(s) and {errors} error(s) in all"


def already_done(cfg: RunConfig, errors_path: str, note: Callable[[str], None]) -> tuple[set[str], int]:
    """custom_ids the output files hold (results, and errors unless they are to be retried),
    and how many of them are errors."""
    from pathlib import Path

    from batchrun.files.outputs import read_custom_ids, repair_truncated_tail

    for path in (cfg.output, errors_path):
        repaired = repair_truncated_tail(path) if Path(path).exists() else None
        if repaired:
            note(repaired)
    done = read_custom_ids(cfg.output)
    failed: set[str] = set()
    if cfg.retry_failed and Path(errors_path).exists() and Path(errors_path).stat().st_size:
        kept = f"{errors_path}.previous"
        os.replace(errors_path, kept)  # their new outcome goes to a fresh errors file
        note(f"the errors of the previous run are sent again; the old errors file is now {kept}")
    else:
        failed = read_custom_ids(errors_path) - done
    return done | failed, len(failed)
