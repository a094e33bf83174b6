"""New whole lines of a results or errors file as the run appends them."""

from __future__ import annotations

import json


class FileTail:
    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.pending = b""

    def new_lines(self) -> list[dict]:
        """The JSON objects of the lines completed since the last call (none if no file yet)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.pending + data
        whole, _, self.pending = data.rpartition(b"\n")
        lines = []
        for raw in whole.split(b"\n") if whole else ():
            if raw.strip():
                obj = json.loads(raw)
                if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
                    lines.append(obj)
        return lines
