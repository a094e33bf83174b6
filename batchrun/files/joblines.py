"""One line of a job file: the Job it holds, or the reason it holds none.

A line is a Batch API input line (custom_id, method, url, body) or a bare request body with an
optional ``metadata.custom_id``; jobfile.py describes both and reads whole files with these.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from batchrun.files.seen_ids import SeenIds
from batchrun.policy.cache_entries import OPT_OUT_FIELD, line_opts_out, opt_out_problem

__all__ = ["URLS", "Job", "LineError", "parse_line", "scan_json"]

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")

# Keys that only a Batch API line has; a line with any of them is checked as one.
_BATCH_KEYS = ("custom_id", "method", "url", "body")

# JSON can spell UTF-16 surrogates ("\ud800"); a lone one is no Unicode character, so neither Redis
# (strict UTF-8) nor the request's body could carry it. Only lines that spell one are checked further.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send. ``line_no`` is 1-based, for messages."""

    custom_id: str
    method: str
    url: str
    body: dict
    line_no: int
    cache: bool = True  # False: the line's "batchrun": {"cache": false} (it is always sent)


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one line of a job file cannot be submitted."""

    path: str
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}, line {self.line_no}: {self.reason}"


scan_json = json.JSONDecoder().scan_once  # json.loads without its wrappers (see parse_line)


def parse_line(raw: bytes, line_no: int, endpoint: str, seen: SeenIds, build: bool = True) -> Job | bool | str:
    """Return the line's Job (True if not ``build``), or the reason it is invalid."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); save the file as UTF-8"
    # The usual line is one object and a newline: scanned straight away (json.loads would first
    # look for leading and trailing whitespace with regexes). Anything else, errors included,
    # goes through json.loads, which says what is wrong.
    obj = None
    if text.startswith("{"):
        try:
            obj, end = scan_json(text, 0)
        except (StopIteration, ValueError, RecursionError):
            obj = None
        else:
            if text[end:].strip(" \t\r\n"):  # only JSON's whitespace may follow the object
                obj = None
    if obj is None:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not valid JSON: {e.msg} at column {e.colno}"
        except ValueError:  # json's own limit on integers (int_max_str_digits)
            return "holds a number of more than 4,300 digits, which cannot be read"
        except RecursionError:
            return "nested too deeply to be read"
    if not isinstance(obj, dict):
        return f"not a JSON object (it is {_kind(obj)}); each line must be one request object"
    if _SURROGATE_ESCAPE.search(text) is not None:
        reason = _lone_surrogate(obj)
        if reason:
            return reason

    if "custom_id" in obj or "method" in obj or "url" in obj or "body" in obj:  # any of _BATCH_KEYS
        return _parse_batch_line(obj, line_no, seen, build)
    if "model" in obj:
        return _parse_bare_body(obj, line_no, endpoint, seen, build)
    return (
        "neither a Batch API line (custom_id, method, url, body) "
        "nor a request body (no 'model')"
    )


def _parse_batch_line(obj: dict, line_no: int, seen: SeenIds, build: bool = True) -> Job | bool | str:
    if len(obj) < 4 or "custom_id" not in obj or "method" not in obj or "url" not in obj or "body" not in obj:
        missing = [key for key in _BATCH_KEYS if key not in obj]
        if missing:
            names = [repr(key) for key in missing]
            if len(names) == 1:
                return f"missing field {names[0]}"
            return f"missing fields {', '.join(names[:-1])} and {names[-1]}"

    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return f"custom_id must be a non-empty string, not {_kind(custom_id)}"
    # Recorded before the other fields are checked, so that a duplicate is reported even when
    # its first occurrence has another problem: one pass shows everything to fix.
    first = seen.add(custom_id, line_no)
    if first is not None:
        return f"duplicate custom_id {_short(custom_id)} (first on line {first})"

    if obj["method"] != "POST":
        return f"method must be \"POST\", not {_short(obj['method'])}"
    url = obj["url"]
    if url not in URLS:
        return f"unknown url {_short(url)} (expected one of {', '.join(URLS)})"
    body = obj["body"]
    if not isinstance(body, dict):
        return f"body is not an object (it is {_kind(body)})"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "body has no 'model'"
    problem = _count_problem(body) or (opt_out_problem(obj) if OPT_OUT_FIELD in obj else None)
    if problem:
        return problem
    return Job(custom_id, "POST", url, body, line_no, not line_opts_out(obj)) if build else True


def _parse_bare_body(body: dict, line_no: int, endpoint: str, seen: SeenIds, build: bool = True) -> Job | bool | str:
    if not isinstance(body["model"], str) or not body["model"]:
        return "'model' must be a non-empty string"
    # The cookbook's tagging field; popped so it is not sent as the API's own `metadata`.
    metadata = body.pop("metadata", None)
    custom_id = metadata.get("custom_id") if isinstance(metadata, dict) else None
    if custom_id is None:
        custom_id = f"line-{line_no}"
    elif isinstance(custom_id, (int, float)) and not isinstance(custom_id, bool):
        custom_id = str(custom_id)
    elif not isinstance(custom_id, str) or not custom_id:
        return f"metadata.custom_id must be a non-empty string or a number, not {_kind(custom_id)}"

    first = seen.add(custom_id, line_no)
    if first is not None:
        return f"duplicate custom_id {_short(custom_id)} (first on line {first})"
    problem = _count_problem(body)
    if problem:
        return problem
    return Job(custom_id, "POST", endpoint, body, line_no) if build else True


def _lone_surrogate(obj: dict) -> str | None:
    """The reason a parsed line cannot be stored or sent if one of its strings holds a lone surrogate."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        char = f"\\u{ord(e.object[e.start]):04x}"
    metadata = obj.get("metadata")
    custom_id = obj.get("custom_id", metadata.get("custom_id") if isinstance(metadata, dict) else None)
    if isinstance(custom_id, str) and _has_lone_surrogate(custom_id):
        return f"custom_id holds a lone UTF-16 surrogate ({char}), which is not valid Unicode; fix the id"
    return f"a string in the line holds a lone UTF-16 surrogate ({char}), which is not valid Unicode and cannot be sent"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# Body fields that count tokens or answers: the server refuses anything but a whole number >= 1
# (OpenAI: "expected an integer, but got a decimal number"), and the budget reserves by them.
_COUNT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of")


def _count_problem(body: dict) -> str | None:
    for name in _COUNT_FIELDS:
        if name in body:
            value = body[name]
            if value is not None and (value.__class__ is not int or value < 1):
                return f"{name} must be a whole number of at least 1, not {_short(value)}"
    return None


def _kind(value: object) -> str:
    """'an array', 'a string', ... for messages about JSON values."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _short(value: object) -> str:
    """repr(value), cut to a readable length: ids and urls are echoed back in messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


