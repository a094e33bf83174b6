"""collect: outcome lines from Redis into the results and errors files (on fakeredis)."""

from __future__ import annotations

import json

import fakeredis

from batchrun.ops.collect import collect
from batchrun.files.outputs import error_line, read_custom_ids, result_line
from batchrun.state.store import BatchStore
from batchrun.ops.submit import submit_file


def _setup(tmp_path, n):
    store = BatchStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    jobs = tmp_path / "jobs.jsonl"
    ids = [f"j{i}" for i in range(n - 2)] + ['odd "quoted" \\ id', "\u00e9t\u00e9"]
    jobs.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "m", "messages": []}}) + "\n" for cid in ids))
    submit_file(store, jobs, batch_id="b")
    return store, ids


def test_collect_writes_each_outcome_once(tmp_path):
    store, ids = _setup(tmp_path, 12)
    lines = {}
    items = []
    for i, cid in enumerate(ids):
        if i % 4 == 3:
            line = error_line(cid, code="bad", message="no \u2603")
            items.append(("E", cid, json.dumps(line)))
        else:
            line = result_line(cid, status_code=200, request_id="r", body={"text": "caf\u00e9", "custom_id": "x"})
            items.append(("R", cid, json.dumps(line)))
        lines[cid] = line
    store.complete("b", items[:6])
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    first = collect(store, "b", str(out), on_note=lambda m: None)
    assert first.results_written + first.errors_written == 6
    store.complete("b", items[6:])
    second = collect(store, "b", str(out), on_note=lambda m: None)
    assert second.already_there == 6 and second.results_written + second.errors_written == len(ids) - 6
    assert second.finished
    written = [json.loads(x) for x in open(out)] + [json.loads(x) for x in open(err)]
    assert sorted(written, key=lambda r: r["custom_id"]) == sorted(lines.values(), key=lambda r: r["custom_id"])
    assert read_custom_ids(err) == {cid for i, cid in enumerate(ids) if i % 4 == 3}
    again = collect(store, "b", str(out), on_note=lambda m: None)
    assert again.results_written == again.errors_written == 0 and again.already_there == len(ids)


def test_collect_skips_what_the_files_already_hold(tmp_path):
    store, ids = _setup(tmp_path, 5)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(result_line(ids[0], status_code=200, request_id=None, body={})) + "\n")
    store.complete("b", [("R", cid, json.dumps(result_line(cid, status_code=200, request_id=None, body={})))
                         for cid in ids])
    report = collect(store, "b", str(out), on_note=lambda m: None)
    assert report.already_there == 1 and report.results_written == len(ids) - 1
    assert sorted(json.loads(x)["custom_id"] for x in open(out)) == sorted(ids)


def _line(kind: str, cid: str) -> tuple[str, str, str]:
    if kind == "E":
        return ("E", cid, json.dumps(error_line(cid, code="bad", message="no")))
    return ("R", cid, json.dumps(result_line(cid, status_code=200, request_id="r", body={"n": cid})))


def test_follow_rereads_the_outcome_list_after_a_redis_rollback(store, make_batch, tmp_path):
    """Every outcome that reached Redis reaches the files, even when Redis loses the list's tail
    (AOF tail loss, a failover to a replica behind) and other outcomes take those places."""
    from batchrun.state import keys

    ids = make_batch(store, "b", 10)
    store.complete("b", [_line("R", cid) for cid in ids[:6]])
    out = tmp_path / "out.jsonl"
    notes, polls = [], []

    def rollback_once(report) -> None:
        polls.append(report)
        if len(polls) != 1:
            return
        # The rollback: Redis forgets the last three outcomes, as if they had never been written...
        store.redis.ltrim(keys.sub("b", "results"), 0, 2)
        store.redis.hdel(keys.sub("b", "status"), *ids[3:6])
        store.redis.hset(keys.batch("b"), "done", 3)
        # ...then other jobs end first, and those three run again.
        store.complete("b", [_line("R", cid) for cid in ids[6:9]] + [_line("E", ids[9])])
        store.complete("b", [_line("R", cid) for cid in ids[3:6]])

    report = collect(store, "b", str(out), follow=True, poll=0.01, on_note=notes.append,
                     on_progress=rollback_once)
    assert report.finished
    written = sorted(read_custom_ids(out) | read_custom_ids(tmp_path / "out.errors.jsonl"))
    assert written == sorted(ids), f"missing: {sorted(set(ids) - set(written))}"
    assert any("reading it again from the start" in n for n in notes)
    assert len(open(out).readlines()) == 9  # nothing twice


def test_follow_notices_other_outcomes_where_it_had_read(store, make_batch, tmp_path):
    """After the rollback the list is as long as what was read, but other outcomes sit there."""
    from batchrun.state import keys

    ids = make_batch(store, "b", 6)
    store.complete("b", [_line("R", cid) for cid in ids[:4]])
    out = tmp_path / "out.jsonl"
    polls = []

    def rollback_once(report) -> None:
        polls.append(report)
        if len(polls) == 1:
            store.redis.ltrim(keys.sub("b", "results"), 0, 1)
            store.redis.hdel(keys.sub("b", "status"), *ids[2:4])
            store.redis.hset(keys.batch("b"), "done", 2)
            store.complete("b", [_line("R", cid) for cid in ids[4:6]])  # lands at places 2 and 3
        elif len(polls) == 2:
            store.complete("b", [_line("R", cid) for cid in ids[2:4]])

    assert collect(store, "b", str(out), follow=True, poll=0.01, on_note=lambda m: None,
                   on_progress=rollback_once).finished
    assert sorted(read_custom_ids(out)) == sorted(ids)


