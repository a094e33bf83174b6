"""Worker processes: RQ workers that run shard jobs and keep the fleet healthy.

``BatchWorker`` is an ``rq.Worker`` (one forked work-horse per shard job) whose
idle loop also does batchrun's maintenance: it gives back expired leases and
wakes parked shards. Its burst mode ends only when no running batch has work
left, retries waiting for their backoff included (RQ's own burst ends as soon
as the queue is empty). ``ThreadWorker`` runs shard jobs in its own thread, for
``batchrun run`` on the in-process Redis.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import redis
from rq import Queue, SimpleWorker, Worker
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from batchrun import keys, maintenance, shard
from batchrun.store import BatchStore

log = logging.getLogger("batchrun.worker")

POLL_SECONDS = 1  # how long an idle worker waits on the queue between maintenance rounds


class BatchWorkerMixin:
    batchrun_burst = False

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        store = BatchStore(self.connection)
        burst = self.batchrun_burst or timeout is None  # RQ asks without a timeout in burst mode
        while True:
            try:
                maintenance.run_once(store)
                result = super().dequeue_job_and_maintain_ttl(POLL_SECONDS, POLL_SECONDS)
                if result is not None or self._stop_requested:
                    return result
                if burst and not maintenance.work_left(store):
                    return None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Keep the worker: it continues when Redis is back.
                log.warning("Redis unreachable (%s); worker %s retries in %d s", exc, self.name, POLL_SECONDS)
                time.sleep(POLL_SECONDS)


class BatchWorker(BatchWorkerMixin, Worker):
    def setup_work_horse_signals(self):
        # The horse ignores Ctrl-C (the parent handles it) and turns SIGTERM into a graceful stop:
        # no new jobs, in-flight requests get the grace period, the rest goes back to the queue.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, frame: shard.STOP.set())

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        if self.horse_pid:
            self.kill_horse(sig=signal.SIGTERM)


class ThreadWorker(BatchWorkerMixin, SimpleWorker):
    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self):
        pass  # signals belong to the main thread, which runs `batchrun run`


def make_worker(redis, *, burst: bool, threaded: bool = False, name: str | None = None):
    cls = ThreadWorker if threaded else BatchWorker
    queue = Queue(keys.QUEUE, connection=redis, serializer=JSONSerializer)
    worker = cls([queue], connection=redis, serializer=JSONSerializer, name=name)
    worker.batchrun_burst = burst
    return worker


def preload_encodings(*, freeze: bool = False) -> None:
    """Load tiktoken's encoding before forking, so each work-horse does not pay for it.

    Only o200k_base, the encoding of every current model (78 MB); cl100k_base (gpt-4,
    gpt-3.5-turbo, text-embedding-3-*: 33 MB more) is loaded by a horse that meets such a job.
    With ``freeze`` (a forking worker), what exists so far is then frozen out of the garbage
    collector, so that a forked horse's collections do not write to (and so copy) the pages it
    shares with this process."""
    import gc

    from batchrun.tokens import encoding_for

    encoding_for("gpt-4o")
    if freeze:
        gc.collect()
        gc.freeze()


def run_pool(argv: list[str], processes: int, *, burst: bool) -> int:
    """Run ``processes`` worker processes and restart any that die, until stopped.

    SIGTERM/SIGINT are passed on to the children, which finish gracefully.
    In burst mode a child that exits 0 is done and is not restarted.
    """
    children: dict[int, subprocess.Popen] = {}
    stopping = False

    def start(slot: int) -> None:
        children[slot] = subprocess.Popen([sys.executable, "-m", "batchrun", "worker", *argv])

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for p in children.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(processes):
        start(slot)
    while children:
        time.sleep(0.5)
        for slot, p in list(children.items()):
            code = p.poll()
            if code is None:
                continue
            del children[slot]
            if stopping or (burst and code == 0):
                continue
            log.warning("worker process %d exited with code %s; starting a new one", p.pid, code)
            time.sleep(1)
            start(slot)
    return 0
