"""Edges of the fair share between batches (issue 20), on the real Redis with `batchrun worker`
processes and the mock server: what a yield does to a request that waits for its turn in the budget."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.state.connections import connect
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from tests.helpers import batchrun_cmd, cli_env, write_jobs

pytestmark = pytest.mark.redis


def test_a_large_request_is_sent_although_its_runner_yields_to_a_batch_that_shares_its_budget(
        spawn, real_redis_url, tmp_path):
    """One worker, two batches on one budget of 6,000 TPM (100 tokens a second). The big batch's one
    request takes ~1,000 tokens: about 10 s of the budget, longer than a fair turn on the worker. A
    runner that yields gives up the request's place (and the budget it took) every turn, so without a
    fix it is never sent while the other batch has shards waiting; today's behaviour sends it in ~10 s."""
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        store = BatchStore(connect(real_redis_url))
        big = tmp_path / "big.jsonl"
        big.write_text(json.dumps({"custom_id": "big-0", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "max_tokens": 950,
                                            "messages": [{"role": "user", "content": "Say a long thing."}]}}) + "\n")
        small = write_jobs(tmp_path / "small.jsonl", 600, prefix="small", max_tokens=10)
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "8", "--grace", "5"), env=env)
        try:
            for path, name, extra in ((big, "big", ()), (small, "small", ("--shard-size", "20"))):
                proc = subprocess.run(batchrun_cmd("submit", str(path), "--tpm", "6000", "--batch-id", name, *extra),
                                      env=env, capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, proc.stderr
            deadline = time.monotonic() + 60
            while store.meta("big").get("state") != BatchState.FINISHED.value:
                assert time.monotonic() < deadline, (
                    f"the big request was not sent in 60 s: {store.meta('big')}, "
                    f"small done {store.meta('small').get('done')}")
                time.sleep(0.5)
        finally:
            for b in store.active_batches():
                store.set_state(b, BatchState.CANCELLED, "test over")
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)


def _run(env, *args):
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def test_priority_of_a_batch_that_does_not_run_says_when_it_applies(real_redis_url, tmp_path):
    """`batchrun priority` on a cancelled or paused batch must not promise that its runners apply it
    within seconds: a cancelled one has none and never will; a paused one takes it when resumed."""
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    for name in ("c1", "p1"):
        assert _run(env, "submit", str(jobs), "--batch-id", name).returncode == 0
    assert _run(env, "cancel", "c1").returncode == 0
    BatchStore(connect(real_redis_url)).set_state("p1", BatchState.PAUSED, "paused by the test")
    proc = _run(env, "priority", "c1", "high")
    assert proc.returncode == 0, proc.stderr
    assert "within seconds" not in proc.stdout and "cancelled, so nothing of it runs any more" in proc.stdout
    proc = _run(env, "priority", "p1", "low")
    assert proc.returncode == 0 and "when the batch is resumed (batchrun resume p1)" in proc.stdout
    assert _run(env, "purge", "c1", "--yes").returncode == 0
    proc = _run(env, "priority", "c1", "high")
    assert proc.returncode == 1 and "no batch 'c1' in this Redis" in proc.stderr and "Traceback" not in proc.stderr
