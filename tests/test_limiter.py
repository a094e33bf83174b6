"""The shared requests/tokens budget: reserve.lua through SharedLimiter.admit.

Buckets hold ``limit * burst_seconds / 60`` and refill at ``limit / 60`` per second; a reservation is
granted in arrival order and may run the bucket into debt, which its caller pays off by waiting.
(Cooldowns and the circuit breaker, which reserve.lua also honours, are left at rest here.)
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis
from hypothesis import given, strategies as st

from batchrun.state import keys
from batchrun.state.limiter import SharedLimiter, budget_id, describe_budgets
from batchrun.settings import BatchOptions, Limits, WorkerSettings
from batchrun.state.store import BatchStore
from tests.helpers import run_in_processes

MODEL = "gpt-4o-mini"
BASE_URL = "http://127.0.0.1:9/v1"


def limiter_for(store: BatchStore, *, rpm: str | None = None, tpm: str | None = None, burst_seconds: float = 60.0,
                api_key: str = "sk-x", base_url: str = BASE_URL) -> SharedLimiter:
    limits = Limits.parse(rpm=[rpm] if rpm else [], tpm=[tpm] if tpm else [])
    return SharedLimiter(store, WorkerSettings(base_url=base_url, api_key=api_key),
                         BatchOptions(limits=limits, burst_seconds=burst_seconds))


def reserve_all(limiter: SharedLimiter, costs: list[int], model: str = MODEL) -> list[float | None]:
    """Reserve all at once, in this order (they arrive in one script call); the waits, in order."""
    async def go():
        out = await asyncio.gather(*(reserve(limiter, model, c) for c in costs))
        await limiter.drain()
        return list(out)
    return asyncio.run(go())


async def reserve(limiter: SharedLimiter, model: str, cost: int) -> float | None:
    """Seconds to wait before sending, or None if the request can never fit."""
    # All of it as output: charged exactly (no calibration). The wait as computed, not waited out.
    admission = await limiter.admit(model, 0, cost, wait_turn=False)
    return None if admission is None else admission.wait


def budget_key(api_key: str = "sk-x", model: str = MODEL, base_url: str = BASE_URL) -> str:
    return keys.budget(budget_id(base_url, WorkerSettings(api_key=api_key).key_fingerprint(), model))


def bucket(store: BatchStore, key: str | None = None) -> dict[str, float]:
    raw = store.redis.hgetall(key or budget_key())
    return {k.decode(): float(v) for k, v in raw.items()}


# --- burst, then waits of cost / rate ---------------------------------------------------------


def test_fresh_budget_grants_burst_then_waits_cost_over_rate(store):
    limiter = limiter_for(store, rpm="60", tpm="6000")  # capacity 60 requests, 6000 tokens; 100 tokens/s
    waits = reserve_all(limiter, [6000, 100, 100, 250])
    assert waits[0] == 0.0  # the whole burst at once
    assert waits[1] == pytest.approx(1.0, abs=0.1) and waits[1] <= 1.0
    assert waits[2] == pytest.approx(2.0, abs=0.1) and waits[2] <= 2.0
    assert waits[3] == pytest.approx(4.5, abs=0.1) and waits[3] <= 4.5
    b = bucket(store)
    assert b["tok"] == pytest.approx(-450, abs=10)  # in debt by what the waiters still owe
    assert b["req"] == pytest.approx(56, abs=0.2)
    assert 0 < store.redis.pttl(budget_key()) <= 86_400_000  # what it learnt is kept a day


def test_requests_per_minute_burst(store):
    limiter = limiter_for(store, rpm="60")  # 60 requests at once, then one a second
    waits = reserve_all(limiter, [1] * 62)
    assert waits[:60] == [0.0] * 60
    assert waits[60] == pytest.approx(1.0, abs=0.15) and waits[60] <= 1.0
    assert waits[61] == pytest.approx(2.0, abs=0.15) and waits[61] <= 2.0


def test_budget_refills_over_time(store):
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)  # 1000 tokens capacity, 1000 tokens/s
    assert reserve_all(limiter, [1000]) == [0.0]
    time.sleep(0.3)
    wait = reserve_all(limiter, [500])[0]
    assert 0.1 <= wait <= 0.2 + 0.05  # ~300 tokens came back: 200 short, 0.2 s
    time.sleep(1.5)
    assert reserve_all(limiter, [1000]) == [0.0]  # refilled to capacity (not beyond)
    assert reserve_all(limiter, [100])[0] == pytest.approx(0.1, abs=0.03)


def test_no_limits_means_no_wait(store):
    limiter = limiter_for(store)
    assert reserve_all(limiter, [10**9, 5] * 50) == [0.0] * 100
    assert reserve_all(limiter, [10**9]) == [0.0]


# --- requests that can never fit --------------------------------------------------------------


def test_request_above_capacity_never_fits_and_takes_nothing(store):
    limiter = limiter_for(store, rpm="60", tpm="6000")
    assert reserve_all(limiter, [6001]) == [None]
    b = bucket(store)  # the budget exists, untouched
    assert b["tok"] == pytest.approx(6000) and b["req"] == pytest.approx(60)
    assert reserve_all(limiter, [6000, 6001, 6001]) == [0.0, None, None]
    assert bucket(store)["req"] == pytest.approx(59, abs=0.1)  # only the one that fits took a request


def test_capacity_follows_burst_seconds_but_too_large_is_judged_on_the_minute(store):
    # The burst is the bucket's capacity (tpm * burst_seconds / 60); a request bigger than it fits the
    # per-minute limit, so it waits in debt instead of failing.
    limiter = limiter_for(store, tpm="6000", burst_seconds=1)  # capacity 100 tokens, 100 tokens/s
    assert reserve_all(limiter, [100, 50, 1000, 6001]) == [0.0, pytest.approx(0.5, abs=0.05),
                                                           pytest.approx(10.5, abs=0.05), None]


def test_script_contract_in_one_call(store):
    """Several costs (input, output, smallest input) in one call are served in order: {ms, verdict, charge,
    mark, request mark} each; verdict -1 marks one that never fits."""
    out = store.scripts.reserve(keys=[keys.budget("test"), keys.circuit("test"), keys.BUDGETS],
                                args=[0, 60000, 1, 5, 0, 600, 0, 0, 60001, 0, 0, 600, 0, 0, 300, 0])
    out = [int(x) for x in out]
    assert out[1::5] == [0, -1, 0, 0]
    assert out[0::5] == [0, -1, pytest.approx(200, abs=2), pytest.approx(500, abs=2)]
    assert out[2::5] == [600, 0, 600, 300]
    assert out[3::5] == [600, 0, 1200, 1500]  # running total of tokens taken
    assert out[4::5] == [1, 0, 2, 3]  # ... and of requests


# --- first come, first served -----------------------------------------------------------------


def test_large_request_is_served_at_its_turn(store):
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)  # 1000 tokens, 1000 tokens/s
    waits = reserve_all(limiter, [100] * 10 + [100] * 5 + [900] + [100] * 3)
    small_before, large, small_after = waits[10:15], waits[15], waits[16:]
    assert waits[:10] == [0.0] * 10
    assert small_before == sorted(small_before) and small_before[0] > 0
    assert large is not None
    # Its wait is its own debt, counted behind the earlier ones: ~ (500 + 900) / 1000 s.
    assert large == pytest.approx(1.4, abs=0.1) and large > small_before[-1]
    # Those who came later wait behind it, not before it.
    assert all(w > large for w in small_after)
    assert small_after[0] == pytest.approx(large + 0.1, abs=0.05)


def test_concurrent_reservations_in_one_process_share_the_budget(store):
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)

    async def go():
        waits = await asyncio.gather(*(reserve(limiter, MODEL, 100) for _ in range(30)))
        await limiter.drain()
        return waits
    waits = sorted(asyncio.run(go()))
    assert waits[:10] == [0.0] * 10
    # 2000 tokens of debt: the last waits ~2 s, and they are spaced by ~0.1 s.
    assert waits[-1] == pytest.approx(2.0, abs=0.1)
    assert all(b - a == pytest.approx(0.1, abs=0.02) for a, b in zip(waits[10:], waits[11:]))


# --- whose budget -----------------------------------------------------------------------------


def test_budget_shared_by_key_and_model_not_by_batch(store):
    a = limiter_for(store, tpm="6000")
    b = limiter_for(store, tpm="6000")  # another batch, same key and model
    assert reserve_all(a, [6000]) == [0.0]
    assert reserve_all(b, [100])[0] == pytest.approx(1.0, abs=0.1)
    other_model = reserve_all(b, [6000], model="gpt-4o")
    other_key = reserve_all(limiter_for(store, tpm="6000", api_key="sk-y"), [6000])
    other_url = reserve_all(limiter_for(store, tpm="6000", base_url="http://other/v1"), [6000])
    assert other_model == other_key == other_url == [0.0]
    assert len(store.redis.keys(keys.budget("*"))) == 4


def test_budget_key_does_not_reveal_the_api_key(store):
    limiter = limiter_for(store, rpm="60", tpm="6000", api_key="sk-secret-123")
    reserve_all(limiter, [100, 200])
    assert limiter.budget_key(MODEL) == budget_key(api_key="sk-secret-123")
    assert sorted(store.redis.keys("*")) == sorted([budget_key(api_key="sk-secret-123").encode(),
                                                    keys.BUDGETS.encode()])

    async def outcomes():  # the endpoint's circuit state, written by circuit.lua
        await limiter.record(False)
        await limiter.record(True)
        await limiter.drain()
    asyncio.run(outcomes())
    found = store.redis.keys("*")
    assert len(found) == 3
    for key in found:
        assert b"sk-secret" not in key and b"secret-123" not in key
        kind = store.redis.type(key)
        if kind == b"hash":
            values = [v for kv in store.redis.hgetall(key).items() for v in kv]
        elif kind == b"string":
            values = [store.redis.get(key)]
        elif kind == b"set":
            values = list(store.redis.smembers(key))
        else:
            values = []
        for v in values:
            assert b"sk-secret" not in v and b"secret-123" not in v


# --- several processes on one budget (real Redis) ---------------------------------------------

RATE = 1000.0  # tokens per second: tpm 60000
CAPACITY = 1000.0  # burst_seconds 1
COST = 100
RUN_MS = 2000
TASKS = 4


def _hammer_budget_body(url: str, barrier, out) -> None:
    """Reserve 100-token requests from several tasks until admissions reach ~2 s past the start.

    Each admission is the Redis server time read just before reserving plus the wait; a task that is
    told to wait sleeps most of it, so the budget keeps refilling while the processes compete.
    """
    client = redis.Redis.from_url(url)
    store = BatchStore(client)
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)
    barrier.wait(timeout=30)
    start = store.server_time_ms()
    admitted: list[float] = []

    async def task():
        while True:
            now = store.server_time_ms()
            wait = await reserve(limiter, MODEL, COST)
            assert wait is not None
            admitted.append(now + wait * 1000)
            if now + wait * 1000 > start + RUN_MS:
                return
            if wait > 0.05:
                await asyncio.sleep(wait - 0.05)

    async def main():
        await asyncio.gather(*(task() for _ in range(TASKS)))
        await limiter.drain()

    asyncio.run(main())
    client.close()
    out.put(admitted)


@pytest.mark.redis
def test_two_processes_never_exceed_the_budget(real_redis_url):
    per_proc = run_in_processes(_hammer_budget_body, [(real_redis_url,)] * 2, timeout=30)
    assert all(len(a) > 5 for a in per_proc), "both processes took part"
    times = sorted(t for a in per_proc for t in a)
    first = times[0]
    tolerance = COST  # admissions are read a moment before the script's own clock
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u <= t + 1000)
        assert in_window * COST <= CAPACITY + RATE * 1.0 + tolerance, f"{in_window} admitted in [{t}, {t} + 1 s]"
    # Over the whole run: no more than the burst plus the refill.
    span = (times[-1] - first) / 1000
    assert len(times) * COST <= CAPACITY + RATE * span + tolerance
    # ...and the limiter is not needlessly strict: the processes got about what the budget allows.
    early = sum(1 for t in times if t <= first + RUN_MS)
    assert early * COST >= 0.8 * (CAPACITY + RATE * RUN_MS / 1000)


# --- the gate's other duties: an open circuit, a cooldown (reserve.lua's KEYS[2] and cool_* fields) ---------


def _gate(store: BatchStore, costs: list[int], *, rpm=60, tpm=6000, burst=60, spacing=1000) -> list[tuple[int, int]]:
    """(ms, verdict) per cost; each cost goes in as output tokens, charged exactly."""
    flat = [x for c in costs for x in (0, c, 0)]
    out = [int(x) for x in store.scripts.reserve(keys=[keys.budget("gate"), keys.circuit("gate"), keys.BUDGETS],
                                                 args=[rpm, tpm, burst, spacing, *flat])]
    return list(zip(out[0::5], out[1::5]))


def _open_circuit(store: BatchStore, open_until_ms: float) -> None:
    store.redis.hset(keys.circuit("gate"), mapping={"state": "open", "open_until": str(open_until_ms),
                                                    "probe_until": "0"})


def test_open_circuit_grants_nothing_and_spends_no_budget(store):
    now = store.server_time_ms()
    _open_circuit(store, now + 5_000)
    out = _gate(store, [100, 100])
    assert [v for _, v in out] == [1, 1]  # not granted: ask again...
    assert all(ms == pytest.approx(5_000, abs=1_000) and ms <= 5_000 for ms, _ in out)  # ...when it may close
    assert not store.redis.exists(keys.budget("gate"))


def test_cooled_circuit_lets_exactly_one_probe_through(store):
    _open_circuit(store, store.server_time_ms() - 1)
    out = _gate(store, [100, 200, 300])
    assert out == [(0, 2), (1_000, 1), (1_000, 1)]
    assert [v for _, v in _gate(store, [100])] == [1]  # the probe is out: nobody else yet
    b = {k.decode(): float(v) for k, v in store.redis.hgetall(keys.budget("gate")).items()}
    assert b["tok"] == pytest.approx(5_900, abs=1) and b["req"] == pytest.approx(59, abs=0.1)  # the probe's cost only


def test_probe_is_never_a_request_that_cannot_fit(store):
    _open_circuit(store, store.server_time_ms() - 1)
    out = _gate(store, [7_000, 100])  # 7000 > 6000 tokens capacity
    assert out[0] == (-1, -1)


def test_cooldown_holds_everybody_then_releases_them_spaced(store):
    limiter = limiter_for(store, rpm="600")  # spacing 100 ms after a cooldown

    async def go():
        assert await reserve(limiter, MODEL, 1) == 0.0
        await limiter.cool_down(MODEL, 1.0)  # a 429 said: nothing for 1 s
        waits = await asyncio.gather(*(reserve(limiter, MODEL, 1) for _ in range(3)))
        await limiter.drain()
        return waits
    waits = asyncio.run(go())
    assert waits[0] == pytest.approx(1.1, abs=0.05) and waits[0] <= 1.1
    assert waits[1] - waits[0] == pytest.approx(0.1, abs=0.005)
    assert waits[2] - waits[1] == pytest.approx(0.1, abs=0.005)


def test_cooldown_on_a_fresh_budget(store):
    limiter = limiter_for(store, rpm="600")

    async def go():
        await limiter.cool_down(MODEL, 1.0)  # a 429 before this process reserved anything on the budget
        wait = await reserve(limiter, MODEL, 1)
        await limiter.drain()
        return wait
    assert asyncio.run(go()) == pytest.approx(1.1, abs=0.05)


# --- what the server's headers teach the budget (observe.lua), and held reservations -------------


def admit(limiter: SharedLimiter, input_tokens: int, output_tokens: int):
    async def go():
        a = await limiter.admit(MODEL, input_tokens, output_tokens, wait_turn=False)
        await limiter.drain()
        return a
    return asyncio.run(go())


def observe(limiter: SharedLimiter, admission, *, remaining: int | None = None, limit: int | None = None,
            admitted: tuple[int, int] = (0, 0), latency: float = 0.05) -> None:
    headers = {}
    if remaining is not None:
        headers["x-ratelimit-remaining-tokens"] = str(remaining)
    if limit is not None:
        headers["x-ratelimit-limit-tokens"] = str(limit)

    async def go():
        await limiter.observe(MODEL, headers, admission, latency, input_tokens=admitted[0],
                              output_tokens=admitted[1], charged=True)
        await limiter.drain()
    asyncio.run(go())


def test_headers_saying_less_remains_slow_the_fleet(store):
    limiter = limiter_for(store, tpm="6000")  # full bucket of 6000, 100 tokens/s
    first = admit(limiter, 0, 100)
    assert first.wait == 0 and admit(limiter, 0, 100).wait == 0
    # Another client spent the budget: the server says nothing remained after our first request.
    observe(limiter, first, remaining=0)
    # Our second request (reserved after the first) is owed, and one second's worth (100) is kept
    # as headroom: the next waits for all three.
    assert admit(limiter, 0, 100).wait == pytest.approx(3.0, abs=0.1)


def test_stale_headers_do_not_move_the_budget(store):
    limiter = limiter_for(store, tpm="6000")
    first = admit(limiter, 0, 100)
    observe(limiter, first, remaining=0, latency=30)  # a slow answer: its remaining is old news
    assert admit(limiter, 0, 100).wait == 0


def test_limits_are_learnt_from_the_headers_when_none_were_given(store):
    limiter = limiter_for(store, burst_seconds=0)  # no --tpm, burst learnt
    first = admit(limiter, 0, 100)
    assert first.wait == 0 and admit(limiter, 0, 100_000).wait == 0  # nothing known: no limit yet
    observe(limiter, first, limit=6000, remaining=5000)
    b = bucket(store)
    assert b["lim_tpm"] == 6000 and b["cap_t"] == 5100  # what remained plus what it had just charged
    # 5000 remained after `first`, and 100000 was reserved since: a deep debt at 100 tokens/s.
    assert admit(limiter, 0, 100).wait == pytest.approx((100_000 - 5000 + 100) / 100, rel=0.01)


def test_without_a_configured_limit_the_burst_grows_to_what_the_server_shows(store):
    limiter = limiter_for(store, burst_seconds=0)
    first = admit(limiter, 0, 100)
    assert first.wait == 0 and admit(limiter, 0, 100).wait == 0  # nothing known yet
    observe(limiter, first, limit=6000, remaining=5900)  # the server's bucket held a whole minute
    # 5900 remained after `first`; the second's 100 came later, and one second's worth (100) stays
    # as headroom: 5700 may go at once.
    assert admit(limiter, 0, 5700).wait == pytest.approx(0, abs=0.05)
    assert admit(limiter, 0, 100).wait == pytest.approx(1.0, abs=0.05)


def test_a_configured_limit_is_a_ceiling_whatever_the_headers_show(store):
    limiter = limiter_for(store, tpm="6000", burst_seconds=0)  # 100 tokens/s
    start = time.monotonic()
    first = admit(limiter, 0, 100)

    def owed(seconds: float, tolerance: float) -> bool:
        # The wait the budget gives is what is owed less the time gone by since the first
        # admission (a loaded machine spends some of it between the calls): never more.
        wait, gone = admit(limiter, 0, 100).wait, time.monotonic() - start
        return seconds - gone - tolerance <= wait <= seconds + tolerance

    assert first.wait == 0
    assert owed(1.0, 0.05)  # no start-of-minute burst
    # The server allows 4x as much and its bucket is full: that neither grows the burst beyond one
    # second's worth of --tpm, nor forgives what the fleet owes.
    observe(limiter, first, limit=24_000, remaining=23_900)
    assert owed(2.0, 0.15)
    time.sleep(1.0)
    observe(limiter, first, limit=24_000, remaining=24_000)
    assert owed(2.0, 0.15)
    b = bucket(store)
    assert b["cap_t"] == 24_000 and b["tok"] <= 100  # the server's burst is known, not used
    assert describe_budgets(store)[0]["burst_tpm"] == 100


def test_calibration_learns_how_the_servers_charge_relates_to_the_estimate(store):
    limiter = limiter_for(store, tpm="6000")  # the server refills 100 tokens/s
    a = admit(limiter, 0, 1000)
    observe(limiter, a, remaining=5000)  # capacity 6000 learnt; the bucket is below 90 %: a window opens
    started = time.monotonic()
    time.sleep(2.1)
    # In the window the server admitted requests we estimated at 1000 input + 500 output tokens,
    # and its remaining fell by 3500 while it refilled ~100/s: it charged ~3710, i.e. 3.2 x our input.
    observe(limiter, a, remaining=1500, admitted=(1000, 500))
    refill = 100 * (time.monotonic() - started)
    k_new = (3500 + refill - 500) / 1000
    assert bucket(store)["k"] == pytest.approx(0.5 * 1 + 0.5 * k_new, abs=0.03)
    # Reservations now charge what the server will: k x input + output.
    assert admit(limiter, 100, 50).charge == pytest.approx(bucket(store)["k"] * 100 + 50, abs=1)


def test_a_configured_rpm_is_a_ceiling_whatever_the_headers_show(store):
    limiter = limiter_for(store, rpm="60", burst_seconds=0)  # one request a second, one at once
    first = admit(limiter, 0, 1)
    assert first.wait == 0
    headers = {"x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "999"}

    async def go():
        await limiter.observe(MODEL, headers, first, 0.05, input_tokens=0, output_tokens=1, charged=True)
        await limiter.drain()
    asyncio.run(go())
    time.sleep(2.2)  # refills one request's worth, not two: the bucket holds one
    waits = reserve_all(limiter, [1, 1, 1])
    assert waits[0] == 0 and waits[1] == pytest.approx(1.0, abs=0.15) and waits[2] == pytest.approx(2.0, abs=0.15)


def test_calibration_counts_the_servers_refill_at_the_servers_limit(store):
    limiter = limiter_for(store, tpm="6000")  # the fleet keeps to 6000; the server refills at 24000
    a = admit(limiter, 0, 1000)
    observe(limiter, a, limit=24_000, remaining=23_000)  # full: the server's capacity is learnt
    observe(limiter, a, limit=24_000, remaining=15_000)  # below 90 %: a window opens
    started = time.monotonic()
    time.sleep(2.1)
    # The server admitted requests we estimated at 1000 input + 500 output; its remaining fell by
    # 1000 while it refilled 400 tokens/s.
    observe(limiter, a, limit=24_000, remaining=14_000, admitted=(1000, 500))
    k_new = (1000 + 400 * (time.monotonic() - started) - 500) / 1000
    assert bucket(store)["k"] == pytest.approx(0.5 * 1 + 0.5 * k_new, abs=0.03)


def test_calibration_ignores_windows_in_which_a_small_server_bucket_can_have_filled(store):
    """A server whose bucket holds one second's worth (a quantised limit) fills up between answers
    and throws its refill away: that refill is no charge. Counted as one, it took k to ~2.5 after a
    single window (4 after a few), and a fleet at the server's limit spent only 31 % of it."""
    limiter = limiter_for(store, tpm="80000", burst_seconds=0)  # the server's too: 1333 tokens/s, 1333 at once
    a = admit(limiter, 200, 136)
    observe(limiter, a, limit=80_000, remaining=1_000)  # below 90 % of its capacity: a window opens
    time.sleep(2.1)
    # The server admitted what we estimated at 600 input + 400 output, charging exactly that; it
    # refilled 2800 in the window but could hold only 1333: its remaining barely moved.
    observe(limiter, a, limit=80_000, remaining=900, admitted=(600, 400))
    assert bucket(store).get("k", 1.0) == 1.0
    assert admit(limiter, 100, 50).charge == 150


