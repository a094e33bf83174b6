"""--via batch-api against a hostile Batch API (tests/hostile.py): what the upstream does that our
mock does not (a create answered 5xx after it created the batch, uploads that keep failing), and
the batch's own promises (the spending cap, shared by live and remote) with remote batches."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest
import redis

from batchrun.ops.submit import submit_file
from batchrun.policy.pricing import PriceTable, batch_price, cost_of_usage
from batchrun.remote.client import RemoteClient
from batchrun.remote.runner import RemoteRunner
from batchrun.settings import BatchOptions
from batchrun.state.remote_parts import PartState, RemoteParts
from batchrun.state.store import BatchStore
from tests.helpers import batchrun_cmd, cli_env, read_lines, write_jobs
from tests.hostile import HostileServer, Reply, Seen, error_body

pytestmark = pytest.mark.redis


@pytest.fixture
def real_store(real_redis_url):
    conn = redis.Redis.from_url(real_redis_url)
    yield BatchStore(conn)
    conn.close()


class FakeBatchApi:
    """A Batch API whose answers a test bends: every create makes a batch upstream, and the first
    ``create_5xx`` creates answer 500 all the same (the answer lost, the batch made); uploads
    answer ``upload_status`` (200: a file)."""

    def __init__(self, create_5xx: int = 0, upload_status: int = 200, create_seconds: float = 0.0):
        self.create_5xx, self.upload_status, self.create_seconds = create_5xx, upload_status, create_seconds
        self.batches: list[dict] = []
        self.creates = self.uploads = 0
        self.lock = threading.Lock()

    def __call__(self, seen: Seen) -> Reply:
        with self.lock:
            return self._answer(seen)

    def _answer(self, seen: Seen) -> Reply:
        if seen.method == "POST" and seen.path == "/v1/files":
            self.uploads += 1
            if self.upload_status != 200:
                return Reply(self.upload_status, body=error_body("upstream trouble", "server_error"))
            return Reply(200, body={"id": f"file-{self.uploads}", "object": "file", "bytes": 10, "created_at": 1,
                                    "filename": "x.jsonl", "purpose": "batch", "status": "processed"})
        if seen.method == "POST" and seen.path == "/v1/batches":
            self.creates += 1
            body = seen.body
            batch = {"id": f"batch_{self.creates}", "object": "batch", "endpoint": body["endpoint"],
                     "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "in_progress",
                     "created_at": 1, "metadata": body.get("metadata"),
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            batch["_listed_at"] = time.time() + self.create_seconds  # a slow create: listed once it answers
            self.batches.insert(0, batch)  # newest first, as the list answers
            if self.creates <= self.create_5xx:
                return Reply(500, body=error_body("The server had an error", "server_error"))
            return Reply(200, body=batch, delay=self.create_seconds)
        if seen.method == "GET" and seen.path == "/v1/batches":
            listed = [b for b in self.batches if b["_listed_at"] <= time.time()]
            return Reply(200, body={"object": "list", "data": listed, "has_more": False})
        if seen.method == "GET" and seen.path.startswith("/v1/batches/"):
            bid = seen.path.rsplit("/", 1)[1]
            return Reply(200, body=next(b for b in self.batches if b["id"] == bid))
        return Reply(404, body=error_body("no such path", "invalid_request_error"))


def _drive(store, batch_id, srv, seconds):
    runner = RemoteRunner(store, batch_id, RemoteClient(srv.base_url, "sk-test"), max_seconds=seconds, poll_cap=0.3)
    return runner.run()


def test_a_create_answered_5xx_after_it_created_the_batch_is_not_sent_again(real_store, tmp_path):
    # The upstream made the batch and its answer was a 500 (or lost): sending the create again
    # makes a second remote batch of the same jobs, billed twice. The runner must look it up by
    # its metadata instead (the SDK's own retries must not re-send it).
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    api = FakeBatchApi(create_5xx=1)
    with HostileServer(api) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        _drive(real_store, report.batch_id, srv, seconds=4)
    assert api.creates == 1, f"{api.creates} remote batches created for one part"
    [part] = RemoteParts(real_store.redis).parts(report.batch_id)
    assert (part.state, part.remote_id) == (PartState.RUNNING, "batch_1")


def _cli(args, env, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_via_auto_live_and_remote_share_one_spending_cap(tmp_path):
    # (the remote batches used to be uploaded whole and billed past the cap: $0.0094 of $0.0002;
    # so the cap was refused with them. Now both draw on it.)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20, max_tokens=200)
    out = tmp_path / "out.jsonl"
    done = _cli(["run", str(jobs), "-o", str(out), "--mock", "--via", "auto", "--deadline", "60s", "--rpm", "20",
                 "--max-cost", "0.0009"], cli_env())
    assert done.returncode == 4, done.stdout + done.stderr  # paused at the cap
    assert "through the Batch API" in done.stderr and "past its --max-cost of $0.0009" in done.stderr
    results = read_lines(out)
    assert 0 < len(results) < 20
    usage = [r["response"]["body"]["usage"] for r in results]
    price = PriceTable.load().price_for("gpt-4o-mini")
    low = sum(cost_of_usage(batch_price(price), u) for u in usage)  # every answer at the Batch API price...
    high = sum(cost_of_usage(price, u) for u in usage)  # ... or every one live
    spent = float(re.search(r"this run spent \$([0-9.]+)", done.stderr).group(1))
    assert low - 0.00005 <= spent <= min(high, 0.0009) + 0.00005  # (as printed, to $0.0001)
    assert low <= 0.0009


def test_resume_gives_a_batch_api_batch_a_cap(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    assert _cli(["submit", str(jobs), "--batch-id", "capb", "--via", "batch-api"], env).returncode == 0
    done = _cli(["resume", "capb", "--max-cost", "5"], env)
    assert done.returncode == 0 and "spending cap now $5" in done.stdout, done.stdout + done.stderr
    assert float(redis.Redis.from_url(real_redis_url).hget("batchrun:batch:capb", "max_cost")) == 5.0


def test_an_upload_that_keeps_failing_pauses_the_batch_after_give_up_after(real_store, tmp_path):
    # /v1/files answering 500 for ever was tried again at every poll, for ever: the batch never
    # ended and nobody was told. Like a live server that is down, it pauses after --give-up-after.
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    api = FakeBatchApi(upload_status=500)
    with HostileServer(api) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", give_up_seconds=2))
        started = time.monotonic()
        out = _drive(real_store, report.batch_id, srv, seconds=60)
        took = time.monotonic() - started
    meta = real_store.meta(report.batch_id)
    assert meta["state"] == "paused", meta
    assert out["again"] is False and took < 50  # the runner ends: nothing of the batch is upstream
    assert "uploading the input file" in meta.get("reason", "") and "--give-up-after" in meta.get("reason", "")
    assert f"batchrun resume {report.batch_id}" in meta.get("reason", "")
    assert api.creates == 0 and real_store.meta(report.batch_id)["done"] == "0"
    api.upload_status = 200  # the upstream is back; resumed, the batch goes out (not paused again at once)
    with HostileServer(api) as srv:
        real_store.resume(report.batch_id)
        _drive(real_store, report.batch_id, srv, seconds=3)
    [part] = RemoteParts(real_store.redis).parts(report.batch_id)
    assert real_store.meta(report.batch_id)["state"] == "running" and part.state is PartState.RUNNING
    assert api.creates == 1


def test_a_runner_in_a_slow_create_keeps_its_lock_so_no_second_runner_creates_again(real_store, tmp_path,
                                                                                      monkeypatch):
    # A call may take up to its 120 s timeout (a 200 MB upload, a slow create), longer than the
    # 60 s lock renewed between calls: the lock lapsed, maintenance queued a second runner, which
    # found no batch by its metadata yet (the create still in flight) and created another one.
    from batchrun.remote import runner as runner_module

    monkeypatch.setattr(runner_module, "LOCK_MS", 1000)  # the create takes 3 lock lengths
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    api = FakeBatchApi(create_seconds=3.0)
    with HostileServer(api) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        first = threading.Thread(target=_drive, args=(real_store, report.batch_id, srv, 6), daemon=True)
        first.start()
        deadline = time.monotonic() + 30
        while api.creates == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the first runner is inside its create, past its lock's length
        second = _drive(real_store, report.batch_id, srv, 3)
        first.join(30)
    assert "another runner" in second.get("left", ""), second
    assert api.creates == 1, f"{api.creates} remote batches created for one part"


class Killed(BaseException):
    """The runner's process dies here (no except clause of the runner catches it)."""


