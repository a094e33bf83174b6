"""submit_file: what goes into Redis (on fakeredis), after the fast second pass."""

from __future__ import annotations

import json

import fakeredis
import pytest

from batchrun.jobfile import JobFileError
from batchrun.settings import BatchOptions
from batchrun.store import BatchStore
from batchrun.submit import CHUNK, submit_file


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
