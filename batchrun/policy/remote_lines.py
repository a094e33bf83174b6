"""What one line of a remote batch's output or error file means for its job. Pure.

A 200 answer is the job's result. An answer that says the request itself is wrong (a 4xx other
than 408, 409 and 429) is its final error: sending it again cannot help. Everything else (the
batch expired or was cancelled before the line ran, a 5xx, a 429, a line without an answer) is
sent again, at the cost of one attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchrun.enums import StoredText
from batchrun.policy.classify import classify_answer
from batchrun.policy.errors import error_fields
from batchrun.policy.verdict import Action

RETRYABLE_4XX = frozenset({408, 409, 429})


class LineFate(StoredText):
    RESULT = "result"
    ERROR = "error"  # final
    RESEND = "resend"


@dataclass(frozen=True)
class LineOutcome:
    fate: LineFate
    custom_id: str
    status_code: int | None  # the answer's HTTP status, None without one
    code: str  # why it failed ('' for a result): the error's code, or http_NNN
    message: str


def line_outcome(line: object, url: str = "") -> LineOutcome | None:
    """The fate of one output/error file line (its request sent to ``url``); None for a line that
    names no job. A 200 is judged as a live answer is (policy/classify.py): a Responses body with
    status ``failed``, or a body without the endpoint's result field, is no result."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    cid = line["custom_id"]
    response = line.get("response") if isinstance(line.get("response"), dict) else None
    error = line.get("error") if isinstance(line.get("error"), dict) else {}
    status = response.get("status_code") if response else None
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    if status == 200 and not error:
        verdict = classify_answer(url, None, response.get("body"), now=0.0)
        if verdict is None:
            return LineOutcome(LineFate.RESULT, cid, 200, "", "")
        fate = LineFate.RESEND if verdict.action is Action.RETRY else LineFate.ERROR
        return LineOutcome(fate, cid, 200, verdict.kind, verdict.message)
    if status is not None:
        fields = error_fields(response.get("body"))
        code = fields.code or fields.type or str(error.get("code") or "") or f"http_{status}"
        message = fields.message or str(error.get("message") or "") or f"the remote batch answered HTTP {status}"
        final = 400 <= status < 500 and status not in RETRYABLE_4XX
        return LineOutcome(LineFate.ERROR if final else LineFate.RESEND, cid, status, code, message)
    code = str(error.get("code") or "remote_line_failed")
    message = str(error.get("message") or "the remote batch returned this line without an answer")
    return LineOutcome(LineFate.RESEND, cid, None, code, message)


def is_queue_full(code: object, message: object) -> bool:
    """Does a create's 400, or a batch's validation error, say the model's enqueued-token queue is
    full (wait for capacity) rather than that the file is wrong?"""
    text = f"{code or ''} {message or ''}".lower()
    return "token_limit_exceeded" in text or "enqueued token limit" in text or "queue is full" in text
