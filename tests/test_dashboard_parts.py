"""The dashboard's parts on fakeredis and the real Redis: the per-budget counters the runners report
(names, metrics.lua's totals), the hour of history from the 5-second buckets (closed ones read
once), the error tally (read as the outcome list grows), the actions, the token rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.dashboard import history as hist
from batchrun.dashboard.actions import Action, ActionRefused, act
from batchrun.dashboard.errors import ErrorTally
from batchrun.dashboard.server import DashboardSetupError, check_setup, is_loopback
from batchrun.dashboard.snapshot import Dashboard
from batchrun.state import keys
from batchrun.state.counters import (STATUS_CLASSES, batch_totals, counter_names, parse_counter, read_buckets,
                                     status_class)
from batchrun.state.states import BatchState, PauseKind

BUDGET = keys.budget(keys.budget_id("http://h/v1", "fp123", "gpt-4o-mini"))

models = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@given(models, st.sampled_from(STATUS_CLASSES))
def test_every_counter_name_reads_back_as_its_budget(model, cls):
    key = keys.budget(keys.budget_id("https://api.example/v1", "abcdef", model))
    names = counter_names(key)
    assert parse_counter(names.via) == ("via", "", key)
    assert parse_counter(names.tokens) == ("tok", "", key)
    assert parse_counter(names.rate_limited) == ("rl", "", key)
    assert parse_counter(names.by_class[cls]) == ("sc", cls, key)
    assert keys.split_budget(parse_counter(names.by_class[cls]).budget_key).model == model


@pytest.mark.parametrize("name", ["requests", "requests:gpt-4o", "charged:m", "via:other", "sc:7xx:" + BUDGET, "ended"])
def test_other_names_are_not_budget_counters(name):
    assert parse_counter(name) is None


@given(st.one_of(st.none(), st.integers(min_value=100, max_value=599)))
def test_every_status_code_has_a_class(code):
    cls = status_class(code)
    assert cls in STATUS_CLASSES
    assert cls == ("error" if code is None or code // 100 in (1, 3) else f"{code // 100}xx")


def test_metrics_keeps_running_totals_of_the_named_counts_and_an_hour_of_buckets(store, make_batch):
    make_batch(store, "b", 3)
    names = counter_names(BUDGET)
    for _ in range(2):
        store.add_metrics("b", {"requests": 2, names.via: 2, names.by_class["2xx"]: 1, names.by_class["5xx"]: 1,
                                names.tokens: 90, "requests:gpt-4o-mini": 2})
    [totals] = batch_totals(store.redis, ["b"])
    assert totals == {names.via: 4, names.by_class["2xx"]: 2, names.by_class["5xx"]: 2, names.tokens: 180,
                      "requests:gpt-4o-mini": 4}
    assert store.batch_meta("b").n_requests == 4  # the plain names stay in the batch hash, as before
    bucket = store.server_time_ms() // 5000
    ttl = store.redis.ttl(keys.metrics_bucket("b", bucket))
    assert 3600 < ttl <= 3900
    assert keys.sub("b", "counts") in store.batch_keys("b")  # expired and purged with the batch
    store.purge("b")
    assert not store.redis.exists(keys.sub("b", "counts"))


def test_read_buckets_answers_every_batch_and_bucket(store, make_batch):
    make_batch(store, "a", 1)
    store.add_metrics("a", {"ended": 3})
    now = store.server_time_ms() // 5000
    got = read_buckets(store.redis, ["a", "gone"], [now - 1, now])
    assert got == {"a": [{}, {"ended": 3}], "gone": [{}, {}]} or got["a"][0] == {"ended": 3}  # a bucket edge


def test_minute_series_sum_buckets_into_minutes_and_budgets():
    names = counter_names(BUDGET)
    first = 1000 * hist.MINUTE_BUCKETS
    buckets = {b: {} for b in range(first, first + hist.MINUTES * hist.MINUTE_BUCKETS)}
    buckets[first] = {"x": {"requests": 2, "ended": 1, names.via: 2, names.tokens: 50, "retries": 1}}
    buckets[first + 1] = {"x": {"requests": 1, names.via: 1, names.rate_limited: 1, "rate_limited": 1},
                          "y": {names.via: 5}}
    last = max(buckets)
    buckets[last] = {"y": {names.via: 7, "requests": 7}}
    by_budget, by_batch = hist.minute_series(buckets)
    series = by_budget[BUDGET].to_dict()
    assert len(series["minutes"]) == 60 and series["minutes"][1] - series["minutes"][0] == 60
    assert series["requests"][0] == 8 and series["requests"][-1] == 7 and sum(series["requests"]) == 15
    assert series["tokens"][0] == 50 and series["rate_limited"][0] == 1 and series["retries"][0] == 1
    assert by_batch["x"].to_dict()["requests"][0] == 3 and by_batch["x"].to_dict()["ended"][0] == 1
    assert by_batch["y"].to_dict()["requests"][-1] == 7


def test_closed_buckets_are_read_once(store, make_batch):
    make_batch(store, "a", 1)
    history = hist.BucketHistory()
    now_ms = store.server_time_ms()
    reads = []
    real = hist.read_buckets

    def counting(redis, ids, buckets):
        reads.append(len(buckets))
        return real(redis, ids, buckets)

    hist.read_buckets = counting
    try:
        first = history.buckets(store, ["a"], now_ms)
        history.buckets(store, ["a"], now_ms)
    finally:
        hist.read_buckets = real
    assert len(first) == hist.MINUTES * hist.MINUTE_BUCKETS - (hist.MINUTE_BUCKETS - 1 - (now_ms // 5000) % 12)
    assert reads[0] == len(first) and reads[1] == hist.OPEN_BUCKETS + 1


def _error(store, batch_id: str, cid: str, code: str, message: str) -> None:
    line = {"custom_id": cid, "response": {"status_code": 500, "body": {}}, "error": {"code": code, "message": message}}
    store.redis.rpush(keys.sub(batch_id, "results"), b"E" + json.dumps(line).encode())


def test_errors_are_grouped_by_code_and_read_as_the_list_grows(store, make_batch):
    make_batch(store, "a", 1)
    make_batch(store, "b", 1)
    store.redis.rpush(keys.sub("a", "results"), b'R{"custom_id": "ok"}')
    _error(store, "a", "j1", "server_error", "the server broke")
    _error(store, "b", "j2", "server_error", "again")
    tally = ErrorTally()
    tally.refresh(store, ["a", "b"])
    [group] = tally.groups()
    assert group["count"] == 2 and group["sample_message"] == "the server broke" and group["status_code"] == 500
    assert group["batches"] == {"a": 1, "b": 1}
    _error(store, "a", "j3", "invalid_request", "bad")
    tally.refresh(store, ["a", "b"])
    assert [(g["code"], g["count"]) for g in tally.groups()] == [("server_error", 2), ("invalid_request", 1)]
    assert [(g["code"], g["count"]) for g in tally.groups("b")] == [("server_error", 1)]
    tally.refresh(store, ["a", "b"])  # nothing new: counted once
    assert sum(g["count"] for g in tally.groups()) == 3


def test_a_long_outcome_list_is_read_from_its_last_lines(store, make_batch, monkeypatch):
    from batchrun.dashboard import errors

    monkeypatch.setattr(errors, "FIRST_LOOK", 3)
    make_batch(store, "a", 1)
    for i in range(10):
        _error(store, "a", f"j{i}", "server_error", f"m{i}")
    tally = ErrorTally()
    tally.refresh(store, ["a"])
    assert tally.groups()[0]["count"] == 3 and tally.skipped == {"a": 7}


def test_actions_change_the_state_or_say_why_not(store, make_batch):
    make_batch(store, "a", 2)
    with pytest.raises(ActionRefused, match="not paused"):
        act(store, "a", Action.RESUME)
    assert "paused" in act(store, "a", Action.PAUSE) and store.batch_meta("a").state is BatchState.PAUSED
    assert "resumed" in act(store, "a", Action.RESUME) and store.batch_meta("a").state is BatchState.RUNNING
    store.set_state("a", BatchState.PAUSED, "cap", pause_kind=PauseKind.COST_CAP)
    with pytest.raises(ActionRefused, match="--max-cost"):
        act(store, "a", Action.RESUME)
    assert "cancelled" in act(store, "a", Action.CANCEL)
    with pytest.raises(ActionRefused, match="ended already"):
        act(store, "a", Action.CANCEL)
    with pytest.raises(LookupError):
        act(store, "nope", Action.PAUSE)


def test_the_overview_of_a_redis_without_batches_and_with_one(store, make_batch):
    dash = Dashboard(store)
    empty = dash.overview()
    assert (empty["batches"], empty["budgets"], empty["workers"], empty["errors"]) == ([], [], [], [])
    make_batch(store, "a", 4)
    store.add_metrics("a", {"requests": 1, "ended": 1, counter_names(BUDGET).via: 1})
    over = dash.overview()
    [row] = over["batches"]
    assert row["batch_id"] == "a" and row["jobs"]["total"] == 4 and row["history"]["requests"][-1] == 1
    page = dash.batch_page("a")
    assert page["status"]["batch_id"] == "a" and page["most_retried"] == []
    with pytest.raises(LookupError):
        dash.batch_page("nope")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("[::1]", True), ("127.0.0.2", True), ("0.0.0.0", False),
                                            ("10.0.0.1", False), ("example.com", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback
    if loopback:
        check_setup(host, None)
    else:
        with pytest.raises(DashboardSetupError, match="--token"):
            check_setup(host, None)
        check_setup(host, "x" * 16)


def test_a_batch_made_again_is_tallied_afresh(store, make_batch):
    make_batch(store, "a", 1)
    for i in range(3):
        _error(store, "a", f"j{i}", "server_error", "m")
    tally = ErrorTally()
    tally.refresh(store, ["a"])
    assert tally.groups()[0]["count"] == 3
    store.purge("a")
    make_batch(store, "a", 1)
    _error(store, "a", "k", "timeout", "slow")
    tally.refresh(store, ["a"])  # its list is shorter than what was read: a new batch of that name
    assert [(g["code"], g["count"]) for g in tally.groups()] == [("timeout", 1)]


def test_error_codes_past_the_cap_are_counted_as_other(store, make_batch, monkeypatch):
    from batchrun.dashboard import errors

    monkeypatch.setattr(errors, "MAX_GROUPS", 2)
    make_batch(store, "a", 1)
    for i in range(5):
        _error(store, "a", f"j{i}", f"code{i}", "m")
    tally = ErrorTally()
    tally.refresh(store, ["a"])
    assert {g["code"]: g["count"] for g in tally.groups()} == {"code0": 1, "code1": 1, "other": 3}
