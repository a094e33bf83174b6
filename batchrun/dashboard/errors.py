"""Errors grouped by code, each with a sample message and the batches it came from, read from
the batches' outcome lists (``…:results``) as they grow: each refresh looks only at what was added
since the last one (at most READ_PER_REFRESH outcomes per batch, filtered in Redis so that only
error lines travel), so a long batch costs no more than a short one. A batch first seen with many
outcomes is read from its last FIRST_LOOK."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from batchrun.state.counters import error_outcomes
from batchrun.state.store import BatchStore

FIRST_LOOK = 2000  # a batch seen for the first time: its last this many outcomes
READ_PER_REFRESH = 2000  # outcomes read per batch and refresh at most
SAMPLE_CHARS = 300
MAX_GROUPS = 100  # codes past this many are counted as "other"


@dataclass
class ErrorGroup:
    code: str
    count: int = 0
    sample: str = ""
    sample_custom_id: str = ""
    status_code: int | None = None
    batches: dict[str, int] = field(default_factory=dict)  # batch_id -> errors of this code

    def to_dict(self) -> dict:
        return {"code": self.code, "count": self.count, "sample_message": self.sample,
                "sample_custom_id": self.sample_custom_id, "status_code": self.status_code,
                "batches": dict(sorted(self.batches.items(), key=lambda kv: -kv[1]))}


class ErrorTally:
    def __init__(self) -> None:
        self._read: dict[str, int] = {}  # batch_id -> outcomes read so far (index in its list)
        self._groups: dict[str, ErrorGroup] = {}
        self.skipped: dict[str, int] = {}  # batch_id -> outcomes before the first look (not read)

    def refresh(self, store: BatchStore, batch_ids: list[str]) -> None:
        for batch_id in batch_ids:
            asked = self._read.get(batch_id)
            got = error_outcomes(store, batch_id, asked, READ_PER_REFRESH, FIRST_LOOK)
            if got.start != asked:  # new to us, or purged and made again
                self.skipped[batch_id] = got.start
                self._forget(batch_id)
            for raw in got.lines:
                self._add(batch_id, raw)
            self._read[batch_id] = got.next

    def known(self) -> list[str]:
        """The batches tallied so far."""
        return list(self._read)

    def drop(self, batch_ids: list[str]) -> None:
        """Forget batches (purged or expired ones): their errors leave the groups."""
        for batch_id in batch_ids:
            self._forget(batch_id)
            self._read.pop(batch_id, None)
            self.skipped.pop(batch_id, None)

    def _forget(self, batch_id: str) -> None:
        for group in self._groups.values():
            group.count -= group.batches.pop(batch_id, 0)
        self._groups = {code: g for code, g in self._groups.items() if g.count > 0}

    def _add(self, batch_id: str, raw: bytes) -> None:
        try:
            line = json.loads(raw)
            error = line.get("error") or {}
            code, message = str(error.get("code") or "unknown"), str(error.get("message") or "")
        except (ValueError, AttributeError):
            code, message, line = "unreadable", "an error line that is not JSON", {}
        if code not in self._groups and len(self._groups) >= MAX_GROUPS:
            code = "other"  # a server inventing codes does not grow this without bound
        group = self._groups.setdefault(code, ErrorGroup(code))
        group.count += 1
        group.batches[batch_id] = group.batches.get(batch_id, 0) + 1
        if not group.sample:
            group.sample = message[:SAMPLE_CHARS]
            group.sample_custom_id = str(line.get("custom_id") or "")
            response = line.get("response") if isinstance(line.get("response"), dict) else {}
            group.status_code = response.get("status_code") if isinstance(response.get("status_code"), int) else None

    def groups(self, batch_id: str | None = None) -> list[dict]:
        """The groups, the most frequent first (only ``batch_id``'s errors, when given)."""
        out = []
        for group in sorted(self._groups.values(), key=lambda g: (-g.count, g.code)):
            d = group.to_dict()
            if batch_id is not None:
                if batch_id not in group.batches:
                    continue
                d["count"], d["batches"] = group.batches[batch_id], {batch_id: group.batches[batch_id]}
            out.append(d)
        return out
