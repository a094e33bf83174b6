"""Wait times: Go durations, retry-after, the server's hint, backoff with jitter."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from batchrun.policy.backoff import (
    HINT_CEILING,
    JITTER_FLOOR,
    BackoffPolicy,
    backoff_delay,
    gave_up,
    hint_exceeds_cap,
    parse_duration,
    parse_retry_after,
    wait_hint,
)

NOW = 1_700_000_000.0

TPM_84MS = (
    "Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): "
    "Limit 200000, Used 195869, Requested 4412. Please try again in 84ms. "
    "Visit https://platform.openai.com/account/rate-limits to learn more."
)
RPM_4S = (
    "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
    "Limit 15, Used 15, Requested 1. Please try again in 4s. "
    "Visit https://platform.openai.com/account/rate-limits to learn more."
)
AZURE_7S = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 "
    "have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after "
    "7 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
    "increase the default rate limit."
)


# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("20ms", 0.020),
        ("84ms", 0.084),
        ("1s", 1.0),
        ("1.146s", 1.146),
        ("6.379s", 6.379),
        ("0.5s", 0.5),
        ("6m0s", 360.0),
        ("1m2.5s", 62.5),
        ("1h2m3s", 3723.0),
        ("2h", 7200.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),  # Go prints U+00B5
        ("250μs", 250e-6),  # U+03BC
        ("1500ns", 1.5e-6),
        ("1m500ms", 60.5),
        ("0s", 0.0),
        (" 6m0s ", 360.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["0", "-1", "-1s", "", "   ", "7", "1.5", "abc", "s", "1x", "1s garbage", "1 s", "inf", "nan", None],
)
def test_parse_duration_rejects_placeholders_and_garbage(text):
    assert parse_duration(text) is None


# --- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("7", 7.0),
        (" 20 ", 20.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),  # negative: no wait, not a parse error
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),  # already past
        ("Tue, 14 Nov 2023 22:14:20 GMT", 1_700_000_060.0 - NOW),
    ],
)
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "inf", "nan", "1e9999", "7s"])
def test_parse_retry_after_garbage(value):
    assert parse_retry_after(value, NOW) is None


# --- wait_hint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, message, limit_kind, expected",
    [
        # the message's own wait, in every shape seen
        ({}, TPM_84MS, None, 0.084),
        ({}, RPM_4S, None, 4.0),
        ({}, "... Please try again in 1m2.5s. Visit ...", None, 62.5),
        ({}, "... Please try again in 6.379s. Visit ...", None, 6.379),
        ({}, "... Please try again in 1.146s.", None, 1.146),
        ({}, AZURE_7S, None, 7.0),
        ({}, "Rate limit is exceeded. Try again in 1 second.", None, 1.0),
        ({}, "Please try again later.", None, None),
        # headers, any case
        ({"Retry-After": "3"}, None, None, 3.0),
        ({"RETRY-AFTER-MS": "1500"}, None, None, 1.5),
        ({"retry-after": formatdate(NOW + 12, usegmt=True)}, None, None, 12.0),
        # the largest explicit hint wins
        ({"retry-after-ms": "84", "retry-after": "1"}, TPM_84MS, None, 1.0),
        ({"Retry-After": "2"}, AZURE_7S, None, 7.0),
        # reset headers only for the limit that was hit, and only without anything explicit
        ({"X-RateLimit-Reset-Tokens": "6m0s", "x-ratelimit-reset-requests": "1s"}, None, "tokens", 360.0),
        ({"x-ratelimit-reset-tokens": "6m0s", "X-RateLimit-Reset-Requests": "1s"}, None, "requests", 1.0),
        ({"x-ratelimit-reset-tokens": "6m0s"}, None, None, None),
        ({"x-ratelimit-reset-tokens": "6m0s"}, TPM_84MS, "tokens", 0.084),
        ({"x-ratelimit-reset-tokens": "6m0s", "retry-after": "2"}, None, "tokens", 2.0),
        # Azure placeholders and zero waits mean nothing
        ({"x-ratelimit-reset-tokens": "-1"}, None, "tokens", None),
        ({"x-ratelimit-reset-tokens": "0"}, None, "tokens", None),
        ({"x-ratelimit-reset-tokens": "0s"}, None, "tokens", None),
        ({"retry-after": "0"}, None, None, None),
        ({"retry-after": "garbage", "retry-after-ms": "x"}, None, None, None),
        ({}, None, None, None),
        (None, "", None, None),
    ],
)
def test_wait_hint(headers, message, limit_kind, expected):
    hint = wait_hint(headers, message, now=NOW, limit_kind=limit_kind)
    if expected is None:
        assert hint is None
    else:
        assert hint == pytest.approx(expected)


def test_wait_hint_rejects_unknown_limit_kind():
    with pytest.raises(ValueError):
        wait_hint({}, None, now=NOW, limit_kind="rate_limit_tokens")


# --- BackoffPolicy / backoff_delay ----------------------------------------------------------

POLICY = BackoffPolicy()
SAMPLES = 2000


def _delays(attempt, hint, policy=POLICY, seed=1, n=SAMPLES):
    rng = random.Random(seed)
    return [backoff_delay(attempt, policy, hint, rng) for _ in range(n)]


def test_policy_defaults_and_validation():
    assert POLICY == BackoffPolicy(base=1.0, factor=2.0, cap=60.0, max_attempts=10)
    for bad in (dict(base=-1), dict(factor=0.5), dict(cap=0), dict(cap=float("inf")), dict(cap=float("nan")),
                dict(max_attempts=0)):
        with pytest.raises(ValueError):
            BackoffPolicy(**bad)


@pytest.mark.parametrize("attempt, ceiling", [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (10_000, 60.0)])
def test_full_jitter_without_hint_stays_within_ceiling(attempt, ceiling):
    delays = _delays(attempt, None)
    assert all(0.0 <= d <= ceiling for d in delays)
    # uniform over [0, ceiling]: mean near the middle, and it uses the whole range
    assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)
    assert min(delays) < 0.05 * ceiling and max(delays) > 0.95 * ceiling


def test_delay_grows_with_attempt():
    means = [sum(_delays(attempt, None)) / SAMPLES for attempt in range(1, 8)]
    assert means == sorted(means)
    assert means[-1] > 20 * means[0]


@pytest.mark.parametrize("hint", [0.001, 0.084, 1.146, 4.0, 59.99, 62.5, 360.0, 86400.0])
@pytest.mark.parametrize("attempt", [1, 3, 10])
def test_never_below_hint_up_to_the_cap_and_never_above_the_cap(hint, attempt):
    delays = _delays(attempt, hint)
    h = min(hint, POLICY.cap)  # a hint is honoured up to the cap, no further
    ceiling = min(POLICY.cap, POLICY.base * POLICY.factor ** (attempt - 1))
    spread = min(max(JITTER_FLOOR, 0.1 * h, ceiling / 4), POLICY.cap - h)
    assert all(h <= d <= h + spread for d in delays)
    assert max(delays) <= POLICY.cap
    if spread > 0:
        assert max(delays) - min(delays) > 0.9 * spread  # the jitter really spreads


def test_a_day_long_hint_waits_the_cap_not_a_day():
    assert backoff_delay(1, POLICY, 86400.0, random.Random(1)) == POLICY.cap
    assert backoff_delay(1, BackoffPolicy(cap=5.0), 6.0, random.Random(1)) == 5.0
    assert hint_exceeds_cap(86400.0, POLICY) and not hint_exceeds_cap(60.0, POLICY)
    assert not hint_exceeds_cap(None, POLICY) and not hint_exceeds_cap(float("nan"), POLICY)


def test_small_hint_stays_small():
    # an 84 ms hint on the first retry must not turn into seconds
    assert max(_delays(1, 0.084)) <= 0.084 + 0.25
    # and even after many failures it is at most hint + cap / 4
    assert max(_delays(50, 0.084)) <= 0.084 + POLICY.cap / 4


@pytest.mark.parametrize("hint", [0.001, 0.084, 4.0, 30.0])  # below the cap (a hint at the cap waits the cap)
def test_jitter_has_positive_width_even_for_tiny_hints(hint):
    tight = BackoffPolicy(base=0.0)  # no attempt-based spread at all: only the floor remains
    a = backoff_delay(1, tight, hint, random.Random(1))
    b = backoff_delay(1, tight, hint, random.Random(2))
    assert a != b
    assert min(a, b) >= hint
    a = backoff_delay(3, POLICY, hint, random.Random(1))
    b = backoff_delay(3, POLICY, hint, random.Random(2))
    assert a != b and min(a, b) >= hint


def test_workers_released_together_do_not_return_together():
    # 50 workers told "try again in 84ms": their retries spread over a window, not one instant
    delays = sorted(backoff_delay(1, POLICY, 0.084, random.Random(seed)) for seed in range(50))
    assert delays[0] >= 0.084
    assert delays[-1] - delays[0] > 0.15
    assert len(set(delays)) == 50


def test_deterministic_for_a_seed():
    assert _delays(4, 2.0, seed=42, n=20) == _delays(4, 2.0, seed=42, n=20)
    assert _delays(4, None, seed=42, n=20) == _delays(4, None, seed=42, n=20)


@pytest.mark.parametrize("hint", [0.0, -1.0, float("nan"), float("inf")])
def test_unusable_hint_falls_back_to_full_jitter(hint):
    assert _delays(2, hint, n=50) == _delays(2, None, n=50)


def test_attempt_counts_from_one():
    with pytest.raises(ValueError):
        backoff_delay(0, POLICY, None, random.Random(0))


# --- giving up on a server that does not answer -----------------------------------------------


def test_gave_up_counts_from_the_outage_or_the_last_resume_whichever_is_later():
    assert not gave_up(100_000, 0, 0, 5)  # the server is up
    assert not gave_up(104_999, 100_000, 0, 5)
    assert gave_up(105_000, 100_000, 0, 5)
    assert not gave_up(105_000, 100_000, 103_000, 5)  # resumed at 103 s: a full period again
    assert gave_up(108_000, 100_000, 103_000, 5)


# --- properties: every input gives a bounded wait, never an exception -------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_GO = st.from_regex(r"\A(?:\d{1,7}(?:\.\d{1,4})?(?:h|m|s|ms|us|µs|ns)){1,4}\Z")
_NUMBERS = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True).map(repr),
                     st.from_regex(r"\A\s*[+-]?\d{1,400}(?:\.\d{0,5})?\s*\Z"))
_DATES = st.one_of(st.integers(0, 253402300799).map(lambda t: formatdate(t, usegmt=True)),
                   st.from_regex(r"\A\w{3}, \d{1,2} \w{3} \d{1,5} \d{1,2}:\d{1,2}:\d{1,2} [A-Z+-]{1,5}\d{0,4}\Z"))
_VALUES = st.one_of(_GO, _NUMBERS, _DATES, st.text(max_size=60), st.just("-1"), st.just("0"))
_HEADER_NAMES = st.one_of(st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "RETRY-AFTER-MS",
                                           "x-ratelimit-reset-tokens", "X-RateLimit-Reset-Requests",
                                           "x-ratelimit-remaining-tokens"]), st.text(max_size=20))
_HEADERS = st.one_of(st.none(), st.dictionaries(_HEADER_NAMES, _VALUES, max_size=6))
_UNITS = st.sampled_from(["ms", "millisecond", "milliseconds", "second", "seconds", "sec", "secs", "minute",
                          "minutes", "min", "mins"])
_MESSAGES = st.one_of(
    st.none(), st.text(max_size=200),
    _GO.map(lambda d: f"Rate limit reached ... on tokens per min (TPM). Please try again in {d}. Visit ..."),
    st.tuples(st.from_regex(r"\A\d{1,400}(?:\.\d{1,5})?\Z"), _UNITS).map(
        lambda p: f"Please retry after {p[0]} {p[1]}."),
    st.tuples(st.text(max_size=50), _GO, st.text(max_size=50)).map(lambda p: f"{p[0]}try again in {p[1]}{p[2]}"),
)
_POLICIES = st.builds(BackoffPolicy, base=st.floats(0, 1e6), factor=st.floats(1, 1e3),
                      cap=st.floats(1e-3, 1e7), max_attempts=st.integers(1, 1000))
_ATTEMPTS = st.integers(1, 10**9)
_NOW = st.floats(0, 4e9)
_HINTS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)  # a loaded CI machine is slow, not wrong
@given(headers=_HEADERS, message=_MESSAGES, now=_NOW, kind=st.sampled_from([None, "tokens", "requests"]))
def test_any_headers_and_message_give_no_hint_or_a_positive_finite_one(headers, message, now, kind):
    hint = wait_hint(headers, message, now=now, limit_kind=kind)
    assert hint is None or (0 < hint <= HINT_CEILING)


@settings(deadline=None)
@given(text=st.one_of(_VALUES, st.text()), now=_NOW)
def test_parsers_never_raise(text, now):
    d = parse_duration(text)
    assert d is None or 0 <= d < float("inf")
    r = parse_retry_after(text, now)
    assert r is None or 0 <= r < float("inf")


@settings(max_examples=300, deadline=None)  # a loaded CI machine is slow, not wrong
@given(headers=_HEADERS, message=_MESSAGES, now=_NOW, attempt=_ATTEMPTS, policy=_POLICIES,
       seed=st.integers(0, 2**32))
def test_the_wait_for_any_answer_is_within_zero_and_the_cap(headers, message, now, attempt, policy, seed):
    hint = wait_hint(headers, message, now=now, limit_kind="tokens")
    delay = backoff_delay(attempt, policy, hint, random.Random(seed))
    assert 0 <= delay <= policy.cap
    if hint is not None:
        assert delay >= min(hint, policy.cap)  # the hint is honoured, up to the cap


@settings(max_examples=300, deadline=None)  # a loaded CI machine is slow, not wrong
@given(hint=_HINTS, attempt=_ATTEMPTS, policy=_POLICIES, seed=st.integers(0, 2**32))
def test_jitter_stays_within_its_documented_bounds(hint, attempt, policy, seed):
    delay = backoff_delay(attempt, policy, hint, random.Random(seed))
    ceiling = policy.ceiling(attempt)
    assert 0 <= delay <= policy.cap
    if hint is None or not (0 < hint < float("inf")):  # no usable hint: full jitter
        assert delay <= ceiling
        return
    h = min(hint, policy.cap)
    spread = min(max(JITTER_FLOOR, 0.1 * h, ceiling / 4), policy.cap - h)
    assert h <= delay <= h + spread * (1 + 1e-9) + 1e-12


@settings(deadline=None)
@given(now=st.floats(0, 1e13), down=st.floats(0, 1e13), resumed=st.floats(0, 1e13),
       give_up=st.floats(0, 86400), later=st.floats(0, 1e7))
def test_giving_up_only_after_the_full_period_and_then_for_good(now, down, resumed, give_up, later):
    if gave_up(now, down, resumed, give_up):
        assert down > 0 and give_up > 0 and now - max(down, resumed) >= give_up * 1000
        assert gave_up(now + later, down, resumed, give_up)  # time only makes it truer
    assert not gave_up(now, 0, resumed, give_up)


def test_a_wait_too_long_for_a_float_is_longer_than_any_cap():
    """Review finding 6: 400 digits are no reason to retry at once; they ask for longer than any cap."""
    policy = BackoffPolicy(cap=86_400)
    for headers, message in (({}, "Please retry after " + "9" * 400 + " seconds."),
                             ({}, "Please try again in " + "9" * 400 + "s."),
                             ({"retry-after-ms": "9" * 400}, None), ({"retry-after": "9" * 400}, None),
                             ({"retry-after": "1" + "0" * 30}, None)):
        hint = wait_hint(headers, message, now=NOW)
        assert hint == HINT_CEILING and hint_exceeds_cap(hint, policy), (headers, message)


def test_a_header_sent_twice_gives_its_longest_wait():
    """Review finding 6: httpx joins a duplicated header as "120, 120"; aiohttp gives both lines."""
    from multidict import CIMultiDict

    assert wait_hint({"retry-after": "120, 120"}, None, now=NOW) == 120
    assert wait_hint({"retry-after": "5, 120, junk"}, None, now=NOW) == 120
    assert wait_hint(CIMultiDict([("retry-after", "3"), ("Retry-After", "120")]), None, now=NOW) == 120
    assert wait_hint({"retry-after-ms": "100, 2500"}, None, now=NOW) == 2.5
    date = formatdate(NOW + 300, usegmt=True)  # "Wed, 21 Oct 2015 07:28:00 GMT": its comma is its own
    assert wait_hint({"retry-after": date}, None, now=NOW) == pytest.approx(300)
    assert wait_hint({"retry-after": f"{date}, 7"}, None, now=NOW) == pytest.approx(300)
    assert wait_hint({"retry-after": f"7, {formatdate(NOW + 900, usegmt=True)}, {date}"}, None,
                     now=NOW) == pytest.approx(900)
    assert wait_hint({"retry-after": "Wed, junk"}, None, now=NOW) is None


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_VALUES, min_size=1, max_size=4), now=_NOW)
def test_a_header_sent_several_times_waits_at_least_as_long_as_each_of_its_values(values, now):
    joined = wait_hint({"retry-after": ", ".join(values)}, None, now=now)
    assert joined is None or 0 < joined <= HINT_CEILING
    for value in values:
        alone = wait_hint({"retry-after": value}, None, now=now)
        if alone is not None and "," not in value:
            assert joined is not None and joined >= alone


@settings(max_examples=200, deadline=None)
@given(digits=st.integers(309, 2000), unit=st.sampled_from(["s", "ms", "m"]))
def test_an_overflowing_wait_is_the_ceiling_not_no_hint(digits, unit):
    assert wait_hint({}, f"Please try again in {'9' * digits}{unit}.", now=NOW) == HINT_CEILING