def test_calibration_works_while_the_servers_bucket_stays_full(store):
    """Below the server's limit its bucket stays full and no refill can be measured, but each answer's
    headers show what its admission took: limit - remaining."""
    limiter = limiter_for(store, tpm="6000")
    for _ in range(12):  # the server charges twice our input estimate (100), plus max_tokens (50)
        a = admit(limiter, 100, 50)
        observe(limiter, a, limit=24_000, remaining=24_000 - 250, admitted=(100, 50))
    assert bucket(store)["k"] == pytest.approx(2.0, abs=0.1)
    assert admit(limiter, 100, 50).charge == pytest.approx(250, abs=10)
    for _ in range(12):  # ... and where it charges less (here our estimate exactly), k comes back
        a = admit(limiter, 100, 50)
        observe(limiter, a, limit=24_000, remaining=24_000 - 150, admitted=(100, 50))
    assert bucket(store)["k"] == pytest.approx(1.0, abs=0.1)


def test_full_bucket_answers_do_not_calibrate_near_the_servers_limit(store):
    """At --tpm close to the server's limit its bucket does not refill between the fleet's requests:
    an answer's deficit holds earlier ones too, so it says nothing about its own charge."""
    limiter = limiter_for(store, tpm="20000")
    for _ in range(12):
        a = admit(limiter, 100, 50)
        observe(limiter, a, limit=24_000, remaining=24_000 - 250, admitted=(100, 50))
    assert bucket(store).get("k", 1.0) == 1.0


