"""The shared store's object, :class:`SharedJobs`: its life cycle, submitting, reading and cancelling jobs, the
replicas' leases and the reaper. The keys it uses are laid out in the package's docstring."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
import uuid
import weakref
from typing import TYPE_CHECKING

from app.service.jobs import ErrorKind, Job, JobStatus, spawn_background
from app.service.shared.faults import POLL_SECONDS, Outage, RedisError, unreachable
from app.service.shared.mirrors import Mirrors
from app.service.shared.records import SCRIPTS, config_spec
from app.service.shared.runs import RunningJob, Runs

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

    from app.runtime import Runtime
    from app.service.worker import EngineWorker

log = logging.getLogger(__name__)

CLOSE_SECONDS = 5.0


def replica_name() -> str:
    """Unique per process: the host (a pod's name on Kubernetes), the pid and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SharedJobs(Mirrors, Runs):
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
        self._running: dict[str, RunningJob] = {}
        self._ended_claims: dict[str, int] = {}  # job → a claim of this replica's whose end the writer wrote before the claim loop saw it
        self._mirrored: dict[str, int] = {}  # id → how many of its Redis events the local object has applied
        self._seen: set[str] = set()  # mirrored ids whose record Redis was seen to hold (checked for its loss)
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes: asyncio.Queue = asyncio.Queue()
        self._write_outage = Outage("writing job events (a job's end is retried until written, step events are dropped)")
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

    # ----- counting the jobs that end on this replica ---------------------------------------------

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

    # ----- wake-ups, cancellations, leases ----------------------------------------------------------

    async def _watch_loop(self) -> None:
        outage = Outage("the subscription to wake-ups and cancels")
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
        outage = Outage("the lease, the reaper and the mirrors' poll")
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
