"""`--priority` on submit and in Python, `batchrun priority`, and the share `status` and `list` show."""

from __future__ import annotations

import json
import subprocess

import pytest

import batchrun
from batchrun.settings import OptionsError
from tests.helpers import batchrun_cmd, cli_env, write_jobs

pytestmark = pytest.mark.redis


def _run(env, *args):
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def test_a_bad_priority_is_refused_before_anything_is_written(real_redis_url, tmp_path):
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    proc = _run(env, "submit", str(jobs), "--priority", "urgent")
    assert proc.returncode == 2
    assert "--priority 'urgent' is not high, normal, low or a weight" in proc.stderr
    assert _run(env, "list").stdout.strip() == "no batch on this Redis"
    proc = _run(env, "submit", str(jobs), "--priority", "0")
    assert proc.returncode == 2 and "must be above 0" in proc.stderr and "use low" in proc.stderr


def test_priority_is_shown_and_changed_on_a_submitted_batch(real_redis_url, tmp_path):
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    assert _run(env, "submit", str(jobs), "--priority", "high", "--batch-id", "b1").returncode == 0
    status = _run(env, "status", "b1")
    assert "share: priority high (weight 4)" in status.stdout
    proc = _run(env, "priority", "b1", "low")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "batch b1: priority low (was high (weight 4)); its runners apply it within seconds"
    share = json.loads(_run(env, "status", "b1", "--json").stdout)["share"]
    assert (share["priority"], share["weight"], share["workers"], share["budgets"]) == ("low", 0.0, 0, [])
    assert "b1" in _run(env, "list").stdout and " low " in _run(env, "list").stdout
    proc = _run(env, "priority", "b1", "2.50")
    assert proc.returncode == 0 and "priority weight 2.5 (was low)" in proc.stdout


def test_priority_of_a_batch_that_is_not_there_or_a_bad_value(real_redis_url):
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    proc = _run(env, "priority", "nope", "high")
    assert proc.returncode == 1 and "no batch 'nope' in this Redis" in proc.stderr
    proc = _run(env, "priority", "nope", "soon")
    assert proc.returncode == 2 and "'soon' is not high, normal, low or a weight" in proc.stderr


def test_python_api_takes_a_priority_and_refuses_a_bad_one():
    with pytest.raises(OptionsError, match="--priority 'asap' is not high"):
        batchrun.run([{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}], priority="asap",
                     base_url="http://127.0.0.1:9/v1", api_key="sk-test", progress=False)


def test_python_api_runs_a_batch_with_its_priority_stored(real_redis_url):
    from batchrun.mock import MockServerThread
    from batchrun.state.connections import connect
    from batchrun.state.fairshare import FairShare
    from batchrun.state.store import BatchStore

    with MockServerThread() as srv:
        results = batchrun.run([{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n {i}"}]}
                                for i in range(5)], priority="high", redis_url=real_redis_url, batch_id="api-prio",
                               base_url=srv.base_url, api_key="sk-test", progress=False)
    assert all(r.ok for r in results)
    assert FairShare(BatchStore(connect(real_redis_url))).priority("api-prio").weight == 4.0