def test_answers_that_paid_for_others_do_not_inflate_the_charge_ratio():
    from batchrun.state.limiter import _admitted_ratio

    def item(remaining, charge=150, input_tokens=100, output_tokens=50):
        return (input_tokens, output_tokens, ("", "24000", "", str(remaining), charge, "1", 0))
    # Two answers of a burst: the second's deficit holds the first's charge too.
    assert float(_admitted_ratio([item(24_000 - 250), item(24_000 - 500)])) == pytest.approx(2.0)
    assert _admitted_ratio([item(24_000 - 250)[:2] + (None,)]) == ""  # no headers
    assert _admitted_ratio([(0, 0, item(23_000)[2])]) == ""  # a refused request: nothing admitted
    stale = (100, 50, ("", "24000", "", "23750", 150, "0", 0))
    assert _admitted_ratio([stale]) == ""


@given(k=st.floats(0.25, 4), extra=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 2000),
                                                       st.integers(0, 20_000)), min_size=1, max_size=20))
def test_the_ratio_seen_in_full_buckets_never_undercharges(k, extra):
    """Whatever else the server had not refilled yet (others' requests, our own burst), the ratio
    is at least the one the server applies: the budget errs on the side of charging more."""
    from batchrun.state.limiter import _admitted_ratio

    limit = 10**6
    items = [(n, out, ("", str(limit), "", str(limit - (k * n + out) - more), k * n + out, "1", 0))
             for n, out, more in extra]
    assert float(_admitted_ratio(items)) >= k - 1e-3