def test_collect_counts_the_outcomes_it_could_not_write_because_the_files_hold_others(tmp_path):
    """What is written must match what was paid for: an answer of this batch whose custom_id the
    file holds from another run is not written, and the report says so."""
    store, ids = _setup(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(result_line(ids[0], status_code=200, request_id=None, body={})) + "\n")
    store.complete("b", [_line("R", cid) for cid in ids])
    report = collect(store, "b", str(out), on_note=lambda m: None)
    assert (report.results_written, report.already_there, report.other_there) == (3, 1, 1)
    again = collect(store, "b", str(out), on_note=lambda m: None)  # its own lines: not counted as others
    assert (again.results_written, again.already_there, again.other_there) == (0, 4, 1)


def test_every_outcome_that_reached_redis_reaches_the_files_whatever_the_rollbacks(tmp_path_factory):
    """Property: jobs end in any order, Redis loses the tail of the outcome list at any moment
    (and the jobs whose outcomes it lost run again), while `collect --follow` polls; when the
    batch finishes, the files hold every job exactly once, and every outcome of the list."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from batchrun.state import keys
    from tests.conftest import make_batch

    ops = st.lists(st.tuples(st.sampled_from(["end", "rollback", "poll"]), st.integers(1, 6)), max_size=25)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=ops, order=st.randoms(use_true_random=False))
    def check(ops, order):
        store = BatchStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        ids = make_batch(store, "b", 12)
        pending = list(ids)
        order.shuffle(pending)
        listed: list[str] = []  # the custom_ids in the outcome list, in order
        todo = list(ops) + [("end", len(ids))]  # at last every job ends

        def end(k: int) -> None:
            batch = [pending.pop() for _ in range(min(k, len(pending)))]
            if batch:
                store.complete("b", [_line("E" if order.random() < 0.2 else "R", cid) for cid in batch])
                listed.extend(batch)

        def step(report) -> None:
            while todo:
                op, k = todo.pop(0)
                if op == "poll":
                    return
                if op == "end":
                    end(k)
                elif listed:  # a rollback: the last k outcomes are gone, their jobs run again
                    lost = listed[-k:]
                    del listed[-k:]
                    store.redis.ltrim(keys.sub("b", "results"), 0, len(listed) - 1)
                    store.redis.hdel(keys.sub("b", "status"), *lost)
                    # (done + failed is what ends the batch; how they split does not matter here)
                    store.redis.hset(keys.batch("b"), mapping={"done": len(listed), "failed": 0,
                                                               "state": "running"})
                    pending.extend(lost)
                    order.shuffle(pending)
                return

        out = tmp_path_factory.mktemp("c") / "out.jsonl"
        report = collect(store, "b", str(out), follow=True, poll=0, on_note=lambda m: None, on_progress=step)
        assert report.finished and not pending  # (what is left of todo came after the end)
        written = [json.loads(x)["custom_id"] for path in (out, out.parent / "out.errors.jsonl") for x in open(path)]
        assert len(written) == len(set(written)), "a job written twice"
        assert set(written) == set(ids)
        assert set(listed) <= set(written)

    check()


def test_follow_reads_again_soon_while_outcomes_land_and_backs_off_when_none_do(tmp_path, monkeypatch):
    import batchrun.ops.collect as collect_module

    store, ids = _setup(tmp_path, 6)
    items = [("R", cid, json.dumps(result_line(cid, status_code=200, request_id="r", body={}))) for cid in ids]
    store.complete("b", items[:3])
    waits = []

    def sleep(seconds):  # each wait of the collector: the rest lands after its third
        waits.append(seconds)
        if len(waits) == 3:
            store.complete("b", items[3:5])
        elif len(waits) == 4:
            store.complete("b", items[5:])

    monkeypatch.setattr(collect_module.time, "sleep", sleep)
    report = collect(store, "b", str(tmp_path / "out.jsonl"), follow=True, poll=5.0, on_note=lambda m: None)
    assert report.finished and report.results_written == len(ids)
    shortest = collect_module.FOLLOW_POLL_MIN
    assert waits == [shortest, shortest * 2, shortest * 4, shortest]


def test_poll_backoff_doubles_when_idle_up_to_its_longest_and_resets_on_outcomes():
    from batchrun.ops.collect import PollBackoff

    backoff = PollBackoff(0.1, 0.5)
    assert [backoff.after_read(found=False) for _ in range(4)] == [0.2, 0.4, 0.5, 0.5]
    assert backoff.after_read(found=True) == 0.1
    assert PollBackoff(1.0, 0.5).after_read(found=True) == 0.5  # never longer than the longest
