"""--max-cost for remote batches: before a part's file is uploaded, its jobs' worst case at the
Batch API price is set aside against the batch's cap, the one live requests draw on
(state/lua/reserve_part.lua). The worst case is the live cap's (runner/attempt.py): the prompt
counted by tiktoken at the full input price, plus the request's maximum output. When the part's
lines come back, complete.lua settles each job's amount to its real cost, as for live answers.
"""

from __future__ import annotations

import json

from batchrun.policy.pricing import PriceTable, batch_price, worst_case_cost
from batchrun.policy.tokens import TokenEstimate, estimate_tokens
from batchrun.state import keys

CHUNK = 5000  # requests read per round trip


def request_estimate(raw_request: bytes | str | None) -> tuple[str, TokenEstimate | None]:
    """(model, its token estimate) of a stored request ({"url", "body"} JSON); no estimate for a
    request that cannot be read."""
    if not raw_request:
        return "", None
    try:
        req = json.loads(raw_request)
        body = req.get("body") or {}
        return str(body.get("model", "")), estimate_tokens(req.get("url", ""), body)
    except (ValueError, TypeError, AttributeError):
        return "", None


def part_costs(redis, batch_id: str, cids: list[str], table: PriceTable) -> tuple[list[tuple[str, float]], str]:
    """Each job's worst case at the Batch API price, for the jobs whose request is still stored
    (those that ended meanwhile are left out); and the first model without a price ('' if none),
    for which nothing can be set aside."""
    out: list[tuple[str, float]] = []
    for i in range(0, len(cids), CHUNK):
        chunk = cids[i:i + CHUNK]
        for cid, raw in zip(chunk, redis.hmget(keys.sub(batch_id, "req"), chunk)):
            if not raw:
                continue
            model, est = request_estimate(raw)
            price = table.price_for(model)
            if price is None:
                return out, model
            if est is not None:
                out.append((cid, worst_case_cost(batch_price(price), est.input_tokens, est.output_tokens)))
    return out, ""


def worst_tokens(redis, batch_id: str, cid: str) -> tuple[int, int]:
    """(input, output) tokens of a job's worst case: what an answer whose usage cannot be read
    counts (as a live answer does); (0, 0) once its request is gone."""
    _, est = request_estimate(redis.hget(keys.sub(batch_id, "req"), cid))
    return (est.input_tokens, est.output_tokens) if est is not None else (0, 0)