def test_other_traffic_inflating_k_never_fails_a_request_that_fits(store):
    """Another client on the key makes the server's remaining fall faster than the fleet spends:
    the calibration blames the fleet's requests (k up), which slows it; but a request whose own
    input + output fits the limit is never failed as too large for that."""
    limiter = limiter_for(store, tpm="6000")
    a = admit(limiter, 0, 1000)
    observe(limiter, a, limit=6000, remaining=5000)
    time.sleep(2.1)
    observe(limiter, a, limit=6000, remaining=500, admitted=(100, 0))  # 4500 gone for 100 of ours
    k = bucket(store)["k"]
    assert k > 2  # inflated by the other client's traffic
    big = admit(limiter, 3000, 500)  # k x 3000 + 500 > 6000, but 3500 fits
    assert big is not None
    assert big.charge == pytest.approx(k * 3000 + 500, abs=1)  # still charged at k: it waits longer
    assert admit(limiter, 5501, 500) is None  # one that does not fit at all still fails at once


def test_too_large_is_judged_on_the_smallest_input_estimate(store):
    """tiktoken and characters / 4 disagree; the budget charges the larger, but a request fails as
    too large only if even the smaller one does not fit: a server counting either way accepts it."""
    limiter = limiter_for(store, tpm="6000")

    async def go(input_tokens, least):
        a = await limiter.admit(MODEL, input_tokens, 500, least_input=least, wait_turn=False)
        await limiter.drain()
        return a
    a = asyncio.run(go(6000, 5000))
    assert a is not None and a.charge == 6500  # charged the larger estimate
    assert asyncio.run(go(6000, 5501)) is None


