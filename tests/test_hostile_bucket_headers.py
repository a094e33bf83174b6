"""Hostile x-ratelimit-* headers (odd resets, negative or huge numbers, limit below remaining, headers
missing or changing between answers) never lift the budget above a configured --tpm, whatever bucket
they tell (budget_headers.told_bucket -> observe.lua's srv_cap), and never stall it."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.test_limiter import MODEL, admit, bucket, limiter_for

odd = st.one_of(st.sampled_from(["1s", "6m0s", "0.5s", "1h2m3s", "", "abc", "-1", "-5", "0", "0s", "1e999", "nan",
                                 "99999999h", "1e13", "1e20", "100", "6000", "1000000", "-1e20", "1ms"]),
                st.integers(-10**7, 10**13).map(str))
hdr = st.fixed_dictionaries({}, optional={"x-ratelimit-limit-tokens": odd, "x-ratelimit-remaining-tokens": odd,
                                          "x-ratelimit-reset-tokens": odd})


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(seq=st.lists(st.tuples(hdr, st.floats(0, 2)), min_size=1, max_size=6))
def test_a_configured_tpm_stays_a_ceiling_whatever_the_headers_tell(store, seq):
    store.redis.flushdb()
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)  # 100 tokens/s, a second's worth at once
    for headers, latency in seq:
        admission = admit(limiter, 0, 50)

        async def go():
            await limiter.observe(MODEL, headers, admission, latency, input_tokens=0, output_tokens=50, charged=True)
            await limiter.drain()
        asyncio.run(go())
        held = bucket(store)
        assert held["tok"] <= 100 + 1e-6, (seq, held)
        assert held.get("srv_cap", 0) >= 0
    # No stall: the debt a header can leave is bounded (a second's worth, plus the headroom).
    wait = admit(limiter, 0, 50).wait
    assert wait is None or wait < 10, (seq, wait, bucket(store))
