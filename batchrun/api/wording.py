"""A sentence about the command line's options, said in Python's words: ``--max-cost USD`` is
``max_cost=``, ``--tpm MODEL=N`` is ``tpm={MODEL: N}``. The checks below the API (settings.py's
option problems, a limit that does not parse) speak of options as the user types them; a library
caller passes keywords, and must read the keyword to fix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

# Longest first: "--max-cost USD" before "--max-cost". Only the options batchrun.run takes.
_IN_PYTHON = (
    ("--rpm/--tpm MODEL=N", "rpm=/tpm= {MODEL: N}"),
    ("--max-cost USD", "max_cost="),
    ("--prices FILE", "prices=PATH"),
    ("--batch-id ID", "batch_id="),
    ("--concurrency (or BATCHRUN_CONCURRENCY)", "concurrency= (or BATCHRUN_CONCURRENCY)"),
    ("--skip-invalid", "skip_invalid=True"),
)
_FLAG = re.compile(r"(?<![\w-])--(max-cost|max-attempts|batch-id|prices|concurrency|grace|tpm|rpm|errors|processes)"
                   r"(?![\w-])")
_FLAG_VALUE = re.compile(r"(?<![\w-])--(max-cost|max-attempts|concurrency|grace|tpm|rpm|processes) (\d[\d.,]*)(?![\w.])")
_KEYWORD = {"max-cost": "max_cost", "max-attempts": "max_attempts", "batch-id": "batch_id", "prices": "prices",
            "concurrency": "concurrency", "grace": "grace", "tpm": "tpm", "rpm": "rpm", "errors": "errors",
            "processes": "processes"}


def in_python(message: str) -> str:
    """``message`` with each command-line option batchrun.run also takes named as its keyword."""
    for flag, keyword in _IN_PYTHON:
        message = message.replace(flag, keyword)
    message = _FLAG_VALUE.sub(lambda m: f"{_KEYWORD[m.group(1)]}={m.group(2)}", message)  # "--tpm 100": "tpm=100"
    return _FLAG.sub(lambda m: _KEYWORD[m.group(1)] + "=", message)


@contextmanager
def in_python_words(library: bool = True) -> Iterator[None]:
    """Raise the refusals from below (a bad option, a bad line, a batch that cannot continue) with
    their options named as keywords, as the same class."""
    if not library:
        yield
        return
    from batchrun.files.jobfile import JobFileError
    from batchrun.settings import OptionsError

    try:
        yield
    except JobFileError as exc:
        headline, _, _ = str(exc).partition("\n")
        raise JobFileError(exc.errors, headline=in_python(headline)) from None
    except (OptionsError, ValueError) as exc:
        if type(exc) not in (OptionsError, ValueError):
            raise  # its own class, with fields of its own: its words are batchrun's already
        raise type(exc)(in_python(str(exc))) from None
