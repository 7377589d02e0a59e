"""Mirrors: the local copies of jobs this replica was asked about (or submitted) while another replica runs them (or
they wait in the shared queue), brought up to date from the events Redis holds. Part of :class:`SharedJobs`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from app.engine.types import AlignJob, SEAConfig
from app.service.jobs import ErrorKind, Job, JobStatus, engine_job
from app.service.shared.faults import unreachable
from app.service.shared.records import result_from_json

log = logging.getLogger(__name__)


class Mirrors:
    """The mirrors' side of :class:`SharedJobs` (whose ``__init__`` holds the state: ``_mirrored``, ``_seen``,
    ``_locks``)."""

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

    async def _catch_up_logged(self, job: Job) -> None:
        try:
            await self.catch_up(job)
        except Exception as exc:
            if not unreachable(exc):  # an unreachable Redis: the poll brings the job up to date later
                log.exception("could not bring job %s up to date from Redis", job.id)