def test_a_live_runner_with_a_long_lease_keeps_its_reservations(store):
    """Runners report what they hold every lease / 3: with BATCHRUN_LEASE_SECONDS=150 a live one
    reports every 50 s, so its report is not stale after 41 s."""
    from batchrun.state.limiter import release_held

    settings = WorkerSettings(base_url=BASE_URL, api_key="sk-x", lease_seconds=150)
    live = SharedLimiter(store, settings, BatchOptions(limits=Limits.parse(tpm=["6000"]), burst_seconds=60),
                         token="slow-runner")
    assert admit(live, 0, 6000).wait == 0
    assert admit(live, 0, 3000).wait == pytest.approx(30, abs=0.1)  # held: waiting its turn
    live.report_held()
    held_key = budget_key() + ":held"

    def reported_ago(seconds: float) -> None:
        r, t, at, *rest = store.redis.hget(held_key, "slow-runner").decode().split("|")
        store.redis.hset(held_key, "slow-runner", "|".join([r, t, str(float(at) - seconds * 1000), *rest]))
    reported_ago(41)
    assert release_held(store) == 0
    assert store.redis.hexists(held_key, "slow-runner")
    reported_ago(200 - 41 + 1)  # four report intervals missed: it is gone
    assert release_held(store) == 2
    assert not store.redis.hexists(held_key, "slow-runner")