def test_a_runner_killed_after_making_a_resend_batch_does_not_make_it_twice(real_store, tmp_path):
    # The resend part was saved, the collected part not yet marked done: the next runner collected
    # it again and made a second resend batch of the same lines, each sent (and billed) twice.
    from batchrun.mock import MockServerThread

    jobs = write_jobs(tmp_path / "jobs.jsonl", 60)
    with MockServerThread(batch_seconds=0.3, batch_error_rate=0.3, seed=1) as srv:
        options = BatchOptions(via="batch-api", resend_via="batch-api", max_attempts=20)
        report = submit_file(real_store, str(jobs), options=options)
        bid = report.batch_id
        client = RemoteClient(srv.base_url, "sk-test")
        first = RemoteRunner(real_store, bid, client, max_seconds=60, poll_cap=0.3)
        save = first._save

        def save_then_die(parts, ids=None):
            save(parts, ids)
            if any(p.resend for p in parts):
                raise Killed()

        first._save = save_then_die
        with pytest.raises(Killed):
            first.run()
        real_store.redis.delete(f"batchrun:batch:{bid}:rlock")  # its lock lapsed
        RemoteRunner(real_store, bid, client, max_seconds=120, poll_cap=0.3).run()
    store_parts = RemoteParts(real_store.redis)
    id_sets = [tuple(sorted(store_parts.ids(bid, p.no))) for p in store_parts.parts(bid) if p.resend]
    # (a later round resends a subset of the one before: the same lines twice is one part made twice)
    assert id_sets and len(id_sets) == len(set(id_sets)), [len(s) for s in id_sets]
    assert real_store.meta(bid)["done"] == "60"


