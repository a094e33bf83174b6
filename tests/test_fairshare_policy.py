"""policy/fairshare.py: priorities, the budget shares, when a runner yields, which batch goes next."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from batchrun.policy.fairshare import budget_shares, next_batch, parse_priority, should_yield, stored_priority

batch_ids = st.sampled_from(["a", "b", "c", "d", "e"])
weights = st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0])


@pytest.mark.parametrize("text, stored, weight", [("high", "high", 4.0), ("normal", "normal", 1.0), ("LOW", "low", 0.0),
                                                  (None, "normal", 1.0), ("2", "2", 2.0), (0.5, "0.5", 0.5)])
def test_priorities_parse(text, stored, weight):
    p = parse_priority(text)
    assert (p.text, p.weight) == (stored, weight)


@pytest.mark.parametrize("text, words", [("urgent", "is not high, normal, low or a weight"), ("0", "above 0"),
                                         ("-1", "above 0"), ("nan", "above 0"), ("1e9", "at most 1000")])
def test_bad_priorities_say_what_is_wanted(text, words):
    with pytest.raises(ValueError, match=words) as info:
        parse_priority(text)
    assert repr(text) in str(info.value)


def test_a_stored_priority_that_does_not_parse_counts_as_normal():
    assert stored_priority(b"urgent").text == "normal" and stored_priority(None).weight == 1.0


@given(st.dictionaries(batch_ids, weights, min_size=1))
def test_budget_shares_add_up_and_follow_the_weights(ws):
    shares = budget_shares(ws)
    assert set(shares) == set(ws)
    assert abs(sum(shares.values()) - 1) < 1e-9  # the whole budget is handed out, whoever is active
    nonlow = {b: w for b, w in ws.items() if w > 0}
    for b, w in ws.items():
        if nonlow:
            assert shares[b] == pytest.approx(w / sum(nonlow.values()))  # a low one gets what the others leave
        else:
            assert shares[b] == pytest.approx(1 / len(ws))


@given(weights.filter(lambda w: w > 0))
def test_a_batch_alone_gets_the_whole_budget(w):
    assert budget_shares({"a": w}) == {"a": 1.0}
    assert budget_shares({"a": 0.0}) == {"a": 1.0}


@given(st.dictionaries(batch_ids, weights, min_size=2), st.dictionaries(batch_ids, st.integers(0, 8)), st.data())
def test_the_next_batch_is_a_least_served_one_for_its_weight(ws, running, data):
    waiting = set(data.draw(st.lists(st.sampled_from(sorted(ws)), min_size=1, unique=True)))
    chosen = next_batch(waiting, ws, running, {})
    assert chosen in waiting
    if ws[chosen] == 0:
        assert all(ws[b] == 0 for b in waiting), "a low batch went before one that is not"
    else:
        load = running.get(chosen, 0) / ws[chosen]
        assert all(load <= running.get(b, 0) / ws[b] for b in waiting if ws[b] > 0)


def test_round_robin_between_equally_served_batches():
    assert next_batch({"a", "b"}, {}, {}, {"a": 10.0, "b": 5.0}) == "b"
    assert next_batch(set(), {}, {}, {}) is None


@given(st.dictionaries(batch_ids, weights, min_size=2), st.dictionaries(batch_ids, st.integers(0, 8)), batch_ids,
       st.data())
def test_a_runner_yields_only_to_a_batch_served_less_than_its_own(ws, running, own, data):
    ws = {**ws, own: ws.get(own, 1.0)}
    running = {**running, own: max(1, running.get(own, 0))}
    waiting = set(data.draw(st.lists(st.sampled_from(sorted(ws)), unique=True)))
    yields = should_yield(own, ws, running, waiting)
    others = waiting - {own}
    if not others:
        assert not yields
    elif ws[own] == 0 and any(ws[b] > 0 for b in others):
        assert yields  # low gives way to anyone who is not
    elif ws[own] > 0 and all(ws[b] == 0 for b in others):
        assert not yields  # nobody gives way to low
    if yields and ws[own] > 0:
        # the batch that gets the worker is no more served than the one that gives it, once it has let go
        # (not "after the switch": then with one worker a weighted batch never gave its turn)
        assert any(ws[b] > 0 and running.get(b, 0) / ws[b] <= (running[own] - 1) / ws[own] for b in others)


def test_two_workers_two_equal_batches_stay_put_and_one_worker_takes_turns():
    assert not should_yield("a", {}, {"a": 1, "b": 1}, {"b"})  # one each: nobody moves
    assert should_yield("a", {}, {"a": 2, "b": 0}, {"b"})  # the big batch gives one back
    assert should_yield("a", {}, {"a": 1}, {"b"})  # one worker: they take turns
    assert should_yield("a", {"a": 2.0, "b": 1.0}, {"a": 3}, {"b"})
    assert not should_yield("a", {"a": 2.0, "b": 1.0}, {"a": 2, "b": 1}, {"b"})  # 2:1 is its share