def test_a_runners_first_request_goes_alone_and_counts_as_arriving_with_its_answer(store):
    """A runner's client opens its connection (and loads its TLS set-up) with its first request, which
    so reaches the server late; requests reserved meanwhile would arrive with it, more than the
    burst at once. The others wait for its answer, and it is counted again, as arriving then."""
    limiter = limiter_for(store, tpm="6000", burst_seconds=0)  # one second's worth: 100 tokens

    async def go():
        first = await limiter.admit(MODEL, 0, 50)
        others = [asyncio.create_task(limiter.admit(MODEL, 0, 50)) for _ in range(2)]
        await asyncio.sleep(1.2)  # the client starts up; the budget refills to its 100
        assert not any(t.done() for t in others)
        assert bucket(store)["spent"] == 50  # only the first was reserved
        await limiter.observe(MODEL, {"x-ratelimit-remaining-tokens": "23950", "x-ratelimit-limit-tokens": "24000"},
                              first, 0.05, input_tokens=0, output_tokens=50, charged=True)
        started = time.monotonic()
        await asyncio.gather(*others)
        waited = time.monotonic() - started
        await limiter.drain()
        return waited
    # The first's 50 arrived with its answer: of the burst, 50 were left; the third waits ~0.5 s.
    assert 0.35 <= asyncio.run(go()) <= 1.0


def test_a_dead_runners_reservations_come_back(store):
    from batchrun.state.limiter import HELD_STALE_MS, release_held

    dead = SharedLimiter(store, WorkerSettings(base_url=BASE_URL, api_key="sk-x"),
                         BatchOptions(limits=Limits.parse(tpm=["6000"]), burst_seconds=60), token="dead-runner")
    assert admit(dead, 0, 6000).wait == 0
    assert admit(dead, 0, 3000).wait == pytest.approx(30, abs=0.1)  # waiting its turn when the runner dies
    dead.report_held()
    live = limiter_for(store, tpm="6000")
    assert admit(live, 0, 100).wait == pytest.approx(31, abs=0.1)
    assert release_held(store) == 0  # the dead runner's report is still fresh
    held_key = budget_key() + ":held"
    r, t, at, *rest = store.redis.hget(held_key, "dead-runner").decode().split("|")
    assert (r, t) == ("2", "9000")
    store.redis.hset(held_key, "dead-runner", "|".join([r, t, str(float(at) - HELD_STALE_MS - 1000), *rest]))
    assert release_held(store) == 2
    assert not store.redis.hexists(held_key, "dead-runner")
    # 9000 came back: only the live runner's 100 is owed now (the bucket had run 3100 into debt).
    assert admit(live, 0, 100).wait == pytest.approx(0, abs=0.05)


def test_sent_requests_are_not_held(store):
    limiter = SharedLimiter(store, WorkerSettings(base_url=BASE_URL, api_key="sk-x"),
                            BatchOptions(limits=Limits.parse(tpm=["6000"])), token="r1")
    a = admit(limiter, 0, 500)
    limiter.sent(MODEL, a)
    limiter.report_held()
    assert store.redis.hget(budget_key() + ":held", "r1").decode().startswith("0|0|")


def _record(store: BatchStore, ok: int, fail: int, probe: str = "") -> None:
    store.scripts.circuit(keys=[keys.circuit("gate")],
                          args=["http://x/v1", 10_000, 10, 0.5, 5_000, 60_000, ok, fail, probe])


def test_one_probe_per_cooling_period_however_often_outcomes_arrive(store):
    _record(store, 0, 20)  # an outage opens the circuit
    store.redis.hset(keys.circuit("gate"), "open_until", "0")  # its cooling period is over
    _record(store, 0, 1)  # a straggler's failure arrives while it is open
    assert [v for _, v in _gate(store, [1])] == [2]  # the probe
    _record(store, 0, 1)  # another straggler
    assert [v for _, v in _gate(store, [1, 1])] == [1, 1]  # no second probe while the first is out
    _record(store, 0, 0, probe="1")  # the probe succeeded
    assert [v for _, v in _gate(store, [1, 1])] == [0, 0]


