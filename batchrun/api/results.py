"""Result: one request's outcome as a typed object, made from (and back into) the Batch API
output line that `batchrun run` writes, so that files and objects agree."""

from __future__ import annotations

import array
import base64
import copy
import sys
from dataclasses import dataclass, field
from typing import Any

from batchrun.api.wording import in_python
from batchrun.policy.pricing import PriceTable, cost_of_usage

NOT_RUN = "not_run"  # ResultError.code of a request the batch did not get to (paused, interrupted)


@dataclass(frozen=True)
class ResultError:
    """Why a request has no answer: the server's code (or batchrun's) and a sentence."""
    code: str
    message: str


@dataclass(frozen=True)
class Result:
    custom_id: str
    ok: bool
    body: dict | None = None  # the server's answer body (also that of a failed answer, when it had one)
    status_code: int | None = None
    error: ResultError | None = None
    attempts: int = 0  # tries the job took, as far as its line tells (0: not known)
    cached: bool = False  # served from the response cache: not sent, not paid
    line: dict | None = field(default=None, repr=False, compare=False)  # the output line it was read from
    # The price table ``cost_usd`` is worked out with, on first use: most callers never ask, and
    # working it out for each of 20,000 results was a fifth of what reading them back cost.
    prices: PriceTable | None = field(default=None, repr=False, compare=False)

    @property
    def cost_usd(self) -> float | None:
        """USD at the shipped (or given) prices; None for a failed request or an unknown model; 0.0 if cached."""
        if self.cached:
            return 0.0
        return _cost(self.body, self.prices) if self.ok else None

    @property
    def saved_usd(self) -> float | None:
        """A cached answer: what sending it would have cost (None otherwise)."""
        return _cost(self.body, self.prices) if self.cached else None

    @property
    def usage(self) -> dict | None:
        usage = (self.body or {}).get("usage")
        return usage if isinstance(usage, dict) else None

    @property
    def text(self) -> str | None:
        """The answer's text: chat completions, completions and responses; None for others."""
        return answer_text(self.body) if self.ok else None

    @property
    def embedding(self) -> list[float] | None:
        data = (self.body or {}).get("data") if self.ok else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            vector = data[0].get("embedding")
            if isinstance(vector, str):  # encoding_format="base64"
                return _floats_of_base64(vector)
            return vector if isinstance(vector, list) else None
        return None

    def to_dict(self) -> dict:
        """The Batch API output line (results or errors file) this result is."""
        if self.line is not None:
            return copy.deepcopy(self.line)
        return {"id": None, "custom_id": self.custom_id, "response": None,
                "error": {"code": self.error.code, "message": self.error.message} if self.error else None}


def from_line(line: dict, prices: PriceTable | None = None) -> Result:
    """A results or errors file's line as a Result."""
    response = line.get("response")
    if response.__class__ is not dict:
        response = {}
    body = response.get("body")
    if body.__class__ is not dict:
        body = None
    status = response.get("status_code")
    err = line.get("error")
    if err is None:  # the common case, a result: no more checks than it needs
        error = None
        ok = status.__class__ is int and 200 <= status < 300
    else:
        # The runner's sentence names the command's flags (--tpm 100); a caller of run() gave keywords.
        error = ResultError(str(err.get("code") or "error"), in_python(str(err.get("message") or ""))) \
            if isinstance(err, dict) else None
        ok = error is None and isinstance(status, int) and 200 <= status < 300
    attempts = line.get("attempts")
    tries = len(attempts) if isinstance(attempts, list) else (1 if ok else 0)
    cached = ok and line.get("cached") is True
    return Result(line["custom_id"], ok, body, status, error, 0 if cached else tries, cached, line, prices)


def not_run(custom_id: str, why: str) -> Result:
    return Result(custom_id=custom_id, ok=False, error=ResultError(NOT_RUN, why))


def answer_text(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        message = first.get("message")
        if isinstance(message, dict):  # chat completions
            content = message.get("content")
            return content if isinstance(content, str) else None
        text = first.get("text")  # completions
        return text if isinstance(text, str) else None
    if isinstance(body.get("output_text"), str):
        return body["output_text"]
    return _responses_text(body.get("output"))


def _responses_text(output: Any) -> str | None:
    """The text parts of a Responses API answer's message items, joined."""
    if not isinstance(output, list):
        return None
    parts = [c.get("text") for item in output if isinstance(item, dict) and item.get("type") == "message"
             and isinstance(item.get("content"), list)  # an odd server's content: a number, a string
             for c in item["content"] if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return "".join(parts) if parts else None


def _floats_of_base64(packed: str) -> list[float] | None:
    """An embedding sent as base64 (OpenAI: the float32 vector's little-endian bytes) as floats."""
    try:
        raw = base64.b64decode(packed, validate=True)
    except ValueError:
        return None
    if len(raw) % 4:
        return None
    vector = array.array("f", raw)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector.tolist()


def _cost(body: dict | None, prices: PriceTable | None) -> float | None:
    if body is None or prices is None or not isinstance(body.get("model"), str):
        return None
    price = prices.price_for(body["model"])
    return cost_of_usage(price, body.get("usage")) if price is not None else None
