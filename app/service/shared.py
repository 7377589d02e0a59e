"""The job store shared by several replicas through Redis (``SEA_REDIS_URL``).

Any replica accepts a job and any replica answers for it; queued jobs go to whichever replica has room.
Redis holds the truth; each replica keeps local ``Job`` objects (the ones it runs, and mirrors of the
ones it was asked about) and brings mirrors up to date from Redis.

Keys, under the prefix P (``SEA_REDIS_PREFIX``):

- ``P:queue``: queued job ids, pushed on the left, taken from the right (first in, first out).
- ``P:job:{id}``: a hash: ``spec`` (JSON: messages, engine config, reward options), ``status``, ``owner``
  (the replica running it), ``attempts``, ``error``, ``error_kind``, ``result`` (JSON), ``created``, and
  ``cancel`` (JSON kind and reason) once a replica that does not run it was asked to cancel it while it ran.
- ``P:events:{id}``: the job's events (JSON, the same ones the local SSE stream sends), in order.
- ``P:claimed:{replica}``: ids a replica has taken. A replica takes a job by moving its id from the queue
  to its claimed list in one command (BLMOVE), so a job is always in one of the two lists until it ends.
- ``P:alive:{replica}``: the replica's lease, renewed every third of ``SEA_REPLICA_LEASE_SECONDS``;
  ``P:replicas``: replicas that may hold claimed jobs. When a lease lapses, any replica puts the dead
  one's running jobs back in the queue (or fails them after ``SEA_JOB_MAX_ATTEMPTS`` starts, or ends them as
  their ``cancel`` flag asks).
- Channels ``P:wake`` (a job id whose events grew) and ``P:cancel`` (a job to stop where it runs).

Every change of a job's state is one Lua script (``app/service/shared_records.py``), so two replicas never
both finish, requeue or fail the same job, and a result from a replica that lost its lease (a long pause) is
dropped, not written.
Pub/sub only wakes replicas up; a periodic poll catches anything a lost message would have missed (a running job's
``cancel`` flag, a mirror's new events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import socket
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

from app.engine.types import AlignJob, SEAConfig
from app.service.events import compact_step_events
from app.service.jobs import ErrorKind, Job, JobStatus, engine_job, spawn_background
from app.service.shared_records import SCRIPTS, config_spec, result_from_json, result_to_json

try:
    from redis.exceptions import AuthenticationError as RedisAuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # the [redis] extra is not installed: the in-memory store needs none of this
    class RedisError(Exception):  # type: ignore[no-redef]
        pass

    RedisAuthenticationError = RedisConnectionError = RedisTimeoutError = RedisError  # type: ignore[misc]


def unreachable(exc: BaseException) -> bool:
    """Whether a Redis error says it cannot be reached (yet): worth retrying, unlike a wrong password (redis-py's
    AuthenticationError is a ConnectionError) or a server that refuses a command."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) and not isinstance(exc, RedisAuthenticationError)

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

    from app.runtime import Runtime
    from app.service.worker import EngineWorker

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
CLOSE_SECONDS = 5.0


