"""Worker processes: RQ workers that run shard jobs and keep the fleet healthy.

``BatchWorker`` is an ``rq.Worker`` (one forked work-horse per shard job) whose
idle loop also does batchrun's maintenance: it gives back expired leases and
wakes parked shards. Its burst mode ends only when no running batch has work
left, retries waiting for their backoff included (RQ's own burst ends as soon
as the queue is empty). ``ThreadWorker`` runs shard jobs in its own thread, for
``batchrun run`` on the in-process Redis.

Both run only batchrun's own job functions (``JOB_FUNCTIONS``): whoever can write to Redis can
enqueue an RQ job naming any importable function, so any other job is refused before anything it
names is imported, logged and moved to the failed registry (``refusal``, ``BatchJob``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from batchrun.state import keys

from batchrun.runner import fairturn, maintenance, shard
from batchrun.remote.start import RUN_REMOTE
from batchrun.state.store import RUN_SHARD, BatchStore

log = logging.getLogger("batchrun.worker")

POLL_SECONDS = 1  # how long an idle worker waits on the queue between maintenance rounds
# ... in `batchrun run`'s in-process worker: its idle wait is what `run` waits out at the end (a stop
# is seen only between waits), and a poll costs only a few in-process commands.
THREAD_POLL_SECONDS = 0.05
ORPHAN_CHECK_SECONDS = 0.5  # how often a work horse checks that its worker is still alive
# The name shard jobs had before the layout moved shard.py into runner/ (jobs queued by that
# version, still in Redis after an upgrade, run as they are).
LEGACY_RUN_SHARD = "batchrun.shard.run_shard"
JOB_FUNCTIONS = frozenset({RUN_SHARD, LEGACY_RUN_SHARD, RUN_REMOTE})  # every function batchrun enqueues as an RQ job
REFUSED_TTL = 86400  # seconds a refused job stays in the failed registry (`rq info` shows it)


def refusal(job: Job) -> str | None:
    """Why ``job`` may not run in a batchrun worker, or None if it may: one of batchrun's job
    functions with a batch id and a shard number, and no callbacks or webhooks (batchrun sets
    none). It reads only the job's JSON data and fields: nothing the job names is imported."""
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except Exception:  # noqa: BLE001 - not JSON (pickle, say) or not RQ's shape
        return "its data is not an RQ job in JSON"
    if not isinstance(func_name, str) or func_name not in JOB_FUNCTIONS or instance is not None:
        return f"it names {func_name!r:.100}, which is not one of batchrun's job functions"
    if kwargs or len(args) != 2 or not isinstance(args[0], str) or type(args[1]) is not int:
        return f"its arguments are not a batch id and a shard number ({args!r:.100}, {kwargs!r:.100})"
    if job._success_callback_name or job._failure_callback_name or job._stopped_callback_name or job.webhooks:
        return "it names callbacks or webhooks, which batchrun's jobs never have"
    return None


class RefusedJob(Exception):
    """A job that is not one of batchrun's, met where RQ resolves its function."""


class BatchJob(Job):
    """The job class of batchrun's workers. Workers refuse a job that is not batchrun's before it
    starts (``BatchWorkerMixin.execute_job``); wherever RQ resolves a job's code anyway, this only
    resolves an allowed function, and never a callback (batchrun sets none; RQ's registry cleanup
    runs an abandoned job's failure callback)."""

    @property
    def func(self):
        reason = refusal(self)
        if reason is not None:
            raise RefusedJob(f"job {self.id} refused: {reason}")
        if self.func_name == LEGACY_RUN_SHARD:
            return shard.run_shard
        return super().func

    success_callback = failure_callback = stopped_callback = property(lambda self: None)


