"""Counting the tiktoken tokens of many texts fast, for ``ops.estimate``.

Counting tokens is most of an estimate's work (tiktoken encodes ~30 MB of text per second on
one core). ``TextCounter`` takes the texts a request walk yields and hands them to tiktoken in
chunks: deduplicated per chunk, with texts that repeat (system prompts, tool definitions, role
names) remembered, and, for large files, encoded in worker processes (``start_pool``) while the
reader keeps reading. Threads would not help: each of the many short encode calls has to win
the GIL back from the reader.
"""

from __future__ import annotations

import logging
import multiprocessing
import operator
import os
import signal
import sys
import threading
from collections import Counter, deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor

import tiktoken

__all__ = ["PARALLEL_MIN_BYTES", "TextCounter", "count_tokens", "fork_is_safe", "start_pool"]

log = logging.getLogger("batchrun.estimate")

#: Files at least this large are counted with worker processes (below it, the reader alone
#: finishes in about a quarter of a second).
PARALLEL_MIN_BYTES = 4 * 1024 * 1024
# Characters of text gathered before a chunk goes to tiktoken: ~30 ms of encoding, small
# enough to keep the workers busy, large enough that chunk overhead does not show.
CHUNK_CHARS = 1_000_000
# Repeated texts remembered per encoding, so a file of unique prompts cannot grow it unbounded.
_KNOWN_TEXTS = 10_000


def count_tokens(encoding_name: str, texts: list[str]) -> list[int]:
    """Tokens of each text, as estimate_tokens counts them (``encode_ordinary``). Top-level so
    that worker processes can run it."""
    encode = tiktoken.get_encoding(encoding_name).encode_ordinary
    return [len(encode(text)) for text in texts]


class TextCounter:
    """Sums tiktoken tokens of texts per model, in chunks, in worker processes if given a pool."""

    def __init__(self, pool: Executor | None, workers: int):
        self._pool = pool
        self._max_in_flight = 2 * workers + 2  # chunks sent but not counted yet: bounds memory
        self.tokens: Counter = Counter()  # model -> text tokens counted so far
        self._pending: dict[str, dict[str, int]] = {}  # model -> text -> times seen in this chunk
        self._pending_chars = 0
        self._encodings: dict[str, str] = {}  # model -> encoding name
        self._known: dict[str, dict[str, int]] = {}  # encoding -> repeated text -> tokens
        self._in_flight: deque[tuple[Future, str, str, list[str], list[int]]] = deque()

    def add(self, model: str, encoding: str, texts: list[str]) -> None:
        known = self._known.get(encoding)
        if known is None:
            known = self._known[encoding] = {}
        pending = self._pending.get(model)
        if pending is None:
            pending = self._pending[model] = {}
            self._encodings[model] = encoding
        counted = 0
        for text in texts:
            tokens = known.get(text)
            if tokens is None:
                pending[text] = pending.get(text, 0) + 1
                self._pending_chars += len(text)
            else:
                counted += tokens
        if counted:
            self.tokens[model] += counted
        if self._pending_chars >= CHUNK_CHARS:
            self._send()

    def finish(self) -> Counter:
        """Count what is left and wait for every chunk; returns model -> text tokens."""
        self._send()
        while self._in_flight:
            self._settle_oldest()
        return self.tokens

    def _send(self) -> None:
        for model, pending in self._pending.items():
            if not pending:
                continue
            encoding = self._encodings[model]
            texts, times = list(pending), list(pending.values())
            future = self._submit(encoding, texts)
            if future is None:
                self._settle(model, encoding, texts, times, count_tokens(encoding, texts))
            else:
                self._in_flight.append((future, model, encoding, texts, times))
        self._pending = {}
        self._pending_chars = 0
        while len(self._in_flight) > self._max_in_flight:
            self._settle_oldest()

    def _submit(self, encoding: str, texts: list[str]) -> Future | None:
        if self._pool is None:
            return None
        try:
            return self._pool.submit(count_tokens, encoding, texts)
        except Exception as exc:  # a broken or shut-down pool: count here instead
            self._give_up_pool(exc)
            return None

    def _settle_oldest(self) -> None:
        future, model, encoding, texts, times = self._in_flight.popleft()
        try:
            counts = future.result()
        except Exception as exc:  # a worker died (killed, out of memory): same count, here
            self._give_up_pool(exc)
            counts = count_tokens(encoding, texts)
        self._settle(model, encoding, texts, times, counts)

    def _settle(self, model: str, encoding: str, texts: list[str], times: list[int], counts: list[int]) -> None:
        self.tokens[model] += sum(map(operator.mul, counts, times))
        # A text seen twice in one chunk (a system prompt, a role name) will likely come again.
        known = self._known[encoding]
        for text, seen, tokens in zip(texts, times, counts):
            if seen > 1 and len(known) < _KNOWN_TEXTS:
                known[text] = tokens

    def _give_up_pool(self, exc: Exception) -> None:
        if self._pool is not None:
            log.warning("token-counting workers failed (%s: %s); counting in this process",
                        type(exc).__name__, exc)
            self._pool = None


def start_pool(path: str, workers: int | None) -> tuple[Executor | None, int]:
    """(pool, number of workers), or (None, 0) to count in this process.

    Workers are forked, and only on Linux from a process with no other thread: forking a
    threaded process can deadlock the child, and "spawn"/"forkserver" would run the caller's
    main module again in every worker (an unguarded script would estimate itself over and
    over). A forked worker also inherits the loaded encodings instead of reading them again.
    """
    if workers is None:
        try:
            large = os.path.getsize(path) >= PARALLEL_MIN_BYTES
        except OSError:
            large = False
        cores = os.cpu_count() or 1
        workers = cores if large and cores > 1 else 0  # on one core a worker only takes turns with the reader
    if workers <= 0:
        return None, 0
    if not fork_is_safe():
        log.debug("counting tokens in this process (no safe way to start workers here)")
        return None, 0
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_ignore_interrupts)
        return pool, workers
    except (OSError, ValueError) as exc:  # e.g. no /dev/shm in a sandbox
        log.info("cannot start token-counting processes (%s); counting in this process", exc)
        return None, 0


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the reader handles it and shuts the pool down,
    # so the workers need not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fork_is_safe() -> bool:
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    )

