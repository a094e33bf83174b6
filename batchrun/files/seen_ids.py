"""A record of the custom_ids seen, in a few bytes per id whatever its length (job files and
results files can hold tens of millions of lines)."""

from __future__ import annotations

import struct
from array import array
from hashlib import blake2b

__all__ = ["SeenIds"]

_two_words = struct.Struct("<QQ").unpack  # a 16-byte digest as two 64-bit integers


class SeenIds:
    """custom_id -> line of its first appearance, in 24 bytes per slot whatever the id's length.

    A dict[str, int] costs about 130 bytes per short id (a str object, an int object, the dict
    entry): over 1 GB for a 10-million-line file. Instead, each id is reduced to a 128-bit
    BLAKE2b digest (two different ids collide with odds of about 1e-20 even at a billion ids)
    and kept in an open-addressing hash table made of three flat arrays of 64-bit integers (the
    digest's two halves and the line), so no Python object exists per id. ``add`` is written
    out in one function, with integers compared rather than byte slices: it runs once per line.
    """

    def __init__(self, capacity: int = 1024):
        self._allocate(max(8, 1 << (max(1, capacity) - 1).bit_length()))

    def _allocate(self, capacity: int) -> None:
        self._capacity = capacity  # a power of two, so `& mask` picks a slot
        self._mask = capacity - 1
        self._lo = array("Q", bytes(8 * capacity))  # low 64 bits of the digest
        self._hi = array("Q", bytes(8 * capacity))  # high 64 bits
        self._lines = array("Q", bytes(8 * capacity))  # 0 marks an empty slot: lines start at 1
        self._count = 0
        self._limit = 2 * capacity // 3  # past 2/3 full, probe chains get long

    def __len__(self) -> int:
        return self._count

    def add(self, custom_id: str, line_no: int) -> int | None:
        """Record custom_id as seen on line_no; if it was seen before, return that line instead."""
        # surrogatepass: JSON can spell lone surrogates ("\ud800"), which strict UTF-8 refuses.
        lo, hi = _two_words(blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        los, his, lines = self._lo, self._hi, self._lines
        slot = lo & self._mask
        while True:
            first = lines[slot]
            if not first:
                break
            if los[slot] == lo and his[slot] == hi:
                return first
            slot = (slot + 1) & self._mask
        los[slot], his[slot], lines[slot] = lo, hi, line_no
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return None

    def _grow(self) -> None:
        old = zip(self._lo, self._hi, self._lines)
        count = self._count
        self._allocate(2 * self._capacity)
        mask, los, his, lines = self._mask, self._lo, self._hi, self._lines
        for lo, hi, line_no in old:
            if line_no:
                slot = lo & mask
                while lines[slot]:
                    slot = (slot + 1) & mask
                los[slot], his[slot], lines[slot] = lo, hi, line_no
        self._count = count