class BatchWorkerMixin:
    batchrun_burst = False
    poll_seconds: float = POLL_SECONDS

    def __init__(self, queues, *args, **kwargs):
        # Whatever the command line says (`rq worker -S pickle`, `-j`): JSON, so that reading a job
        # runs no code, and the guarded job class, in the queues (registry cleanup) as in the worker.
        kwargs["serializer"], kwargs["job_class"] = JSONSerializer, BatchJob
        queues = [queues] if isinstance(queues, (str, Queue)) else queues
        super().__init__([q.name if isinstance(q, Queue) else q for q in queues], *args, **kwargs)

    def execute_job(self, job, queue):
        reason = refusal(job)
        if reason is not None:
            return self._refuse(job.id, queue, reason)
        try:
            return super().execute_job(job, queue)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Redis went away as the work horse ended (RQ reads the job's status then): the worker
            # must live on. The shard is parked in batchrun's own state, so it runs again.
            log.warning("worker %s: Redis unreachable as shard job %s ended (%s); the shard stays parked and "
                        "runs again once Redis is back", self.name, job.id, exc)

    def _refuse(self, job_id: str, queue: Queue, reason: str) -> None:
        """Log a job that is not batchrun's and move it to the failed registry, never run."""
        log.warning("worker %s refused RQ job %s: %s; it was moved to the failed registry, not run",
                    self.name, job_id, reason)
        with self.connection.pipeline() as pipe:
            pipe.hset(Job.key_for(job_id), "status", JobStatus.FAILED.value)
            pipe.expire(Job.key_for(job_id), REFUSED_TTL)
            pipe.zadd(queue.failed_job_registry.key, {job_id: int(time.time()) + REFUSED_TTL})
            pipe.lrem(queue.intermediate_queue_key, 1, job_id)  # dequeued, never started
            self.increment_failed_job_count(pipe)
            pipe.execute()

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        store = BatchStore(self.connection)
        burst = self.batchrun_burst or timeout is None  # RQ asks without a timeout in burst mode
        while True:
            try:
                maintenance.run_once(store)
                fairturn.choose_next_shard(store)  # the next shard: round robin between batches, not FIFO
                result = super().dequeue_job_and_maintain_ttl(self.poll_seconds, self.poll_seconds)
                if result is not None or self._stop_requested:
                    return result
                if burst and not maintenance.work_left(store):
                    return None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Keep the worker: it continues when Redis is back.
                log.warning("Redis unreachable (%s); worker %s retries in %d s", exc, self.name, POLL_SECONDS)
                time.sleep(POLL_SECONDS)
            except Exception as exc:  # noqa: BLE001 - RQ could not read a job it dequeued
                if getattr(exc, "job_id", None) is None or getattr(exc, "queue", None) is None:
                    raise
                # A job hash that does not parse (written by hand) would stop the worker.
                self._refuse(exc.job_id, exc.queue, f"its fields do not parse ({type(exc).__name__})")


class BatchWorker(BatchWorkerMixin, Worker):
    def setup_work_horse_signals(self):
        # The horse ignores Ctrl-C (the parent handles it) and turns SIGTERM into a graceful stop:
        # no new jobs, in-flight requests get the grace period, the rest goes back to the queue.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, frame: shard.STOP.set())
        self._stop_when_orphaned()

    def _stop_when_orphaned(self) -> None:
        """In the horse. RQ puts it in a process group of its own, so it outlives a worker killed
        with SIGKILL (or by the OOM killer); unwatched, it would run its shard to the end. It
        stops instead, as on SIGTERM, within ORPHAN_CHECK_SECONDS of the worker's death."""
        worker_pid = self.pid or os.getppid()

        def gone() -> None:
            log.warning("worker process %d is gone: its work horse stops as on SIGTERM (requests in flight "
                        "get the grace period, the shard's other jobs go back to the queue)", worker_pid)
            shard.STOP.set()

        watch_parent(worker_pid, gone)

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        if self.horse_pid:
            self.kill_horse(sig=signal.SIGTERM)


def watch_parent(parent_pid: int, on_gone) -> None:
    """Call ``on_gone`` (in a daemon thread) within ORPHAN_CHECK_SECONDS of process ``parent_pid``
    no longer being this process's parent: it died, even by SIGKILL."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_CHECK_SECONDS)
        on_gone()

    threading.Thread(target=watch, name="batchrun-orphan-watch", daemon=True).start()


class ThreadWorker(BatchWorkerMixin, SimpleWorker):
    death_penalty_class = TimerDeathPenalty
    poll_seconds = THREAD_POLL_SECONDS

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
    shares with this process. No full collection first: it took ~60 ms of the worker's start
    (100,000 objects) to free ~130 (imports leave almost no garbage)."""
    import gc

    from batchrun.policy.tokens import encoding_for

    encoding_for("gpt-4o")
    if freeze:
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
