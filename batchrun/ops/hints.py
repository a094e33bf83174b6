"""Every command batchrun prints for the user to paste ("to finish the batch: …"), in one place.

A printed command must work as pasted in a fresh shell: it names the Redis the way the user
reached it (``--redis-url``, its password masked; or nothing, when it came from
``BATCHRUN_REDIS_URL`` or a config file, and then a note says so) and every option that matters.
Workers write pause messages into Redis with ``batchrun resume BATCH_ID`` in them (see
classify.BATCH_ID_PLACEHOLDER); ``complete`` turns those into the command that works from here.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from batchrun.state.connections import ENV_URL, is_memory
from batchrun.urls import MASK, mask_url


class RedisSource(enum.Enum):
    MEMORY = "memory"  # the in-process Redis: it ends with the process
    COMMAND_LINE = "command line"
    ENVIRONMENT = "environment"
    CONFIG = "config file"


@dataclass(frozen=True)
class RedisRef:
    """The Redis a command ran on, and how the user named it."""

    url: str
    source: RedisSource

    @classmethod
    def of(cls, url: str, source: RedisSource) -> RedisRef:
        return cls(url, RedisSource.MEMORY if is_memory(url) else source)

    @property
    def memory(self) -> bool:
        return self.source is RedisSource.MEMORY

    def args(self) -> list[str]:
        return ["--redis-url", mask_url(self.url)] if self.source is RedisSource.COMMAND_LINE else []

    def note(self) -> str | None:
        """What the user must add for the printed command to reach the same Redis, if anything."""
        if self.source is RedisSource.ENVIRONMENT:
            return f"(run it with {ENV_URL} set as it is now; it names the Redis)"
        if self.source is RedisSource.CONFIG:
            return "(run it with the same config file; it names the Redis)"
        if self.source is RedisSource.COMMAND_LINE and MASK in mask_url(self.url):
            return f"(put the Redis password back in place of {MASK}, or set {ENV_URL} and leave out --redis-url)"
        return None


_GIVEN: list[str] = []  # the options given before the command that every printed command repeats


def given_config(path: str | None) -> str | None:
    """``batchrun --config FILE …``: every command printed from now on names FILE too (its
    [[endpoints]] and option defaults: without them a pasted `run` sends elsewhere). Returns the
    path it replaces, for the caller to put back (None: none)."""
    before = _GIVEN[1] if _GIVEN else None
    _GIVEN[:] = ["--config", path] if path else []
    return before


def command(args: Sequence[str]) -> str:
    return "batchrun " + shlex.join([*_GIVEN, *args])


def resume_files(jobs: str, output: str, errors: str | None, redis: RedisRef, *, mock: bool,
                 extra: Sequence[str] = ()) -> list[str]:
    """Continue from the files, as a new batch (the Redis state is gone)."""
    args = ["resume", jobs, "-o", output]
    args += ["--errors", errors] if errors else []
    args += redis.args()
    args += ["--mock"] if mock else []
    return args + list(extra)


def rerun(jobs: str, output: str, errors: str | None, batch_id: str, redis: RedisRef, *, mock: bool,
          extra: Sequence[str] = ()) -> list[str]:
    """Run the same batch again on a real Redis: its local workers finish what is left."""
    args = ["run", jobs, "-o", output]
    args += ["--errors", errors] if errors else []
    args += ["--batch-id", batch_id, *redis.args()]
    args += ["--mock"] if mock else []
    return args + list(extra)


def resume_batch(batch_id: str, redis: RedisRef, extra: Sequence[str] = ()) -> list[str]:
    """Queue a batch's work again for the workers that serve its Redis."""
    return ["resume", batch_id, *extra, *redis.args()]


def worker(redis: RedisRef) -> list[str]:
    return ["worker", *redis.args()]


def unserved(batch_id: str, seconds: float, redis: RedisRef) -> str:
    """No worker took the batch's due work for a while: what to do about it."""
    line = (f"no worker has taken batch {batch_id}'s work for {seconds:.0f} s; start one with: "
            f"{command(worker(redis))} (it reads OPENAI_API_KEY from its environment)")
    note = redis.note()
    return f"{line} {note}" if note else line


# `batchrun resume ID` as workers write it, with the options it may carry.
_RESUME = re.compile(r"batchrun resume (?P<id>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extra>(?: --(?:max-cost USD|prices FILE))*)")


def complete(message: str, make: Callable[[str, list[str]], list[str]]) -> str:
    """``message`` with each ``batchrun resume ID [--max-cost USD] [--prices FILE]`` replaced by
    ``make(ID, options)``, the command that continues the batch from where the user is."""
    return _RESUME.sub(lambda m: command(make(m.group("id"), m.group("extra").split())), message)


# The same command as a phrase ("then run `batchrun resume ID`"), for wording that is no command.
_RESUME_PHRASE = re.compile(r"(?:(?P<verb>\b[Rr]un )?`)?" + _RESUME.pattern + "`?")


def complete_words(message: str, words: Callable[[str, list[str]], str]) -> str:
    """``message`` with each ``run `batchrun resume ID …``` phrase replaced by ``words(ID, options)``,
    what to do instead (the library's: a call to make again), and the CLI's option names in
    Python's (``--max-cost`` is ``max_cost``)."""
    def sub(m: re.Match) -> str:
        text = words(m.group("id"), m.group("extra").split())
        return text[:1].upper() + text[1:] if (m.group("verb") or "").startswith("R") else text

    return _RESUME_PHRASE.sub(sub, message).replace("--max-cost", "max_cost").replace("--prices", "prices")


def has_command(message: str) -> bool:
    return _RESUME.search(message) is not None