def test_a_refused_key_pauses_the_batch_with_a_sentence_and_never_reaches_redis(real_store, tmp_path):
    # A 401 on the upload ended every job as an error (a worker with a wrong OPENAI_API_KEY turned
    # a whole batch into errors); live sending pauses the batch, since every job would fail alike.
    key = "sk-proj-Secret0123456789abcdefXYZ"

    def script(seen: Seen) -> Reply:
        return Reply(401, body=error_body(f"Incorrect API key provided: {key}. You can find your API key at "
                                          "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                                          "invalid_api_key"))

    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    with HostileServer(script) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        RemoteRunner(real_store, report.batch_id, RemoteClient(srv.base_url, key), max_seconds=20, poll_cap=0.3).run()
        assert all(s.headers.get("Authorization") == f"Bearer {key}" for s in srv.requests)
    meta = real_store.meta(report.batch_id)
    assert (meta["state"], meta["failed"], meta["done"]) == ("paused", "0", "0"), meta
    assert "API key was refused" in meta["reason"] and f"batchrun resume {report.batch_id}" in meta["reason"]
    r = real_store.redis
    for k in r.scan_iter("batchrun:*"):
        kind = r.type(k)
        dump = {b"hash": lambda: r.hgetall(k), b"string": lambda: r.get(k), b"list": lambda: r.lrange(k, 0, -1),
                b"set": lambda: r.smembers(k), b"zset": lambda: r.zrange(k, 0, -1)}.get(kind, lambda: b"")()
        assert "Secret0123456789" not in repr(dump), k


def test_a_key_not_shaped_like_sk_echoed_by_a_refusal_never_reaches_redis(real_store, tmp_path):
    # A self-hosted endpoint's token (no sk- prefix), echoed bare by the server refusing the upload,
    # went into every job's error line and the part's note: only keys shaped like OpenAI's were
    # redacted, since the remote runner never told the redaction which key it sends.
    key = "vllm-token-Secret0123456789"

    def script(seen: Seen) -> Reply:
        token = seen.headers.get("Authorization", "").split(" ")[-1]
        return Reply(400, body=error_body(f"key {token} may not upload files", "invalid_request_error"))

    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    with HostileServer(script) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        RemoteRunner(real_store, report.batch_id, RemoteClient(srv.base_url, key), max_seconds=20, poll_cap=0.3).run()
    meta = real_store.meta(report.batch_id)
    assert meta["failed"] == "3", meta  # refused for good: each job ends with the reason...
    r = real_store.redis
    lines = r.lrange(f"batchrun:batch:{report.batch_id}:results", 0, -1)
    assert len(lines) == 3 and all(b"may not upload files" in x and b"[redacted]" in x for x in lines)
    for k in r.scan_iter("batchrun:*"):  # ... without the key
        kind = r.type(k)
        dump = {b"hash": lambda: r.hgetall(k), b"string": lambda: r.get(k), b"list": lambda: r.lrange(k, 0, -1),
                b"set": lambda: r.smembers(k), b"zset": lambda: r.zrange(k, 0, -1)}.get(kind, lambda: b"")()
        assert "Secret0123456789" not in repr(dump), k


def test_a_cancel_during_a_pass_stops_the_creates_still_to_come(real_store, tmp_path):
    # The batch was cancelled while its runner was creating remote batches: the rest of that
    # pass still created theirs upstream, which then ran (and billed) until cancelled.
    from batchrun.state.states import BatchState

    class CancelledOnFirstCreate(FakeBatchApi):
        def _answer(self, seen):
            if seen.method == "POST" and seen.path == "/v1/batches" and self.creates == 0:
                real_store.set_state(bid, BatchState.CANCELLED, "cancelled by the user")
            if seen.method == "POST" and seen.path.endswith("/cancel"):
                batch = next(b for b in self.batches if b["id"] == seen.path.split("/")[-2])
                batch["status"] = "cancelled"
                return Reply(200, body=batch)
            return super()._answer(seen)

    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    api = CancelledOnFirstCreate()
    with HostileServer(api) as srv:
        bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api")).batch_id
        RemoteRunner(real_store, bid, RemoteClient(srv.base_url, "sk-test"), max_seconds=5, poll_cap=0.3,
                     max_requests=2).run()
    assert api.creates == 1, f"{api.creates} remote batches created after the cancel"


def test_jobs_a_failed_remote_batch_gave_to_live_are_not_taken_back_by_a_later_submit(real_store, tmp_path):
    # A remote batch that failed validation sends its jobs live: back in their shard, unleased. A
    # submit into the same batch before a live runner took them planned again: it leased the whole
    # shard to the remote runner, these jobs too, and made no part of them (they were in the failed
    # part's ids already): held by nobody for the four days of the remote lease, sent by no one.
    from batchrun.remote.collect import Recorder
    from batchrun.remote.steps import PartSteps
    from batchrun.state import keys

    first = write_jobs(tmp_path / "a.jsonl", 5, prefix="a")
    more = write_jobs(tmp_path / "b.jsonl", 3, prefix="b")
    bid = submit_file(real_store, str(first), options=BatchOptions(via="batch-api")).batch_id
    runner = RemoteRunner(real_store, bid, RemoteClient("http://127.0.0.1:9/v1", "sk-test"), max_seconds=1)
    assert runner.parts.lock(bid, runner.token, 60_000)
    assert runner.plan(real_store.meta(bid)) == 1
    part = runner.parts.parts(bid)[0]
    steps = PartSteps(real_store, bid, runner.client, Recorder(real_store, bid), runner._save)
    steps._to_live(part, "the remote batch failed: no reason given")
    runner._save([part])
    submit_file(real_store, str(more), batch_id=bid, options=BatchOptions(via="batch-api"))
    runner.plan(real_store.meta(bid))
    open_parts = [p for p in runner.parts.parts(bid) if not p.state.ended]
    in_open = {cid for p in open_parts for cid in runner.parts.ids(bid, p.no)}
    owners = {cid: (o or b"").decode() for cid, o in
              zip([f"a-{i}" for i in range(5)], real_store.redis.hmget(keys.sub(bid, "owner"), [f"a-{i}" for i in range(5)]))}
    todo = {m.decode() for m in real_store.redis.zrange(keys.todo(bid, 0), 0, -1)}
    for cid, owner in owners.items():
        # each job is either waiting for a live runner, or in a remote batch still to go up
        assert (not owner and cid in todo) or (owner.startswith("remote|") and cid in in_open), (cid, owner)
    assert {f"b-{i}" for i in range(3)} <= in_open