def replica_name() -> str:
    """Unique per process: the host (a pod's name on Kubernetes), the pid and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Outage:
    """A loop's spells of Redis being unreachable, logged when they begin and when they end: not a traceback a second
    through an outage. Another error is logged with its traceback each time, and is no outage."""

    def __init__(self, loop: str):
        self.loop = loop
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if not unreachable(exc):
            log.error("%s failed; retrying", self.loop, exc_info=exc)
        elif self.since is None:
            log.warning("%s: Redis cannot be reached (%s); retrying every second", self.loop, exc)
            self.since = time.monotonic()

    def ended(self) -> bool:
        """Whether this ends an outage."""
        if self.since is None:
            return False
        log.warning("%s: Redis answers again after %.0f s", self.loop, time.monotonic() - self.since)
        self.since = None
        return True


@dataclasses.dataclass
class _Running:
    job: Job
    attempt: int


class SharedJobs:
    """This replica's side of the shared store: enqueue, claim when the worker has room, mirror state both ways."""

    def __init__(self, redis: Redis, claim_redis: Redis, runtime: Runtime, worker: EngineWorker, *, prefix: str, ttl: float,
                 lease: float, max_attempts: int, max_queue: int, jobs: dict[str, Job], is_draining, queue_depth: Gauge | None = None,
                 limit_error=lambda config: None, longest_timeout: float = math.inf, max_prompt_tokens: int = 2**31):
        self.redis = redis
        self._claim_redis = claim_redis  # BLMOVE blocks its connection
        self.runtime = runtime
        self.worker = worker
        self.prefix = prefix
        self.ttl = int(max(1, ttl))
        self._unfinished_ttl = self.ttl + 3600  # keys of a job not finished yet: a safety net for keys a crash left behind
        self.lease = lease
        self.max_attempts = max_attempts
        self.max_queue = max_queue
        # A job another replica queued is checked again before it runs here: Redis is trusted to hold jobs, not to
        # decide what runs (whoever can write to it could otherwise queue any size of work, without a deadline).
        self.limit_error = limit_error
        self.longest_timeout = longest_timeout
        self.max_prompt_tokens = max_prompt_tokens
        self._submitted_here: weakref.WeakSet[Job] = weakref.WeakSet()  # checked where they were submitted
        self.replica = replica_name()
        self.healthy = True
        self._renewed = False  # whether this replica has held a lease yet (a missing one then means a lapse)
        self._jobs = jobs  # the service's local store (id → Job), shared so that mirrors are found like local jobs
        self._is_draining = is_draining
        self._running: dict[str, _Running] = {}
        self._mirrored: dict[str, int] = {}  # id → how many of its Redis events the local object has applied
        self._seen: set[str] = set()  # mirrored ids whose record Redis was seen to hold (checked for its loss)
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes: asyncio.Queue = asyncio.Queue()
        self._write_outage = _Outage("writing job events (a job's end is retried until written, step events are dropped)")
        self._dropped_events = 0  # step events not written in the current outage
        self._tasks: list[asyncio.Task] = []
        self._catch_ups: set[asyncio.Task] = set()
        self._to_withdraw: dict[str, Job] = {}  # jobs whose submission failed, cancelled once Redis answers
        self._withdrawals: set[asyncio.Task] = set()  # the task that does it
        self._claiming = True
        self.queue_depth = queue_depth
        self._scripts = {name: redis.register_script(source) for name, source in SCRIPTS.items()}

    @classmethod
    def connect(cls, url: str, **kwargs) -> SharedJobs:
        from redis.asyncio import Redis

        redis = Redis.from_url(url, decode_responses=True, health_check_interval=30)
        claim_redis = Redis.from_url(url, decode_responses=True)
        return cls(redis, claim_redis, **kwargs)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ----- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._heartbeat()
        log.info("shared job store: replica %s on %s (prefix %r)", self.replica, self.redis.connection_pool.connection_kwargs.get("host"), self.prefix)
        self._tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("sea-writer", self._write_loop()), ("sea-claimer", self._claim_loop()),
            ("sea-watcher", self._watch_loop()), ("sea-lease", self._lease_loop()))]

    async def disconnect(self) -> None:
        """Close the connections of a store that never started (a SIGTERM came while Redis was unreachable)."""
        await self.redis.aclose()
        await self._claim_redis.aclose()

    def stop_claiming(self) -> None:
        self._claiming = False

    async def close(self) -> None:
        """After the drain: flush pending writes, leave the replica set, close the connections."""
        self._claiming = False
        try:
            await asyncio.wait_for(self._writes.join(), CLOSE_SECONDS)
        except asyncio.TimeoutError:
            log.warning("%d job updates not written to Redis at shutdown", self._writes.qsize())
        for task in [*self._tasks, *self._withdrawals]:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_SECONDS)
            for task in stuck:
                log.warning("task %s did not stop: %s", task.get_name(), task.get_stack())
        # Mirrors whose runner is elsewhere (or that wait in the shared queue): their waiters here get an answer. A job
        # whose only reader is a blocking request here, answered 503 now (it sends the request again), is withdrawn.
        withdrawn = []
        for job in list(self._jobs.values()):
            if job.status.finished:
                continue
            if job in self._submitted_here and not job.stream_events:
                job.finish(JobStatus.failed, None, "the service shut down before the job could finish", ErrorKind.shutdown)
                withdrawn.append(self.cancel(job, ErrorKind.cancelled, "the replica its client waited on shut down"))
            else:
                job.finish(JobStatus.failed, None, "this replica shut down; read the job from another replica", ErrorKind.shutdown)
        if withdrawn:
            try:
                await asyncio.wait_for(asyncio.gather(*withdrawn), CLOSE_SECONDS)
            except Exception:  # Redis gone at shutdown: the jobs run elsewhere for nobody
                log.warning("could not withdraw %d jobs from the shared queue", len(withdrawn), exc_info=True)
        try:
            await asyncio.wait_for(self._leave(), CLOSE_SECONDS)
        except Exception:  # Redis gone at shutdown: the lease lapses by itself
            log.warning("could not leave the replica set cleanly", exc_info=True)

    async def _leave(self) -> None:
        if not await self.redis.llen(self.key("claimed", self.replica)):
            await self.redis.srem(self.key("replicas"), self.replica)
            await self.redis.delete(self.key("alive", self.replica))
        await self.redis.aclose()
        await self._claim_redis.aclose()

    # ----- submitting, reading, cancelling (event loop) -------------------------------------------

    async def enqueue(self, job: Job, messages: list[dict[str, str]], reward_options: dict) -> bool:
        """Queue ``job`` for any replica; False when the shared queue is full."""
        spec = {"messages": messages, "config": config_spec(job.work.config), "reward_options": reward_options,
                "deadline": time.time() + (job.deadline - time.monotonic()) if job.deadline is not None else None,
                "stream_events": job.stream_events, "return_trace": job.return_trace, "model": job.model, "owner": job.owner}
        self._jobs[job.id] = job
        self._submitted_here.add(job)
        self._mirrored[job.id] = 0
        ok = 0
        try:
            ok = await self._scripts["enqueue"](
                keys=[self.key("queue"), self.key("job", job.id)],
                args=[self.max_queue, job.id, json.dumps(spec), job.created, self._unfinished_ttl])
        except RedisError as exc:
            # The script may have run all the same (a timeout after it was sent): the client, answered 503, will send
            # the request again, so a job queued this way must not run too. A failed connect sent nothing.
            if "connecting to" not in str(exc):
                self._withdraw(job)
            raise
        finally:
            if not ok:  # refused, or Redis failed (the client gets a 503): no local job may wait for it forever
                self._jobs.pop(job.id, None)
                self._forget_mirror(job.id)
        if ok:
            self._seen.add(job.id)
        return bool(ok)

    def _withdraw(self, job: Job) -> None:
        """Cancel ``job`` in Redis once Redis answers (until its deadline; one task for all such jobs): nothing if its
        submission never got there, else it ends before it runs (or at its next step, if a replica took it first)."""
        self._to_withdraw[job.id] = job
        if all(task.done() for task in self._withdrawals):  # a task that just ended leaves the set a moment later
            spawn_background(self._withdraw_loop(), self._withdrawals)

    async def _withdraw_loop(self) -> None:
        while self._to_withdraw:
            for job in list(self._to_withdraw.values()):
                if job.deadline is not None and time.monotonic() > job.deadline:  # it cannot run any more
                    del self._to_withdraw[job.id]
                    continue
                try:
                    await self.cancel(job, ErrorKind.cancelled, "its submission failed (the shared job store did not answer); "
                                      "the client was told to send it again")
                except (RedisError, OSError) as exc:
                    if unreachable(exc):
                        break
                    log.warning("job %s: could not withdraw it from the shared job store: %s", job.id, exc)
                del self._to_withdraw[job.id]
            if self._to_withdraw:
                await asyncio.sleep(POLL_SECONDS)

    async def lookup(self, job_id: str) -> Job | None:
        """A job another replica accepted: build a local mirror from Redis (None when unknown or expired)."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        fields = await self.redis.hgetall(self.key("job", job_id))
        if not fields or "spec" not in fields:
            return None
        spec = json.loads(fields["spec"])
        job = self._job_from_spec(job_id, spec, float(fields.get("created") or time.time()), await self._work(spec))
        if job_id in self._jobs:  # another request built it while we awaited
            return self._jobs[job_id]
        self._jobs[job_id] = job
        self._mirrored[job_id] = 0
        self._seen.add(job_id)
        await self.catch_up(job)
        if fields.get("status") == "running" and job.status == JobStatus.queued:
            job.mark_running()
        return job

    async def position(self, job: Job) -> int | None:
        if job.status != JobStatus.queued:
            return None
        index = await self.redis.lpos(self.key("queue"), job.id)
        if index is None:
            return None
        return await self.redis.llen(self.key("queue")) - 1 - index

    def runs(self, job: Job) -> bool:
        return job.id in self._running

    async def cancel(self, job: Job, kind: ErrorKind, reason: str) -> None:
        """Cancel a job this replica does not run: at once if it is queued, else where it runs."""
        outcome = await self._scripts["cancel"](
            keys=[self.key("job", job.id), self.key("events", job.id), self.key("queue")],
            args=[job.id, reason, kind, self.key("wake"), self.ttl])
        if outcome == "finished":  # ended in the shared queue: counted here, where it ended
            self._count_end(job, kind)
            if self.worker is not None:
                self.worker.metrics.observe_left_queue(job)
            await self.catch_up(job)
        elif outcome == "running":
            await self.redis.publish(self.key("cancel"), json.dumps({"id": job.id, "kind": kind, "reason": reason}))

    async def queue_length(self) -> int:
        return await self.redis.llen(self.key("queue"))

    # ----- mirrors ------------------------------------------------------------------------------

    async def catch_up(self, job: Job) -> None:
        """Apply the job's events that Redis has and the local object lacks (a no-op for jobs run here)."""
        if job.id in self._running or job.id not in self._mirrored:
            return
        if job.status.finished:  # ended here (its deadline, a shutdown): nothing more to mirror
            self._forget_mirror(job.id)
            return
        lock = self._locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            if job.status.finished or job.id not in self._mirrored:  # a catch-up that held the lock first ended it
                return
            start = self._mirrored[job.id]
            events = await self.redis.lrange(self.key("events", job.id), start, -1)
            for raw in events:
                if job.id in self._running or job.status.finished:
                    break
                self._mirrored[job.id] += 1
                event = json.loads(raw)
                if event["event"] == "end":
                    fields = await self.redis.hgetall(self.key("job", job.id))
                    result = result_from_json(fields["result"]) if fields.get("result") else None
                    if fields.get("queue_seconds"):
                        job.queue_seconds_final = float(fields["queue_seconds"])
                    job.finish(JobStatus(fields.get("status", event["status"])), result,
                               fields.get("error") or None, fields.get("error_kind") or None)
                elif event["event"] == "requeued":
                    job.status = JobStatus.queued
                    job.publish(event)
                else:
                    if job.status == JobStatus.queued:
                        job.mark_running()
                    job.publish(event)
        if job.status.finished:
            self._forget_mirror(job.id)

    def _forget_mirror(self, job_id: str) -> None:
        self._locks.pop(job_id, None)
        self._mirrored.pop(job_id, None)
        self._seen.discard(job_id)

    async def _end_lost_jobs(self) -> None:
        """End the jobs whose record Redis no longer holds (it restarted without its data, or the record expired).
        A mirror: nothing would ever end it, and its waiters here (a blocking request, a stream) would wait for good. A
        job that runs here for another replica's client: that replica ended it `lost` (and its client sends it again),
        so the run stops. A job submitted here runs on: its result is kept here (``_write``)."""
        mirrors = [job for job in self._jobs.values() if job.id in self._mirrored and job.id in self._seen and not job.status.finished]
        runs = [r.job for r in self._running.values() if r.job not in self._submitted_here and not r.job.status.finished]
        if not mirrors and not runs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in (*mirrors, *runs):
                pipe.exists(self.key("job", job.id))
            held = await pipe.execute()
        lost = "the shared job store lost the job (Redis restarted without its data)"
        for job, exists in zip((*mirrors, *runs), held):
            if exists or job.status.finished:
                continue
            log.warning("job %s: the shared job store no longer holds it (Redis restarted without its data?)", job.id)
            if job.id in self._running:
                self.worker.cancel(job, ErrorKind.lost, lost)
            elif job.id in self._mirrored:
                self._forget_mirror(job.id)
                never_ran = job.status == JobStatus.queued  # else its runner counts its end
                job.finish(JobStatus.failed, None, lost + "; send it again", ErrorKind.lost)
                if never_ran and job in self._submitted_here:
                    self._count_end(job)

    async def _work(self, spec: dict[str, Any]) -> AlignJob:
        """The engine's job of a spec, its prompt tokenized off the event loop when long (as a submission's)."""
        return await engine_job(self.runtime, spec["messages"], SEAConfig(**spec["config"]), spec["reward_options"])

    def _job_from_spec(self, job_id: str, spec: dict[str, Any], created: float, work: AlignJob) -> Job:
        """The local job of a spec another replica (or this one) wrote, with its engine job ``work``."""
        deadline = None if spec["deadline"] is None else time.monotonic() + (spec["deadline"] - time.time())
        enqueued = time.monotonic() - max(0.0, time.time() - created)  # the queue wait counts from the submission
        return Job(work, spec["model"], stream_events=spec["stream_events"], deadline=deadline, return_trace=spec["return_trace"],
                   owner=spec.get("owner"), id=job_id, created=created, enqueued=enqueued)

    # ----- running jobs: claim, then mirror this replica's events to Redis -------------------------

    async def _claim_loop(self) -> None:
        claimed_key = self.key("claimed", self.replica)
        outage = _Outage("claiming from the shared queue")
        while True:
            try:
                if not self._claiming or self._is_draining() or not self.worker.has_room():
                    await asyncio.sleep(0.02)
                    continue
                job_id = await self._claim_redis.blmove(self.key("queue"), claimed_key, 1, "RIGHT", "LEFT")
                outage.ended()
                if job_id is None:
                    continue
                claim = await self._claim(job_id, claimed_key)
                if claim is None:
                    continue
                if not self._claiming or self._is_draining():  # the drain began while BLMOVE waited: let another replica run it
                    await self._hand_back(job_id, int(claim[0]))
                    log.info("job %s: claimed as this replica began to drain; handed back to the shared queue", job_id)
                    continue
                spec = json.loads(claim[1])
                local = self._jobs.get(job_id)
                work = None
                if local is None or local.status.finished:  # built here from the spec (its prompt tokenized off the loop)
                    try:
                        work = await self._work(spec)
                    except Exception as exc:  # noqa: BLE001 - the job fails in _start, naming it
                        work = exc
                self._start(job_id, int(claim[0]), spec, float(claim[2]), work)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged by the outage, with its traceback unless Redis is unreachable
                outage.failed(exc)
                await asyncio.sleep(1.0)

    async def _claim(self, job_id: str, claimed_key: str) -> list | None:
        """Take a job BLMOVE moved to this replica's claimed list: [attempt, spec, created], or None when it is not to
        run (another took it, or it was cancelled: ended here, and counted here)."""
        claim = await self._scripts["claim"](keys=[self.key("job", job_id), self.key("events", job_id), claimed_key],
                                             args=[job_id, self.replica, self.ttl, self.key("wake")])
        if isinstance(claim, str):
            self._count_outcomes([claim])
            return None
        return claim or None

    def _start(self, job_id: str, attempt: int, spec: dict, created: float, work: AlignJob | BaseException | None) -> None:
        if job_id in self._running:
            # This replica's lease lapsed (a pause, Redis unreachable), another replica requeued the job, and this one
            # took it again while its first run still goes on, or its end waits to be written: that run carries on as
            # the new attempt (submitting the job again would run it twice, and the first run's end would be written
            # under the second attempt and the second's never).
            self._running[job_id].attempt = attempt
            log.info("job %s: claimed again while it still runs here (attempt %d); the run goes on", job_id, attempt)
            return
        job = self._jobs.get(job_id)
        try:
            if job is None or job.status.finished:
                if isinstance(work, BaseException):  # building it from the spec failed
                    raise work
                job = self._job_from_spec(job_id, spec, created, work)
            if job not in self._submitted_here:  # queued by another replica or written into Redis (a mirror too)
                self._check_runnable(job)
        except Exception as exc:  # noqa: BLE001 - e.g. a reward this replica does not serve
            if job is None or job.status.finished:
                job = Job(None, spec.get("model", ""), id=job_id)  # type: ignore[arg-type]
            self._forget_mirror(job_id)
            self._running[job_id] = _Running(job, attempt)
            job.listeners.append(self._on_event)
            job.finish(JobStatus.failed, None, f"this replica cannot run the job: {exc}", ErrorKind.engine)
            return
        self._jobs[job_id] = job
        job.status = JobStatus.queued
        self._running[job_id] = _Running(job, attempt)
        self._forget_mirror(job_id)
        job.listeners.append(self._on_event)
        log.info("job %s: claimed (attempt %d)", job_id, attempt)
        self.worker.submit(job, bounded=False)

    def _check_runnable(self, job: Job) -> None:
        """Raise ValueError for a job from the queue past this replica's limits or deadline rules."""
        error = self.limit_error(job.work.config)
        if error is not None:
            raise ValueError(error[1])
        error = self.runtime.prompt_error(job.work, self.max_prompt_tokens)
        if error is not None:
            raise ValueError(error)
        if job.deadline is None or not math.isfinite(job.deadline):
            raise ValueError("it has no deadline")
        job.deadline = min(job.deadline, time.monotonic() + self.longest_timeout)

    async def _hand_back(self, job_id: str, attempt: int) -> bool:
        """Put a job this replica holds back at the front of the shared queue, its attempt not counted; False when it
        is no longer this replica's (its lease lapsed and another replica took it)."""
        return bool(await self._scripts["release"](
            keys=[self.key("job", job_id), self.key("events", job_id), self.key("claimed", self.replica), self.key("queue")],
            args=[job_id, self.replica, attempt, self.key("wake")]))

    def _on_event(self, job: Job, event: dict) -> None:
        if self._write_outage.since is not None and event["event"] != "end":
            self._dropped_events += 1  # Redis cannot be reached: only ends wait to be written
            return
        self._writes.put_nowait((job, event))

    async def _write_loop(self) -> None:
        """Write this replica's job events to Redis, in order. While Redis cannot be reached, a job's end is retried
        until it is written (else the job would stay `running` there for good, and run again once this replica's lease
        lapsed); step events are dropped meanwhile, and not queued, so that an outage neither grows a backlog nor logs
        a traceback per event. A ping a second notices the way back when no end waits."""
        while True:
            try:
                job, event = await asyncio.wait_for(self._writes.get(), None if self._write_outage.since is None else POLL_SECONDS)
            except asyncio.TimeoutError:
                try:
                    await self.redis.ping()
                except (RedisError, OSError):
                    continue
                self._writes_resumed()
                continue
            try:
                while True:
                    try:
                        await self._write(job, event)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        if not unreachable(exc):
                            log.exception("could not write job %s's %s event to Redis", job.id, event["event"])
                            if event["event"] == "end":
                                self._stop_writing(job)
                            break
                        self._write_outage.failed(exc)
                        if event["event"] != "end":
                            self._dropped_events += 1
                            break
                        await asyncio.sleep(POLL_SECONDS)
                        continue
                    self._writes_resumed()
                    break
            finally:
                self._writes.task_done()

    def _writes_resumed(self) -> None:
        if self._write_outage.ended():
            log.warning("%d step events were not written to Redis in the outage", self._dropped_events)
            self._dropped_events = 0

    async def _write(self, job: Job, event: dict) -> None:
        running = self._running.get(job.id)
        if running is None:
            return
        keys = [self.key("job", job.id), self.key("events", job.id), self.key("claimed", self.replica)]
        if event["event"] != "end":
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(self.key("events", job.id), json.dumps(event))
                pipe.expire(self.key("events", job.id), self._unfinished_ttl)
                pipe.publish(self.key("wake"), job.id)
                await pipe.execute()
            return
        # This replica is going away: another one runs the job, unless its only reader was a request here, answered 503
        # (it sends the request again): the job API's and other replicas' readers find it by its id.
        attempt = running.attempt  # a claim of the job again while this write awaits adopts the next (``_start``)
        if job.error_kind == ErrorKind.shutdown and (job not in self._submitted_here or job.stream_events):
            done = await self._hand_back(job.id, attempt)
            if not done and running.attempt != attempt:
                return await self._write(job, event)
            self._stop_writing(job)
            log.info("job %s: %s", job.id, "handed back to the shared queue" if done else "no longer ours; not handed back")
            if done:
                self._count_end(job, "requeued")
            return
        result = result_to_json(job.result) if job.result is not None else ""
        done = await self._scripts["finish"](keys=keys, args=[
            job.id, self.replica, attempt, job.status.value, job.error or "", job.error_kind or "", result,
            json.dumps(event), self.ttl, self.key("wake"), repr(job.queue_seconds), await self._lighter_events(job)])
        if not done and running.attempt != attempt:  # claimed again meanwhile: the end is the new attempt's
            return await self._write(job, event)
        lost = not done and not await self.redis.exists(self.key("job", job.id))
        self._stop_writing(job)
        if lost:  # Redis restarted without its data: the result stays readable here, where it was made
            log.warning("job %s: the shared job store no longer holds it (Redis restarted without its data?); "
                        "it is kept on this replica only", job.id)
            self._count_end(job)
        elif not done:  # reads of this job now go to Redis, where the retry's state is
            log.warning("job %s: finished here after this replica lost it (lease lapsed); result dropped", job.id)
            self._jobs.pop(job.id, None)
        else:
            self._count_end(job)

    def _stop_writing(self, job: Job) -> None:
        """The job's end is in Redis (or moot): it no longer runs here as far as the store is concerned."""
        running = self._running.get(job.id)
        if running is not None and running.job is job:
            del self._running[job.id]
        if self._on_event in job.listeners:
            job.listeners.remove(self._on_event)

    def _count_end(self, job: Job, outcome: str | None = None) -> None:
        """Count a job's ending on this replica (the worker counts only the jobs submitted to it directly): one that
        ran here and whose end Redis took, one handed back (``requeued``), or one a cancel ended in the queue."""
        if self.worker is not None:
            self.worker.metrics.count_job_end(job, outcome)

    def _count_outcomes(self, outcomes: list[str]) -> None:
        """Count jobs a script ended in Redis without their runner (a dead replica's, a claimed one flagged cancelled):
        by the replica whose script ended them."""
        if self.worker is not None:
            for outcome in outcomes:
                self.worker.metrics.jobs.labels(outcome).inc()

    async def _lighter_events(self, job: Job) -> str:
        """The stored step events of an ended job to replace with their lighter form, as the local job's were."""
        if not job.stream_events:
            return "[]"
        stored = await self.redis.lrange(self.key("events", job.id), 0, -1)
        best_steps = [chain.best_step for chain in job.result.chains] if job.result is not None else []
        lighter = compact_step_events([json.loads(raw) for raw in stored], best_steps)
        return json.dumps([[index, stored[index], json.dumps(event)] for index, event in lighter.items()])

    # ----- wake-ups, cancellations, leases ----------------------------------------------------------

    async def _watch_loop(self) -> None:
        outage = _Outage("the subscription to wake-ups and cancels")
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.key("wake"), self.key("cancel"))
                outage.ended()
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    if message["channel"] == self.key("wake"):
                        job = self._jobs.get(message["data"])
                        if job is not None and job.id in self._mirrored:
                            spawn_background(self._catch_up_logged(job), self._catch_ups)
                    else:
                        request = json.loads(message["data"])
                        running = self._running.get(request["id"])
                        if running is not None:
                            self.worker.cancel(running.job, request["kind"], request["reason"])
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:  # noqa: BLE001 - logged by the outage
                outage.failed(exc)
                await pubsub.aclose()
                await asyncio.sleep(1.0)

    async def _catch_up_logged(self, job: Job) -> None:
        try:
            await self.catch_up(job)
        except Exception as exc:
            if not unreachable(exc):  # an unreachable Redis: the poll brings the job up to date later
                log.exception("could not bring job %s up to date from Redis", job.id)

    async def _heartbeat(self) -> None:
        """Renew the lease and (re)join the replica set.

        Rejoining matters after a lapse (a pause longer than the lease: another replica reaped this one and took it
        out of the set): without it, this replica's later death would never be noticed and its jobs never requeued.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key("alive", self.replica), "1", px=int(self.lease * 1000), get=True)
            pipe.sadd(self.key("replicas"), self.replica)
            previous, _ = await pipe.execute()
        if previous is None and self._renewed:
            log.warning("this replica's lease lapsed (paused, or Redis unreachable, for longer than %g s); jobs it held may "
                        "have been requeued", self.lease)
        self._renewed = True

    async def _lease_loop(self) -> None:
        """Renew this replica's lease; reap dead replicas; poll mirrors; publish the shared queue depth."""
        reap_every = max(self.lease / 2, POLL_SECONDS)
        last_reap = 0.0
        outage = _Outage("the lease, the reaper and the mirrors' poll")
        back_since = -math.inf  # when Redis last answered again after an outage here
        while True:
            try:
                await self._heartbeat()
                self.healthy = True
                if outage.ended():
                    back_since = time.monotonic()
                # Every lease lapsed in an outage of Redis longer than the lease: reaping at once would take the others'
                # running jobs (and run them again) before they could renew. Those that do not within a lease are dead.
                if time.monotonic() - last_reap >= reap_every and time.monotonic() - back_since >= self.lease:
                    await self._reap()
                    last_reap = time.monotonic()
                await self._read_cancels()
                for job in [j for j in self._jobs.values() if j.id in self._mirrored]:
                    await self.catch_up(job)
                await self._end_lost_jobs()
                if self.queue_depth is not None:
                    self.queue_depth.set(await self.queue_length())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged by the outage
                self.healthy = False
                outage.failed(exc)
            await asyncio.sleep(min(self.lease / 3, POLL_SECONDS))

    async def _read_cancels(self) -> None:
        """Cancel the jobs run here that another replica asked to stop: the flag the cancel left on the job, for a
        pub/sub message lost while this replica was (re)subscribing."""
        running = [r.job for r in self._running.values() if r.job.cancellation is None and not r.job.status.finished]
        if not running:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in running:
                pipe.hget(self.key("job", job.id), "cancel")
            flags = await pipe.execute()
        for job, flag in zip(running, flags):
            if flag:
                request = json.loads(flag)
                self.worker.cancel(job, request["kind"], request["reason"])

    async def _reap(self) -> None:
        for replica in await self.redis.smembers(self.key("replicas")):
            if replica == self.replica or await self.redis.exists(self.key("alive", replica)):
                continue
            claimed = self.key("claimed", replica)
            moved, *ended = await self._scripts["reap"](keys=[claimed, self.key("queue")],
                                                        args=[self.prefix, self.max_attempts, self.key("wake"), self.ttl])
            self._count_outcomes(ended)
            if moved:
                log.warning("replica %s stopped renewing its lease; %d of its jobs requeued or failed", replica, moved)
            if not await self.redis.llen(claimed):
                await self.redis.srem(self.key("replicas"), replica)
