"""The base of the enums whose values are stored as text (in Redis, in JSON output)."""

from __future__ import annotations

from enum import Enum


class StoredText(str, Enum):
    """A ``str`` enum: a value read back compares equal to its member, and ``__str__``/``__format__``
    give the bare value, so f-strings and JSON stay the same on every Python from 3.10 (whose
    ``format()`` of a mixed-in enum differs from 3.12's)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, text: object):
        """The member stored as ``text`` (bytes or str), or None for nothing or an unknown value."""
        if isinstance(text, bytes):
            text = text.decode()
        try:
            return cls(text)
        except ValueError:
            return None