# --- headers that are no numbers ("nan", "inf", "1e999") never reach the budget (review finding 3) ---

from batchrun.state.limiter import MAX_HEADER_NUMBER, stored_number, usable_header_number  # noqa: E402

POISON = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1e400", "-5", "9" * 400, "0x10", "12 tokens", ""]


@given(st.one_of(st.text(max_size=20), st.sampled_from(POISON), st.floats().map(repr),
                 st.integers(-10**20, 10**20).map(str)))
def test_a_usable_header_number_is_finite_and_bounded(value):
    used = usable_header_number(value)
    if used:
        number = float(used)
        assert math.isfinite(number) and 0 <= number <= MAX_HEADER_NUMBER
    assert math.isfinite(stored_number(value))


def _all_finite(store: BatchStore) -> dict[str, float]:
    raw = {k.decode(): v.decode() for k, v in store.redis.hgetall(budget_key()).items()}
    bad = {k: v for k, v in raw.items() if not math.isfinite(float(v))}
    assert not bad, bad
    return {k: float(v) for k, v in raw.items()}


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "1e999", "9" * 400])
def test_poisoned_rate_limit_headers_leave_the_budget_finite(store, poison):
    limiter = limiter_for(store, burst_seconds=0)
    first = admit(limiter, 0, 100)
    headers = {f"x-ratelimit-{n}": poison for n in ("limit-requests", "limit-tokens", "remaining-requests",
                                                   "remaining-tokens")}

    async def go():
        await limiter.observe(MODEL, headers, first, 0.05, input_tokens=0, output_tokens=100, charged=True)
        await limiter.drain()
    asyncio.run(go())
    _all_finite(store)
    # The script itself refuses them too, whoever calls it.
    store.scripts.observe(keys=[budget_key()], args=[poison, poison, poison, poison, 100, "1", 0, 0, 10**9, 0, 0,
                                                     0, poison, 0])
    _all_finite(store)
    assert admit(limiter, 0, 100) is not None
    assert all(math.isfinite(v) for b in describe_budgets(store) for v in b.values() if isinstance(v, float))


def test_a_budget_poisoned_by_an_older_version_is_read_and_healed(store):
    limiter = limiter_for(store, burst_seconds=0)
    first = admit(limiter, 0, 100)
    store.redis.hset(budget_key(), mapping={"lim_rpm": "nan", "lim_tpm": "inf", "req": "-inf", "cap_t": "inf",
                                            "k": "nan"})
    budgets = describe_budgets(store)  # `batchrun limits`: no "cannot convert float NaN to integer"
    assert budgets[0]["learnt_rpm"] == 0 and budgets[0]["learnt_tpm"] == 0
    observe(limiter, first, remaining=5000, limit=6000)
    values = _all_finite(store)
    assert values["lim_tpm"] == 6000


# --- review of the ceilings: headers that do not move, --burst-seconds, a lost budget ------------


def test_headers_that_never_move_do_not_lower_the_charge_under_a_configured_limit(store):
    """A proxy echoing fixed headers (remaining = limit, always): every answer's deficit is 0. Under
    --tpm the charge stays at least the estimate reserved by, so the ceiling holds."""
    limiter = limiter_for(store, tpm="6000")
    for _ in range(12):
        a = admit(limiter, 100, 50)
        observe(limiter, a, limit=24_000, remaining=24_000, admitted=(100, 50))
    assert admit(limiter, 100, 50).charge >= 150
    # Nor does a window whose remaining did not move (the server's refill looks like consumption).
    a = admit(limiter, 100, 50)
    observe(limiter, a, limit=24_000, remaining=20_000)
    time.sleep(2.1)
    observe(limiter, a, limit=24_000, remaining=20_000 + 1000, admitted=(1000, 500))
    assert admit(limiter, 100, 50).charge >= 150


def test_answers_whose_deficit_is_below_their_output_reservation_do_not_calibrate():
    from batchrun.state.limiter import _admitted_ratio
    assert _admitted_ratio([(100, 50, ("", "24000", "", "24000", 150, "1", 0))]) == ""
    assert _admitted_ratio([(100, 50, ("", "24000", "", "23960", 150, "1", 0))]) == ""


def test_only_a_configured_limit_keeps_the_charge_at_least_the_estimate(store):
    admit(limiter_for(store, burst_seconds=0), 100, 50)
    store.redis.hset(budget_key(), "k", "0.5")  # learnt: the server charges half our input estimate
    assert admit(limiter_for(store, burst_seconds=0), 100, 50).charge == 100  # no limit given: learnt k
    assert admit(limiter_for(store, tpm="6000"), 100, 50).charge == 150  # --tpm: never below the estimate


def test_a_negative_remaining_counts_as_nothing_left_not_as_days_of_debt(store):
    limiter = limiter_for(store, tpm="6000")  # 100 tokens/s
    first = admit(limiter, 0, 100)
    observe(limiter, first, remaining=-100_000_000)
    # As remaining=0: one second's worth of headroom, then this request's own 100.
    assert admit(limiter, 0, 100).wait == pytest.approx(2.0, abs=0.1)


