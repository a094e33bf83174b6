"""A rerun's cache hits served at submit (ops/submit_cache.py): they end as cached results in the
submit's own step and never enter a shard, a lease or an upload; misses, in-batch twins and a
kill during a rerun still end every job exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.ops.submit import submit_file
from batchrun.policy.cache_entries import RequestKeys
from batchrun.settings import BatchOptions
from batchrun.state import keys
from batchrun.state.cache import CachePolicy, ResponseCache
from batchrun.text import decoded
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs

BASE = "http://answers.invalid/v1"  # where the workers would send: part of every key


def _answer(i: int) -> dict:
    return {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"stored {i}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}


def _seed(store, jobs: Path, which, base: str = BASE) -> dict[str, dict]:
    """Store an answer for the lines at indexes ``which``; returns custom_id -> its stored body."""
    cache = ResponseCache.for_store(store, "test")
    lines = read_lines(jobs)
    stored = {}
    for i in which:
        key = RequestKeys(base).key(lines[i])
        assert cache.store(key, 200, f"req_{i}", _answer(i), CachePolicy())
        stored[lines[i]["custom_id"]] = _answer(i)
    getattr(cache.storage, "flush", lambda: None)()  # (the file writes behind: read it from disk)
    return stored


def _todo_ids(store, bid: str) -> set[str]:
    n = int(store.meta(bid).get("shards") or 0)
    return {decoded(m) for s in range(n) for m in store.redis.zrange(keys.todo(bid, s), 0, -1)}


def _queued_shards(store) -> list[str]:
    return [j.description for j in store.queue.jobs if j.description.startswith("batchrun shard ")]


def test_the_submit_keys_a_request_as_a_runner_does():
    from batchrun.endpoints import Endpoint, cache_servers
    from batchrun.policy.cache_entries import cache_key, cache_server

    line = json.loads(_line("x", "hello"))
    assert RequestKeys("https://u:pw@API.example.com/v1/").key(line) == cache_key(
        "https://api.example.com/v1", line["url"], line["body"])
    eps = (Endpoint(name="a", base_url="http://a.invalid/v1", api_key_env="A"),
           Endpoint(name="b", base_url="http://b.invalid/v1", api_key_env="B"))
    assert RequestKeys(BASE, eps).key(line) == cache_key(BASE, line["url"], line["body"],
                                                         cache_server(cache_servers(eps, "gpt-4o-mini")))
    assert RequestKeys(BASE, eps).key(line) != RequestKeys(BASE).key(line)
    assert RequestKeys(BASE).key({**line, "batchrun": {"cache": False}}) is None


@pytest.mark.parametrize("via", ["live", "batch-api"])
def test_a_reruns_hits_end_at_submit_and_never_enter_a_shard(store, tmp_path, via):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 30)
    stored = _seed(store, jobs, range(20))
    rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=10, via=via), request_keys=RequestKeys(BASE))
    bid = rep.batch_id
    misses = {f"req-{i}" for i in range(20, 30)}
    assert (rep.served, rep.added, rep.total) == (20, 10, 30)
    assert {decoded(k) for k in store.redis.hkeys(keys.sub(bid, "req"))} == misses  # nothing else to lease or upload
    assert _todo_ids(store, bid) == misses
    meta = store.meta(bid)
    assert meta["shards"] == "1", "the hits took shard places"
    assert len(_queued_shards(store)) == (1 if via == "live" else 0)
    status = {decoded(k): decoded(v) for k, v in store.redis.hgetall(keys.sub(bid, "status")).items()}
    assert status == {cid: "R" for cid in stored}
    served = [json.loads(raw[1:]) for raw in store.results(bid, 0, 100)]
    assert {r["custom_id"]: r["response"]["body"] for r in served} == stored
    assert all(r["cached"] is True and r["error"] is None for r in served)
    assert [r["response"]["request_id"] for r in served] == [f"req_{i}" for i in range(20)]
    assert (meta["done"], meta["cache_hits"], meta.get("failed")) == ("20", "20", "0")
    assert float(meta["cache_saved"]) > 0
    assert float(meta.get("cost") or 0) == 0 and float(meta.get("cost_reserved") or 0) == 0
    assert meta["state"] == "running"

    # The same batch again, now that the cache holds the misses too: those are its jobs already
    # (still to send), and the hits ended: nothing is served or added twice.
    _seed(store, jobs, range(20, 30))
    again = submit_file(store, str(jobs), batch_id=bid, request_keys=RequestKeys(BASE))
    assert (again.served, again.added, again.total) == (0, 0, 30)
    assert store.results_length(bid) == 20 and _todo_ids(store, bid) == misses
    assert store.meta(bid)["cache_hits"] == "20"


def test_a_rerun_the_cache_answers_whole_finishes_at_submit_with_no_shard(store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 25)
    _seed(store, jobs, range(25))
    rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=10), request_keys=RequestKeys(BASE))
    meta = store.meta(rep.batch_id)
    assert (rep.served, rep.added, meta["state"]) == (25, 0, "finished")
    assert meta.get("finished_at") and int(meta["done"]) == int(meta["total"]) == 25
    assert _queued_shards(store) == [] and _todo_ids(store, rep.batch_id) == set()
    assert store.redis.hlen(keys.sub(rep.batch_id, "req")) == 0
    assert store.results_length(rep.batch_id) == 25


@pytest.mark.parametrize("how", ["submit", "no-cache", "refresh", "other-server", "opt-out"])
def test_lines_the_cache_must_not_answer_at_submit_are_loaded_as_jobs(store, tmp_path, how):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    _seed(store, jobs, range(6))
    if how == "opt-out":  # the same requests, each line asking not to be cached
        lines = read_lines(jobs)
        jobs.write_text("".join(json.dumps({**line, "batchrun": {"cache": False}}) + "\n" for line in lines))
    options = BatchOptions(cache=0 if how == "no-cache" else 1, cache_refresh=time.time() + 1 if how == "refresh" else 0)
    given = {"submit": None, "other-server": RequestKeys("http://elsewhere.invalid/v1")}.get(how, RequestKeys(BASE))
    rep = submit_file(store, str(jobs), options=options, request_keys=given)
    assert (rep.served, rep.added) == (0, 6)
    assert store.results_length(rep.batch_id) == 0 and len(_todo_ids(store, rep.batch_id)) == 6


def _env(server, **extra) -> dict:
    env = cli_env(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test", **extra)
    if "BATCHRUN_REDIS_URL" not in extra:
        env.pop("BATCHRUN_REDIS_URL", None)
    return env


def _cli(args, env, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _line(cid: str, content: str, **extra) -> str:
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}) + "\n"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def where(request):
    if request.param == "memory":
        return {}
    return {"BATCHRUN_REDIS_URL": request.getfixturevalue("real_redis_url")}


def test_a_rerun_with_hits_misses_and_twins_ends_each_job_once(where, tmp_path):
    first = tmp_path / "first.jsonl"
    first.write_text("".join(_line(f"old-{i}", f"old {i}") for i in range(12)))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(first.read_text()
                    + "".join(_line(f"again-{i}", f"old {i}") for i in range(4))  # other ids, stored bodies: hits
                    + "".join(_line(f"new-{i}-{t}", f"new {i}") for i in range(3) for t in "ab")  # twins, not stored
                    + _line("own", "old 0", batchrun={"cache": False}))  # opts out: sent although stored
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, **where)
        one = _cli(["run", str(first), "-o", str(tmp_path / "a.jsonl")], env)
        assert one.returncode == 0, one.stderr
        assert srv.stats()["requests"] == 12
        two = _cli(["run", str(jobs), "-o", str(tmp_path / "b.jsonl"), "--batch-id", "rerun", "--shard-size", "4"], env)
        assert two.returncode == 0, two.stderr
        assert srv.stats()["requests"] == 12 + 3 + 1  # one per new body, and the line that opts out
        if where:
            shown = _cli(["status", "rerun", "--json"], env)
            assert shown.returncode == 0, shown.stderr
            status = json.loads(shown.stdout)
            assert status["cache"]["hits"] == 16 + 3 and status["totals"]["requests"] == 4
            assert status["jobs"]["done"] == 23 and status["state"] == "finished"
    results, errors = check_exactly_once(jobs, tmp_path / "b.jsonl", tmp_path / "b.errors.jsonl")
    cached = {r["custom_id"]: bool(r.get("cached")) for r in results}
    assert all(cached[f"old-{i}"] for i in range(12)) and all(cached[f"again-{i}"] for i in range(4))
    assert not cached["own"]
    assert all(cached[f"new-{i}-a"] != cached[f"new-{i}-b"] for i in range(3))  # one sent, its twin took it
    assert "19 of them from the response cache" in two.stdout


def test_a_rerun_killed_with_misses_in_flight_resumes_each_job_once(spawn, tmp_path):
    first = write_jobs(tmp_path / "first.jsonl", 10)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 15)  # the first 10 are stored by the first run
    out = tmp_path / "out.jsonl"
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)
        assert _cli(["run", str(first), "-o", str(tmp_path / "a.jsonl")], env).returncode == 0
        srv.set_config(latency_ms=60_000)  # the misses hang
        rerun = spawn(batchrun_cmd("run", str(jobs), "-o", str(out)), env=env, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(read_lines(out)) < 10 or srv.stats()["requests"] < 15:  # hits written, misses on the wire
            assert rerun.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(rerun.pid, signal.SIGKILL)
        rerun.wait()
        assert {r["custom_id"] for r in read_lines(out)} == {f"req-{i}" for i in range(10)}
        srv.set_config(latency_ms=0)
        resumed = _cli(["resume", str(jobs), "-o", str(out)], env)
        assert resumed.returncode == 0, resumed.stderr
        assert srv.stats()["requests"] == 10 + 5 + 5  # no hit was ever sent again
    results, _ = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
    assert {r["custom_id"] for r in results if r.get("cached")} == {f"req-{i}" for i in range(10)}


def test_via_auto_splits_the_misses_not_the_total_with_the_hits(store, tmp_path):
    # (the split took the batch's total, hits included: 30 jobs, 18 of them live by the deadline,
    # so 12 went to the Batch API, all 10 misses, although every one could be sent live in time)
    from batchrun.remote.auto import split_once
    from batchrun.settings import Limits
    from batchrun.state.remote_parts import REMOTE_TOKEN

    jobs = write_jobs(tmp_path / "jobs.jsonl", 30)
    _seed(store, jobs, range(20))
    options = BatchOptions(shard_size=10, via="auto", deadline_seconds=60, limits=Limits({"*": {"rpm": 30}}))
    rep = submit_file(store, str(jobs), options=options, request_keys=RequestKeys(BASE))
    assert (rep.served, rep.added) == (20, 10)
    assert split_once(store, rep.batch_id, store.meta(rep.batch_id))
    meta = store.meta(rep.batch_id)
    assert (meta["auto_live"], meta["auto_remote"]) == ("10", "0")
    owners = [decoded(o) for o in store.redis.hvals(keys.sub(rep.batch_id, "owner"))]
    assert not [o for o in owners if o.startswith(REMOTE_TOKEN)], "misses that fit the deadline went remote"


def test_a_finished_batch_the_cache_ends_again_gets_a_new_finished_at(store, tmp_path):
    # (the submit kept the first finish's time: a batch that ran again showed when it ended before)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 12)
    first = write_jobs(tmp_path / "first.jsonl", 6)
    _seed(store, jobs, range(12))
    rep = submit_file(store, str(first), batch_id="again", request_keys=RequestKeys(BASE))
    assert store.meta("again")["state"] == "finished"
    store.redis.hset(keys.batch("again"), "finished_at", 1000)  # as if it ended long ago
    more = submit_file(store, str(jobs), batch_id="again", request_keys=RequestKeys(BASE))
    meta = store.meta("again")
    assert (rep.served, more.served, meta["state"], meta["done"], meta["total"]) == (6, 6, "finished", "12", "12")
    assert int(meta["finished_at"]) > time.time() - 60


def test_a_submit_does_not_finish_a_batch_another_submit_added_jobs_to_meanwhile(store, tmp_path, monkeypatch):
    # Two runs of one batch id at once: this one's lines all hits, the other's adding jobs between
    # this submit's read of the counts and its finish. The finish judged the old counts: the batch
    # ended with jobs never sent, and the other run's workers found it finished.
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    _seed(store, jobs, range(5))
    real_meta = store.meta

    def meta_then_another_submit(batch_id):
        seen = real_meta(batch_id)
        if seen.get("cache_hits") == "5" and not store.redis.hexists(keys.sub(batch_id, "req"), "other-0"):
            store.add_jobs(batch_id, [("other-0", 0, json.dumps(read_lines(jobs)[0]))])
        return seen

    monkeypatch.setattr(store, "meta", meta_then_another_submit)
    rep = submit_file(store, str(jobs), batch_id="both", request_keys=RequestKeys(BASE))
    monkeypatch.undo()
    meta = store.meta("both")
    assert rep.served == 5 and (meta["total"], meta["done"]) == ("6", "5")
    assert meta["state"] == "running", "finished with a job never sent"


def test_a_run_whose_follow_stops_before_another_worker_ends_the_batch_writes_its_last_outcomes(
        tmp_path, monkeypatch):
    # `run --batch-id` of a batch a `batchrun worker` elsewhere runs: this run's own workers found
    # nothing left to take and exited, so the follow stopped while the batch still ran; the other
    # worker ended it before the state was read again, and its last outcomes were never written
    # (exit 0, "32 result(s) written" of 50). Here the follow stops at once and the batch then ends.
    import batchrun
    from batchrun.api import batch as run_module

    def stops_and_then_it_ends(self):
        deadline = time.monotonic() + 20
        while self.store.meta(self.batch_id).get("state") != "finished" and time.monotonic() < deadline:
            time.sleep(0.02)
        return True

    monkeypatch.setattr(run_module._Run, "should_stop", stops_and_then_it_ends)
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))
    bodies = [{"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"last {i}"}]}
              for i in range(6)]
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        results = batchrun.run(bodies, base_url=srv.base_url, api_key="sk-test")
    assert [r.ok for r in results] == [True] * 6, [r.error for r in results if not r.ok]
