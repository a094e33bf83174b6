"""submit_file: what goes into Redis (on fakeredis), after the fast second pass."""

from __future__ import annotations

import json

import fakeredis
import pytest

from batchrun.files.jobfile import JobFileError
from batchrun.settings import BatchOptions
from batchrun.state.store import BatchStore
from batchrun.ops.submit import CHUNK, submit_file, submit_requests


@pytest.fixture
def store():
    return BatchStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def _line(cid: str, content: str = "hi") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}})


def test_jobs_land_in_their_shards_and_lease_as_they_were_written(store, tmp_path):
    path = tmp_path / "jobs.jsonl"
    n = 2 * CHUNK + 7  # several chunks, the last one short
    path.write_text("".join(_line(f"j{i}", f"q{i}") + "\n" for i in range(n)))
    report = submit_file(store, path, batch_id="b", options=BatchOptions(shard_size=1000))
    assert (report.valid, report.added, report.total) == (n, n, n)
    assert int(store.meta("b")["shards"]) == 5
    lease = store.lease("b", 4, 100, 30_000, "t")
    assert sorted(j.custom_id for j in lease.jobs) == sorted(f"j{i}" for i in range(4000, n))
    job = next(j for j in lease.jobs if j.custom_id == "j4000")
    assert job.request["url"] == "/v1/chat/completions"
    assert job.request["body"]["messages"][0]["content"] == "q4000"
    # Submitting again adds nothing.
    assert submit_file(store, path, batch_id="b").added == 0


def test_invalid_lines_are_skipped_and_reported(store, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([_line("a"), "not json", _line("a"),
                               json.dumps({"model": "m", "messages": [], "metadata": {"custom_id": "bare"}}), ""]))
    with pytest.raises(JobFileError):
        submit_file(store, path, batch_id="b")
    assert not store.exists("b")
    skipped = []
    report = submit_file(store, path, batch_id="b", skip_invalid=True, on_skip=skipped.append)
    assert [e.line_no for e in skipped] == [2, 3]
    assert report.added == 2
    lease = store.lease("b", 0, 10, 30_000, "t")
    by_id = {j.custom_id: j.request for j in lease.jobs}
    assert set(by_id) == {"a", "bare"}
    assert by_id["bare"] == {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}


def test_skip_ids_leave_jobs_out(store, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(_line(f"j{i}") + "\n" for i in range(10)))
    report = submit_file(store, path, batch_id="b", skip_ids={"j1", "j5"})
    assert report.added == 8


@pytest.mark.redis
def test_submit_refuses_a_lone_surrogate_custom_id_before_writing_anything(real_redis_url, tmp_path):
    import subprocess

    import redis

    from tests.helpers import batchrun_cmd, cli_env

    path = tmp_path / "jobs.jsonl"
    lines = [_line(f"req-{i}") for i in range(3)]
    lines.insert(2, _line("req-\ud800"))  # json.dumps writes it as the escape \ud800, as any JSON writer may
    assert r'"req-\ud800"' in lines[2]
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(batchrun_cmd("submit", str(path)), env=cli_env(BATCHRUN_REDIS_URL=real_redis_url),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"{path}, line 3: custom_id holds a lone UTF-16 surrogate (\\ud800)" in proc.stderr
    assert "nothing was submitted" in proc.stderr and "Traceback" not in proc.stderr
    assert redis.Redis.from_url(real_redis_url).keys("*") == []


def test_big_lines_go_to_redis_in_chunks_of_bounded_size(store, tmp_path, monkeypatch):
    import batchrun.ops.submit as submit_module

    monkeypatch.setattr(submit_module, "CHUNK_BYTES", 10_000, raising=False)
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(_line(f"j{i}", "x" * 3000) + "\n" for i in range(10)))
    sizes, add_jobs = [], store.add_jobs

    def recorded(batch_id, items):
        sizes.append(sum(len(request) + len(cid) for cid, _, request in items))
        return add_jobs(batch_id, items)

    monkeypatch.setattr(store, "add_jobs", recorded)
    assert submit_file(store, path, batch_id="b").added == 10
    assert len(sizes) >= 3 and max(sizes) < 10_000 + 3200  # a chunk ends with the line that passes the bound


def test_submit_requests_checks_every_request_before_writing_and_says_it_as_for_a_file(store, tmp_path):
    lines = [json.loads(_line("a")), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"messages": []}}, json.loads(_line("a"))]
    with pytest.raises(JobFileError) as caught:
        submit_requests(store, lines, batch_id="b")
    assert store.redis.keys("*") == []  # nothing was written
    # The sentences a job file of the same lines gets, naming the request's index for the line.
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(JobFileError) as from_file:
        submit_file(store, path, batch_id="b")
    said = [str(e) for e in caught.value.errors]
    assert said == [str(e).replace(f"{path}, line 2", "request 1").replace(f"{path}, line 3", "request 2")
                    .replace("first on line 1", "first in request 0") for e in from_file.value.errors]
    assert said[1] == "request 2: duplicate custom_id 'a' (first in request 0)"
    assert "2 of the requests are invalid; nothing was submitted" in str(caught.value)


def test_submit_requests_loads_the_jobs_as_submit_file_does(store, tmp_path):
    lines = [json.loads(_line(f"j{i}", f"q{i}")) for i in range(2500)]
    report = submit_requests(store, lines, batch_id="r", options=BatchOptions(shard_size=1000))
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from_file = submit_file(store, path, batch_id="f", options=BatchOptions(shard_size=1000))
    assert (report.valid, report.added, report.total) == (from_file.valid, from_file.added, from_file.total)
    for shard in range(3):
        got = store.lease("r", shard, 1000, 30_000, "t").jobs
        want = store.lease("f", shard, 1000, 30_000, "t").jobs
        assert [(j.custom_id, j.request) for j in got] == [(j.custom_id, j.request) for j in want]
    assert submit_requests(store, lines, batch_id="r").added == 0  # again: nothing new
