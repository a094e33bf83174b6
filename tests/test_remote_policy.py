"""The pure rules of the Batch API sender: how jobs become remote batches (remote_split.py), what
a line of a remote batch's output or error file means (remote_lines.py), the Batch API price."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.policy.pricing import Price, batch_price, cost_of_usage
from batchrun.policy.remote_lines import LineFate, is_queue_full, line_outcome
from batchrun.policy.remote_split import MAX_BYTES, MAX_REQUESTS, JobSize, split_parts

jobs_strategy = st.lists(st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]),
                                   st.sampled_from(["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]),
                                   st.integers(1, 300)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(jobs_strategy, st.integers(1, 20), st.integers(300, 3000))
def test_every_job_lands_in_exactly_one_part_within_the_limits(specs, max_requests, max_bytes):
    jobs = [JobSize(f"id-{i}", url, model, size) for i, (url, model, size) in enumerate(specs)]
    parts = split_parts(jobs, max_requests, max_bytes)
    placed = [cid for p in parts for cid in p.custom_ids]
    assert sorted(placed) == sorted(j.custom_id for j in jobs)  # each once, none lost
    by_id = {j.custom_id: j for j in jobs}
    for p in parts:
        assert p.custom_ids and len(p.custom_ids) <= max_requests
        assert p.bytes == sum(by_id[c].line_bytes for c in p.custom_ids) <= max_bytes
        assert {(by_id[c].url, by_id[c].model) for c in p.custom_ids} == {(p.url, p.model)}  # one model per file
    # No more parts than needed: a group's parts are full but for its last one.
    for group in {(p.url, p.model) for p in parts}:
        mine = [p for p in parts if (p.url, p.model) == group]
        for p, nxt in zip(mine, mine[1:]):
            assert len(p.custom_ids) == max_requests or p.bytes + by_id[nxt.custom_ids[0]].line_bytes > max_bytes


def test_120000_jobs_of_one_model_are_three_files_at_openais_limits():
    parts = split_parts(JobSize(f"r{i}", "/v1/chat/completions", "gpt-4o-mini", 300) for i in range(120_000))
    assert [len(p.custom_ids) for p in parts] == [50_000, 50_000, 20_000]
    assert MAX_REQUESTS == 50_000 and MAX_BYTES == 200_000_000


def test_200_mb_is_read_as_decimal_megabytes_not_mebibytes():
    # 200,000,002 bytes: over 200 MB, under 200 MiB (209,715,200): two files, not one the upstream may refuse
    parts = split_parts(JobSize(f"r{i}", "/v1/chat/completions", "m", 100_000_001) for i in range(2))
    assert [len(p.custom_ids) for p in parts] == [1, 1]


def test_a_file_is_cut_at_200_mb():
    parts = split_parts(JobSize(f"r{i}", "/v1/chat/completions", "m", 10_000_000) for i in range(45))
    assert [len(p.custom_ids) for p in parts] == [20, 20, 5]


def test_limits_below_one_are_refused():
    with pytest.raises(ValueError):
        split_parts([], 0, 10)


def _line(status=None, body=None, error=None):
    return {"id": "batch_req_1", "custom_id": "a",
            "response": None if status is None else {"status_code": status, "request_id": "r", "body": body or {}},
            "error": error}


@pytest.mark.parametrize("line, fate, code", [
    (_line(200, {"choices": []}), LineFate.RESULT, ""),
    (_line(400, {"error": {"message": "bad max_tokens", "code": "integer_below_min_value"}}), LineFate.ERROR,
     "integer_below_min_value"),
    (_line(404, {"error": {"message": "no such model", "type": "invalid_request_error"}}), LineFate.ERROR,
     "invalid_request_error"),
    (_line(500, {"error": {"message": "oops", "type": "server_error"}}), LineFate.RESEND, "server_error"),
    (_line(429, {"error": {"message": "slow down"}}), LineFate.RESEND, "http_429"),
    (_line(error={"code": "batch_expired", "message": "expired"}), LineFate.RESEND, "batch_expired"),
    (_line(error={"code": "batch_cancelled", "message": "cancelled"}), LineFate.RESEND, "batch_cancelled"),
    (_line(), LineFate.RESEND, "remote_line_failed"),
    (_line(200, {}, {"code": "x", "message": "y"}), LineFate.RESEND, "x"),  # an answer and an error: not a result
])
def test_what_a_remote_line_means(line, fate, code):
    outcome = line_outcome(line)
    assert (outcome.fate, outcome.code, outcome.custom_id) == (fate, code, "a")


@pytest.mark.parametrize("line", [None, [], "x", {"custom_id": 3}, {"response": {}}])
def test_a_line_naming_no_job_is_none(line):
    assert line_outcome(line) is None


def test_queue_full_is_told_from_other_400s():
    assert is_queue_full("token_limit_exceeded", "")
    assert is_queue_full(None, "Enqueued token limit reached for gpt-4o in organization org-x.")
    assert not is_queue_full("invalid_request", "Line 3 is not valid")


def test_the_batch_api_price_is_half():
    price = Price(input=2.0, cached_input=1.0, output=8.0)
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    assert cost_of_usage(batch_price(price), usage) == pytest.approx(cost_of_usage(price, usage) / 2) == 5.0


from batchrun.policy.via_split import HEADROOM, live_share  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.floats(0, 10_000), st.integers(0, 10**5), st.integers(0, 10**8),
       st.floats(0, 86_400 * 2), st.floats(0, 86_400))
def test_the_live_share_never_passes_the_budget_and_grows_with_time(jobs, avg, rpm, tpm, seconds, more):
    n = live_share(jobs, avg, rpm, tpm, seconds)
    assert 0 <= n <= jobs
    if rpm:
        assert n <= rpm * seconds / 60 * HEADROOM + 1e-6
    if tpm:
        assert n * max(avg, 1.0) <= tpm * seconds / 60 * HEADROOM + max(avg, 1.0)
    assert live_share(jobs, avg, rpm, tpm, seconds + more) >= n  # more time: never fewer live


def test_the_live_share_cases():
    assert live_share(1000, 100, 0, 0, 60) == 1000  # no limit known: all live
    assert live_share(1000, 100, 600, 0, 60) == 360  # 600 requests in the minute, 0.6 of them
    assert live_share(1000, 100, 0, 60_000, 60) == 360  # 600 jobs' tokens in the minute
    assert live_share(1000, 100, 600, 60_000, 0) == 0  # the deadline has passed: all remote


@pytest.mark.parametrize("url, body, fate", [
    ("/v1/chat/completions", {"choices": [{"message": {"content": "hi"}}], "usage": {}}, LineFate.RESULT),
    ("/v1/chat/completions", {"id": "x"}, LineFate.RESEND),  # a 200 without choices: no result (as live)
    ("/v1/responses", {"status": "completed", "output": []}, LineFate.RESULT),
    ("/v1/responses", {"status": "incomplete", "output": []}, LineFate.RESULT),  # a normal, billed ending
    ("/v1/responses", {"status": "failed", "output": [],
                       "error": {"code": "invalid_prompt", "message": "bad prompt"}}, LineFate.ERROR),
    ("/v1/responses", {"status": "failed", "output": [],
                       "error": {"code": "server_error", "message": "oops"}}, LineFate.RESEND),
])
def test_a_200_line_is_judged_as_a_live_answer_is(url, body, fate):
    # A Responses line with status "failed" (a 200 upstream) was recorded as the job's result.
    assert line_outcome(_line(200, body), url).fate is fate
