"""The issue's done-when, on the real Redis with the mock server and two `batchrun worker` processes:
a small batch is not stuck behind a big one; equal batches split a budget 50/50 and 2:1 weights
about 67/33; a low batch takes the whole budget alone and gives it up within seconds.

Each window is a few seconds at 60,000 TPM (about 25 requests a second of ~40 tokens): a few hundred
requests, enough for the shares to mean something, with margins for a loaded machine."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.state.connections import connect
from batchrun.state.fairshare import FairShare
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from tests.helpers import batchrun_cmd, cli_env, write_jobs

pytestmark = pytest.mark.redis
TPM = "60000"


class Fleet:
    def __init__(self, spawn, url: str, base_url: str, tmp_path, workers: int = 2):
        self.env = cli_env(BATCHRUN_REDIS_URL=url, OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-test")
        self.store = BatchStore(connect(url))
        self.tmp = tmp_path
        self.workers = [spawn(batchrun_cmd("-q", "worker", "--concurrency", "100", "--grace", "5"), env=self.env)
                        for _ in range(workers)]

    def submit(self, name: str, n: int, *args: str) -> str:
        jobs = write_jobs(self.tmp / f"{name}.jsonl", n, prefix=name)
        proc = subprocess.run(batchrun_cmd("submit", str(jobs), "--tpm", TPM, "--batch-id", name, "--no-cache", *args),
                              env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return name

    def done(self, batch_id: str) -> int:
        return int(self.store.meta(batch_id).get("done", 0))

    def wait_for(self, what, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "the fleet did not get there in time"
            time.sleep(0.2)

    def counted(self, batches: list[str], seconds: float) -> dict[str, int]:
        """Jobs each batch finished over the next ``seconds``."""
        before = {b: self.done(b) for b in batches}
        time.sleep(seconds)
        return {b: self.done(b) - before[b] for b in batches}

    def stop(self) -> None:
        for b in self.store.active_batches():
            self.store.set_state(b, BatchState.CANCELLED, "test over")
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
        for w in self.workers:
            w.wait(timeout=60)


@pytest.fixture
def fleet(spawn, real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as srv:
        f = Fleet(spawn, real_redis_url, srv.base_url, tmp_path)
        try:
            yield f
        finally:
            f.stop()


def test_a_small_batch_finishes_quickly_while_a_big_one_holds_the_fleet(fleet):
    fleet.submit("big", 2000, "--shard-size", "1000")  # two shards: one on each worker, for over a minute
    fleet.wait_for(lambda: FairShare(fleet.store).running().get("big") == 2)
    fleet.wait_for(lambda: fleet.done("big") > 50)
    started = time.monotonic()
    fleet.submit("small", 10)
    fleet.wait_for(lambda: fleet.done("small") == 10, timeout=30)
    took = time.monotonic() - started
    assert took < 15, f"the 10-job batch took {took:.1f} s"
    assert fleet.done("big") < 2000  # the big one was still running: it gave a worker back, and a share
    status = subprocess.run(batchrun_cmd("status", "big"), env=fleet.env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "share: priority normal (weight 1)" in status.stdout, status.stdout


@pytest.mark.parametrize("priority_a, expected", [("normal", 0.5), ("2", 2 / 3)])
def test_batches_on_one_budget_share_it_by_weight(fleet, priority_a, expected):
    fleet.submit("a", 3000, "--shard-size", "3000", "--priority", priority_a)
    fleet.submit("b", 3000, "--shard-size", "3000")
    fleet.wait_for(lambda: fleet.done("a") > 20 and fleet.done("b") > 20)
    time.sleep(2)  # both runners' queues are full
    counts = fleet.counted(["a", "b"], 10)
    share = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share - expected) <= 0.1, counts
    listing = subprocess.run(batchrun_cmd("list"), env=fleet.env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and f"{priority_a} 1/2w" in listing.stdout, listing.stdout


def test_a_low_batch_takes_the_budget_alone_and_yields_it_within_seconds(fleet):
    fleet.submit("low", 3000, "--shard-size", "3000", "--priority", "low")
    fleet.wait_for(lambda: fleet.done("low") > 20)
    time.sleep(1)
    alone = fleet.counted(["low"], 5)["low"] / 5
    fleet.submit("normal", 3000, "--shard-size", "3000")
    fleet.wait_for(lambda: fleet.done("normal") > 0, timeout=15)
    time.sleep(3)  # "within seconds": the low batch's queue drains (2 s of the budget at most)
    counts = fleet.counted(["low", "normal"], 6)
    together = (counts["low"] + counts["normal"]) / 6
    assert counts["normal"] / (counts["low"] + counts["normal"]) >= 0.85, counts
    assert alone >= 0.75 * together, (alone, together)  # alone, it had the whole budget
    # A priority changed on a running batch applies within seconds: now low is high, and takes it back.
    proc = subprocess.run(batchrun_cmd("priority", "low", "high"), env=fleet.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "priority high (weight 4) (was low)" in proc.stdout, proc.stdout
    time.sleep(4)
    counts = fleet.counted(["low", "normal"], 6)
    assert counts["low"] / (counts["low"] + counts["normal"]) >= 0.65, counts  # 4:1 is 80 %


def test_one_worker_takes_turns_between_two_batches_and_every_job_ends_once(spawn, real_redis_url, tmp_path):
    """Yielding is the give-back path of every stop: with one worker, two batches take turns of a few
    seconds, and each job of both ends exactly once."""
    from tests.helpers import check_exactly_once

    with MockServerThread(MockConfig()) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        files = {}
        for name in ("first", "second"):
            files[name] = write_jobs(tmp_path / f"{name}.jsonl", 400, prefix=name)
            proc = subprocess.run(batchrun_cmd("submit", str(files[name]), "--tpm", "90000", "--batch-id", name, "--no-cache"),
                                  env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        worker = spawn(batchrun_cmd("worker", "--burst", "--concurrency", "100"), env=env,
                       stderr=subprocess.PIPE, text=True)
        _, log = worker.communicate(timeout=180)
        assert worker.returncode == 0, log[-2000:]
    assert "batch first shard 0: gives its worker to batch second (fair share)" in log, log[-2000:]
    # and back: first runs a second turn (second hands the worker back, or ends within its own turn)
    assert log.count("batch first shard 0: started") >= 2, log[-2000:]
    for name, jobs in files.items():
        out, err = tmp_path / f"{name}.out.jsonl", tmp_path / f"{name}.err.jsonl"
        col = subprocess.run(batchrun_cmd("collect", name, "-o", str(out), "--errors", str(err)), env=env,
                             capture_output=True, text=True, timeout=60)
        assert col.returncode == 0 and "400 result(s) written" in col.stdout, col.stdout + col.stderr
        _, errors = check_exactly_once(jobs, out, err)
        assert not errors
