"""A server bucket of one second's worth (a limit enforced per second): the headroom header sync keeps.

observe.lua keeps one second's worth of T unused below x-ratelimit-remaining-tokens, so that a
fleet at the limit does not meet an empty bucket on every small error. Where the server's bucket
holds only a second's worth, that headroom is the whole bucket: the fleet waits for a full bucket,
which throws away what refills beyond full, and spends about half of T. Where the headers *tell*
the bucket is small (remaining + reset-tokens' refill, budget_headers.told_bucket), the headroom is
a quarter of that bucket instead. The learnt capacity (cap_t) is only a lower bound and does not
count: another client draining a minute's bucket keeps it small too.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from batchrun.state.budget_headers import told_bucket
from tests.test_limiter import admit, bucket, limiter_for

MODEL = "gpt-4o-mini"


def headers(remaining, limit="6000", reset=None) -> dict:
    out = {"x-ratelimit-remaining-tokens": remaining, "x-ratelimit-limit-tokens": limit}
    if reset is not None:
        out["x-ratelimit-reset-tokens"] = reset
    return out


def test_the_bucket_is_what_remains_plus_what_refills_until_full():
    # 6000 per minute refills 100 a second: 50 remaining and full in 0.5 s is a bucket of 100.
    assert told_bucket(headers("50", reset="500ms"), 10) == "100"
    assert told_bucket(headers("0", reset="1m0s"), 10) == "6000"
    # Never less than what remained plus the charge the server had just taken.
    assert told_bucket(headers("50", reset="0s"), 30) == "80"


@pytest.mark.parametrize("reset", ["-1", "0", "", "nan", "soon", "1e999s"])
def test_a_reset_that_is_no_duration_tells_nothing(reset):
    assert told_bucket(headers("50", reset=reset), 10) == ""


@pytest.mark.parametrize("bad", [{"x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "1s"},
                                 headers("inf", reset="1s"), headers("50", limit="nan", reset="1s"),
                                 headers("50")])
def test_without_limit_remaining_and_reset_nothing_is_told(bad):
    assert told_bucket(bad, 10) == ""


@given(remaining=st.text(max_size=12), limit=st.text(max_size=12), reset=st.text(max_size=12),
       charge=st.integers(-10, 10**9))
def test_whatever_the_headers_a_told_bucket_is_a_finite_number_in_range(remaining, limit, reset, charge):
    told = told_bucket(headers(remaining, limit, reset), charge)
    if told:
        size = float(told)
        assert math.isfinite(size) and 0 <= size <= 1e13
        assert size >= min(1e13, float(remaining)) - 1  # at least what remained (rounded)


def observe_headers(limiter, admission, hdrs, latency=0.05):
    import asyncio

    async def go():
        await limiter.observe(MODEL, hdrs, admission, latency, input_tokens=0, output_tokens=100, charged=True)
        await limiter.drain()
    asyncio.run(go())


def test_a_one_second_bucket_keeps_a_quarter_of_it_as_headroom(store):
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)  # 100 tokens/s, the server's bucket 100
    first = admit(limiter, 0, 100)
    assert first.wait == 0
    # The server took our 100 from its full bucket of 100: nothing remains, full again in 1 s.
    observe_headers(limiter, first, headers("0", reset="1s"))
    assert bucket(store)["srv_cap"] == 100
    # A quarter of the bucket (25) stays as headroom, not all of it (100): the next 100 waits 1.25 s.
    assert admit(limiter, 0, 100).wait == pytest.approx(1.25, abs=0.1)


def test_a_minute_bucket_keeps_one_second_as_before(store):
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)
    first = admit(limiter, 0, 100)
    observe_headers(limiter, first, headers("0", reset="1m0s"))  # a bucket of a whole minute, drained
    assert admit(limiter, 0, 100).wait == pytest.approx(2.0, abs=0.1)


def test_without_a_reset_header_the_whole_second_stays_headroom(store):
    # Remaining 0 after our 100 learns a capacity of 100 too, but that is only a lower bound.
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)
    first = admit(limiter, 0, 100)
    observe_headers(limiter, first, headers("0"))
    assert bucket(store)["cap_t"] == 100 and bucket(store)["srv_cap"] == 0
    assert admit(limiter, 0, 100).wait == pytest.approx(2.0, abs=0.1)


def test_a_stale_answer_tells_no_bucket(store):
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)
    first = admit(limiter, 0, 100)
    observe_headers(limiter, first, headers("0", reset="1s"), latency=30)
    assert bucket(store).get("srv_cap", 0) == 0


def test_the_mock_servers_headers_tell_its_one_second_bucket_to_a_real_run(store, tmp_path):
    """End to end: a worker's answers from `mock-server --tpm 60000 --burst-seconds 1` leave the
    budget knowing the server's bucket (1,000 tokens), so its headroom is 250, not 1,000."""
    from batchrun.mock import MockConfig, MockServerThread
    from batchrun.ops.submit import submit_file
    from batchrun.settings import BatchOptions, Limits, WorkerSettings
    from tests.helpers import run_thread_worker, write_jobs
    from tests.test_limiter import budget_key

    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    with MockServerThread(MockConfig(tpm=60_000, burst_seconds=1)) as srv:
        settings = WorkerSettings(base_url=srv.base_url, api_key="sk-x", concurrency=4)
        options = BatchOptions(limits=Limits.parse(rpm=[], tpm=["60000"]), burst_seconds=1)
        rep = submit_file(store, str(jobs), options=options)
        run_thread_worker(store.redis, settings, 60)
        assert store.meta(rep.batch_id)["state"] == "finished"
        assert srv.stats()["by_status"].get("429", 0) == 0
    told = bucket(store, budget_key(model=jobs_model(jobs), base_url=srv.base_url))["srv_cap"]
    assert 950 <= told <= 1000  # remaining + reset's refill: the bucket, give or take rounding


def jobs_model(path) -> str:
    import json

    with open(path) as f:
        return json.loads(f.readline())["body"]["model"]