def test_waiters_reserve_again_when_the_budget_is_lost(store):
    """The budget hash is deleted (or Redis restarts from an older snapshot) while requests wait:
    their marks belong to the lost budget and will never be reached. They reserve again in the new
    one, in order, instead of waiting for ever."""
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)  # 1000 tokens at once, 1000 tokens/s

    async def go():
        first = await limiter.admit(MODEL, 0, 1000)
        await limiter.observe(MODEL, None, first, 0.01, input_tokens=0, output_tokens=0, charged=False)
        waiting = [asyncio.create_task(limiter.admit(MODEL, 0, 1000)) for _ in range(2)]
        await asyncio.sleep(0.3)
        store.redis.delete(budget_key())
        started = time.monotonic()
        done = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        return done, time.monotonic() - started

    done, took = asyncio.run(go())
    assert all(a is not None for a in done)
    assert took < 3  # at once, then one second's worth later: not the old marks' 1 and 2 s and never
    assert bucket(store)["spent"] == 2000  # both are charged in the new budget


def test_every_wait_is_capped_even_when_the_level_never_comes(store, monkeypatch):
    import batchrun.state.limiter as limiter_module
    monkeypatch.setattr(limiter_module, "LAST_RESORT_S", 0.5, raising=False)
    limiter = limiter_for(store, tpm="60000", burst_seconds=1)

    async def go():
        first = await limiter.admit(MODEL, 0, 1000)
        await limiter.observe(MODEL, None, first, 0.01, input_tokens=0, output_tokens=0, charged=False)
        waiting = asyncio.create_task(limiter.admit(MODEL, 0, 1000))  # its turn: in 1 s
        await asyncio.sleep(0.1)
        store.redis.hset(budget_key(), "tok", "-1e12")  # a debt it would take a lifetime to pay
        started = time.monotonic()
        admission = await asyncio.wait_for(waiting, 10)
        return admission, time.monotonic() - started

    admission, took = asyncio.run(go())
    assert admission is not None and 1.0 <= took + 0.1 < 2.5  # its computed wait, plus the last resort


def test_what_a_runner_sent_since_its_last_report_is_not_given_back_if_it_dies(store):
    """A runner reported 20 reservations held, then sent them all (the server charged them). Its
    held entry follows within a moment, so release_held.lua has nothing of them to give back."""
    limiter = SharedLimiter(store, WorkerSettings(base_url=BASE_URL, api_key="sk-x"),
                            BatchOptions(limits=Limits.parse(tpm=["6000"])), token="r1")

    async def go():
        admissions = await asyncio.gather(*(limiter.admit(MODEL, 80, 20, wait_turn=False) for _ in range(20)))
        limiter.report_held()
        assert store.redis.hget(budget_key() + ":held", "r1").decode().startswith("20|2000|")
        for a in admissions:
            limiter.sent(MODEL, a)
        await asyncio.sleep(0.5)  # ... and the runner is killed here, before its next periodic report
    asyncio.run(go())
    assert store.redis.hget(budget_key() + ":held", "r1").decode().startswith("0|0|")


def test_a_runners_late_first_request_counts_again_as_a_request_too(store):
    limiter = limiter_for(store, rpm="60", tpm="600000", burst_seconds=0)  # one request a second

    async def go():
        first = await limiter.admit(MODEL, 0, 50)
        await asyncio.sleep(1.1)  # the client starts up; the budget refills its one request
        await limiter.observe(MODEL, None, first, 0.05, input_tokens=0, output_tokens=50, charged=True)
        nxt = await limiter.admit(MODEL, 0, 50, wait_turn=False)
        await limiter.drain()
        return nxt.wait
    # The first arrived with its answer: it took the request that had refilled; the next waits ~1 s.
    assert asyncio.run(go()) == pytest.approx(1.0, abs=0.15)


def test_batches_sharing_a_key_and_model_share_its_strictest_limit(store):
    """Two batches on one budget, --tpm 60000 and --tpm 6000: both keep to 6000 (the refill and the
    burst of the strictest that reserved in the last minute), not whichever reserved last."""
    loose = limiter_for(store, tpm="60000", burst_seconds=0)  # 1000 tokens/s alone
    strict = limiter_for(store, tpm="6000", burst_seconds=0)  # 100 tokens/s
    assert admit(strict, 0, 100).wait == 0
    # (±0.15: time passes between the calls on a loaded machine; the limits differ by 1 s each)
    assert admit(loose, 0, 100).wait == pytest.approx(1.0, abs=0.15)  # at 100 tokens/s, not 1000
    assert admit(strict, 0, 100).wait == pytest.approx(2.0, abs=0.15)
    assert describe_budgets(store)[0]["configured_tpm"] == 6000
    b = bucket(store)
    assert b["cfg_tpm"] == 6000
    # A batch with no limit of its own on that budget keeps to it too.
    assert admit(limiter_for(store, burst_seconds=0), 0, 100).wait == pytest.approx(3.0, abs=0.15)
    # Once the strict batch has not reserved for a minute, the loose one has its own limit again.
    store.redis.hset(budget_key(), "low_t_at", str(store.server_time_ms() - 61_000))
    store.redis.hset(budget_key(), "tok", "1000")
    assert admit(loose, 0, 1000).wait == 0 and admit(loose, 0, 1000).wait == pytest.approx(1.0, abs=0.15)


def test_reserve_answers_are_typed_reservations(store):
    from batchrun.state.limiter import Grant, Reservation

    limiter = limiter_for(store, tpm="6000", burst_seconds=0)  # 100 tokens/s, 100 at once
    flush = limiter._reserver(MODEL)
    fits, waits, never = flush([(0, 100, 0), (0, 100, 0), (0, 7_000, 0)])
    assert isinstance(fits, Reservation) and fits.grant is Grant.GRANTED and fits.wait_ms == 0
    assert waits.grant is Grant.GRANTED and 900 <= waits.wait_ms <= 1_000 and waits.charge == 100
    assert never.grant is Grant.NEVER_FITS  # more than a minute of --tpm 6000
