"""The jobs this replica runs for the shared store: claimed from the shared queue when the worker has room, checked
against this replica's limits, submitted to the worker, and their events written to Redis in order (a job's end
retried through an outage of Redis). Part of :class:`SharedJobs`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time

from app.engine.types import AlignJob
from app.service.events import compact_step_events
from app.service.jobs import ErrorKind, Job, JobStatus
from app.service.shared.faults import POLL_SECONDS, Outage, RedisError, unreachable
from app.service.shared.records import result_to_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunningJob:
    job: Job
    attempt: int



class Runs:
    """The running side of :class:`SharedJobs` (whose ``__init__`` holds the state: ``_running``, ``_writes``,
    ``_write_outage``, ``_dropped_events``)."""

    async def _claim_loop(self) -> None:
        claimed_key = self.key("claimed", self.replica)
        outage = Outage("claiming from the shared queue")
        unanswered = False  # Redis could not be reached: a claim may have run without its reply reaching here
        while True:
            try:
                if unanswered:
                    await self._settle_claims(claimed_key)
                    unanswered = False
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
                ended_here = self._ended_claims.pop(job_id, 0)
                if job_id in self._running or ended_here >= int(claim[0]):
                    # Claimed again while it runs here, or after its end was written under this very claim (read from
                    # Redis by the writer): the run here carries on as, or already was, this attempt.
                    self._adopt(job_id, int(claim[0]))
                    continue
                if not self._claiming or self._is_draining():  # the drain began while BLMOVE waited: let another replica run it
                    await self._hand_back(job_id, int(claim[0]))
                    log.info("job %s: claimed as this replica began to drain; handed back to the shared queue", job_id)
                    continue
                try:
                    spec, created = json.loads(claim[1]), float(claim[2])
                    if not isinstance(spec, dict):
                        raise TypeError("its spec is not a JSON object")
                except (TypeError, ValueError) as exc:  # a record no replica wrote: it fails, once (retrying cannot mend it)
                    self._start(job_id, int(claim[0]), {}, time.time(), exc)
                    continue
                local = self._jobs.get(job_id)
                work = None
                if local is None or local.status.finished:  # built here from the spec (its prompt tokenized off the loop)
                    try:
                        work = await self._work(spec)
                    except Exception as exc:  # noqa: BLE001 - the job fails in _start, naming it
                        work = exc
                self._start(job_id, int(claim[0]), spec, created, work)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged by the outage, with its traceback unless Redis is unreachable
                outage.failed(exc)
                unanswered = unanswered or unreachable(exc)
                await asyncio.sleep(1.0)

    async def _settle_claims(self, claimed_key: str) -> None:
        """Settle the claims whose reply was lost (the connection dropped after BLMOVE or the claim script ran): nobody
        takes a job from a live replica's claimed list. A job there that this replica does not run goes back to the
        shared queue; one it runs (claimed again after another replica requeued it, this one's lease having lapsed) is
        claimed, if need be, and its run carries on as the new attempt, whose end alone Redis takes. Called by the claim
        loop only, between claims: a job it claimed is running by then."""
        for job_id in await self.redis.lrange(claimed_key, 0, -1):
            running = self._running.get(job_id)
            if running is None:
                if await self._scripts["unclaim"](keys=[self.key("job", job_id), self.key("events", job_id), claimed_key,
                                                        self.key("queue")], args=[job_id, self.replica, self.key("wake")]):
                    log.warning("job %s: the reply to its claim was lost; put back in the shared queue", job_id)
                continue
            status, owner, attempts = await self.redis.hmget(self.key("job", job_id), "status", "owner", "attempts")
            if status == "queued" and (claim := await self._claim(job_id, claimed_key)) is not None:
                self._adopt(job_id, int(claim[0]))
            elif status == "running" and owner == self.replica:
                self._adopt(job_id, int(attempts or 0))

    def _adopt(self, job_id: str, attempt: int) -> None:
        """A job this replica runs was claimed again (its lease lapsed, another replica requeued it, this one took it):
        the run carries on as the new attempt (submitting it again would run it twice, and the first run's end would be
        written under the new attempt and the second's never). Nothing if the run has ended meanwhile."""
        running = self._running.get(job_id)
        if running is not None and attempt > running.attempt:
            running.attempt = attempt
            log.info("job %s: claimed again while it still runs here (attempt %d); the run goes on", job_id, attempt)

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
        """Run a job claimed here that does not run here yet (the claim loop adopts a claim of one that does)."""
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
            self._running[job_id] = RunningJob(job, attempt)
            job.listeners.append(self._on_event)
            job.finish(JobStatus.failed, None, f"this replica cannot run the job: {exc}", ErrorKind.engine)
            return
        self._jobs[job_id] = job
        job.status = JobStatus.queued
        self._running[job_id] = RunningJob(job, attempt)
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
        attempt = running.attempt  # a claim of the job again while this write awaits adopts the next (``_adopt``)
        if job.error_kind == ErrorKind.shutdown and (job not in self._submitted_here or job.stream_events):
            done = await self._hand_back(job.id, attempt)
            if not done and await self._claimed_again(job.id, running, attempt):
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
        if not done and await self._claimed_again(job.id, running, attempt):  # the end is the new attempt's
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

    async def _claimed_again(self, job_id: str, running: RunningJob, attempt: int) -> bool:
        """Whether this replica claimed the job again since ``attempt`` (another replica requeued it when this one's
        lease lapsed): the claim adopted the new attempt, or Redis holds it where the claim's reply was lost (adopted
        now)."""
        if running.attempt == attempt:
            status, owner, attempts = await self.redis.hmget(self.key("job", job_id), "status", "owner", "attempts")
            if status == "running" and owner == self.replica:
                self._adopt(job_id, int(attempts or 0))
                if running.attempt != attempt:
                    self._ended_claims[job_id] = running.attempt  # the claim loop may yet receive this claim: not run again
        return running.attempt != attempt

    def _stop_writing(self, job: Job) -> None:
        """The job's end is in Redis (or moot): it no longer runs here as far as the store is concerned."""
        running = self._running.get(job.id)
        if running is not None and running.job is job:
            del self._running[job.id]
        if self._on_event in job.listeners:
            job.listeners.remove(self._on_event)

    async def _lighter_events(self, job: Job) -> str:
        """The stored step events of an ended job to replace with their lighter form, as the local job's were."""
        if not job.stream_events:
            return "[]"
        stored = await self.redis.lrange(self.key("events", job.id), 0, -1)
        best_steps = [chain.best_step for chain in job.result.chains] if job.result is not None else []
        lighter = compact_step_events([json.loads(raw) for raw in stored], best_steps)
        return json.dumps([[index, stored[index], json.dumps(event)] for index, event in lighter.items()])

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
