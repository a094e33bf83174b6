"""The requests given to ``batchrun.run`` as the job file a run reads, and their custom_ids in
input order (the order the results come back in).

Dicts are not written to a file: ``batch_lines`` makes them Batch API lines and ops/submit.py's
``submit_requests`` checks each as a line of a job file is checked (the same sentences, naming the
request's index), before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from batchrun.api.errors import RequestsError

BATCH_KEYS = ("custom_id", "method", "url", "body")


def write_job_file(requests: Iterable[object], path: str, *, endpoint: str, model: str | None) -> list[str]:
    """Write ``requests`` (Batch API lines or bare request bodies) to ``path`` as Batch API lines;
    returns their custom_ids in order. A bare body's custom_id is its index (``"0"``, ``"1"``, …),
    or its ``metadata.custom_id``, as in a job file."""
    ids: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for index, request in enumerate(requests):
            line = _batch_line(request, index, endpoint=endpoint, model=model)
            ids.append(line["custom_id"])
            f.write(json.dumps(line, ensure_ascii=False))
            f.write("\n")
    if not ids:
        raise RequestsError("no requests were given; pass a list of request bodies (dicts) or a JSONL path")
    return ids


def batch_lines(requests: Iterable[object], *, endpoint: str, model: str | None) -> list[dict]:
    """``requests`` (Batch API lines or bare request bodies) as Batch API lines, in order, each with
    its custom_id as ``write_job_file`` gives it: what ops/submit.py's submit_requests takes."""
    lines = [_batch_line(request, index, endpoint=endpoint, model=model) for index, request in enumerate(requests)]
    if not lines:
        raise RequestsError("no requests were given; pass a list of request bodies (dicts) or a JSONL path")
    return lines


def _batch_line(request: object, index: int, *, endpoint: str, model: str | None) -> dict:
    if not isinstance(request, dict):
        raise RequestsError(f"request {index} is a {type(request).__name__}, not a dict (a Batch API line "
                            f"or a request body)")
    if any(key in request for key in BATCH_KEYS):
        line = {"method": "POST", "url": endpoint, **request}
        body = line.get("body")
        if "custom_id" not in line:
            line["custom_id"] = str(index)
    else:
        body = dict(request)
        metadata = body.pop("metadata", None)
        custom_id = metadata.get("custom_id") if isinstance(metadata, dict) else None
        line = {"custom_id": str(custom_id) if custom_id is not None else str(index), "method": "POST",
                "url": endpoint, "body": body}
    if model and isinstance(body, dict) and "model" not in body:
        line["body"] = {"model": model, **body}
    return line


def ids_of_file(path: str | os.PathLike) -> list[str]:
    """The custom_ids of a job file, in its order (a bare body's is ``line-N``, as the job file
    reader names it). Lines that are not JSON objects are left to the submit to refuse."""
    try:
        return list(_file_ids(path))
    except FileNotFoundError:
        raise RequestsError(f"{os.fspath(path)}: no such file; pass the path of a JSONL job file, or the "
                            f"requests themselves as a list of dicts") from None
    except IsADirectoryError:
        raise RequestsError(f"{os.fspath(path)} is a folder, not a JSONL job file") from None
    except OSError as exc:
        raise RequestsError(f"{os.fspath(path)}: cannot read it ({exc.strerror or exc})") from None


def _file_ids(path: str | os.PathLike) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if "custom_id" in obj:
                yield str(obj["custom_id"])
                continue
            metadata = obj.get("metadata")
            custom_id = metadata.get("custom_id") if isinstance(metadata, dict) else None
            yield f"line-{line_no}" if custom_id is None else str(custom_id)
