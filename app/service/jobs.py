"""Jobs: one accepted request each, with its status, step events and result, and the store that keeps them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from app.engine.types import AlignJob, AlignResult
from app.service.events import compact_step_events, held_event_bytes

log = logging.getLogger(__name__)


def spawn_background(coro, tasks: set[asyncio.Task]) -> asyncio.Task:
    """Run ``coro`` as a fire-and-forget task, referenced from ``tasks`` until it ends (the event loop keeps only weak
    references to tasks); a failure is logged."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    task.add_done_callback(done)
    return task


LONG_PROMPT_CHARACTERS = 8192  # a prompt longer than this is rendered and tokenized in a thread, not on the event loop


def prompt_characters(messages: list[dict[str, str]]) -> int:
    """The characters of a chat's messages, all together."""
    return sum(len(message["content"]) for message in messages)


async def engine_job(runtime, messages: list[dict[str, str]], config, reward_options: dict) -> AlignJob:
    """``runtime.job``: the prompt rendered and tokenized, the rewards prepared; in a thread when the prompt is long
    (166 000 CJK characters take 0.23 s), so that the event loop serves everyone else meanwhile."""
    if prompt_characters(messages) > LONG_PROMPT_CHARACTERS:
        return await asyncio.to_thread(runtime.job, messages, config, **reward_options)
    return runtime.job(messages, config, **reward_options)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ErrorKind(str, Enum):
    """Why a job ended without its result: its ``error_kind``, its error answer's ``code`` and the outcome it is
    counted under (``sea_jobs_total``)."""

    cancelled = "cancelled"  # by its client, or as its request's other prompt failed
    timeout = "timeout"
    engine = "engine"
    overloaded = "overloaded"  # out of memory
    shutdown = "shutdown"
    lost = "lost"  # the shared job store (Redis) no longer holds it: restarted without its data

    def __str__(self) -> str:  # the value, as metric labels, logs and Redis take it
        return self.value


MOST_JOBS_KEPT = 10_000  # finished jobs a replica keeps readable (most a few kB; step events at the limits a few MB)


@dataclass(eq=False)
class Job:
    """A request's life on the service. Mutated only on the event loop (the worker hands over with call_soon_threadsafe)."""

    work: AlignJob
    model: str
    stream_events: bool = False  # per-step events with each chain's text (the job API and the playground)
    deadline: float | None = None  # time.monotonic() after which the job is failed with a timeout
    return_trace: bool = False
    owner: str | None = None  # who submitted it (a digest of their API key; None without keys): only they read or cancel it
    id: str = field(default_factory=lambda: "job-" + uuid.uuid4().hex[:24])
    created: float = field(default_factory=time.time)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished_at: float | None = None
    status: JobStatus = JobStatus.queued
    result: AlignResult | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None  # read from the shared store: the kind's value, an equal plain string
    event_bytes: int = 0  # once finished: about what its step events hold (``held_event_bytes``)
    cancellation: tuple[ErrorKind, str] | None = None  # (error kind, reason) once cancelled; read by the worker thread
    queue_seconds_final: float | None = None  # set on mirrors of a job another replica ran: its runner's figure
    events: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[Callable[[Job, dict[str, Any]], None]] = field(default_factory=list)  # e.g. the shared store's writer
    _subscribers: list[asyncio.Queue] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def cancel_requested(self) -> bool:
        return self.cancellation is not None

    @property
    def chains(self) -> int:
        return self.work.config.batch_rows

    @property
    def queue_seconds(self) -> float:
        """Seconds waited before the engine took the job (so far, while still queued)."""
        if self.queue_seconds_final is not None:
            return self.queue_seconds_final
        return (self.started or time.monotonic()) - self.enqueued

    def publish(self, event: dict[str, Any]) -> None:
        """Record an event and hand it to the listeners and the subscribed streams (on the event loop); a step that
        comes after the job ended is dropped."""
        if self.status.finished and event["event"] != "end":  # a step the worker ran while a timeout or a stop ended it
            return
        self.events.append(event)
        for listener in list(self.listeners):
            listener(self, event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    def subscribe(self) -> tuple[list[dict[str, Any]], asyncio.Queue]:
        """Past events and a queue of the ones to come (call on the event loop)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(queue)
        return list(self.events), queue

    @property
    def subscribers(self) -> int:
        """Event streams reading this job now."""
        return len(self._subscribers)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    def mark_running(self, started: float | None = None) -> None:
        """``started``: when the engine took the job (the worker's clock reading; this call may reach the loop later)."""
        if self.status.finished:  # ended (a timeout) before this call reached the loop
            return
        self.status = JobStatus.running
        self.started = time.monotonic() if started is None else started

    def finish(self, status: JobStatus, result: AlignResult | None = None, error: str | None = None, kind: ErrorKind | None = None) -> None:
        """End the job once (later calls change nothing): its status, result or error and its kind, the step events
        kept in their lighter form, and the `end` event that wakes every waiter and stream."""
        if self.status.finished:
            return
        self.status = status
        self.result = result
        self.error = error
        self.error_kind = kind
        self.finished_at = time.monotonic()
        log.info("job %s %s%s", self.id, status.value, f": {error}" if error else "")  # every accepted job ends in the log
        # New objects, not edits: a subscriber may not have sent the full events yet.
        for index, event in compact_step_events(self.events, [c.best_step for c in result.chains] if result else []).items():
            self.events[index] = event
        self.event_bytes = held_event_bytes(self.events)
        self.publish({"event": "end", "status": status.value})
        self._done.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job has finished; False on timeout."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def listed_log_probs(result: AlignResult | None) -> int:
    """How many token log-probs (tokens and their alternatives) ``result`` lists: about 110 bytes each as held."""
    if result is None:
        return 0
    return sum(len(c.token_log_probs) * (1 + len(c.token_log_probs[0].top)) for c in result.chains if c.token_log_probs)


class JobStore:
    """In-memory jobs by id; finished jobs are dropped ``ttl`` seconds after they finish, and some sooner: as soon as
    more than ``most_kept`` jobs are held (a client cancelling what it submits, thousands a minute, fills no memory),
    or, at each ``expire``, while the finished jobs list more than ``most_listed`` token log-probs (a result listing
    Best-of-N samples' alternatives holds tens of MB) or their step events hold more than ``most_event_bytes`` (a
    `/jobs` request at the limits keeps a few MB of them for its replay). Those go from the owner (API key) that holds
    the most, oldest first: one key filling the store drops its own results, not another key's."""

    def __init__(self, ttl: float, most_kept: int = MOST_JOBS_KEPT, most_listed: int | None = None, most_event_bytes: int | None = None):
        self.ttl = ttl
        self.most_kept = most_kept
        self.most_listed = most_listed
        self.most_event_bytes = most_event_bytes
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        if len(self.jobs) > self.most_kept:
            # a tenth at a time: one scan per many adds
            self._drop_from_the_largest({done.id: 1 for done in self._finished()}, len(self.jobs) - self.most_kept * 9 // 10)

    def get(self, job_id: str) -> Job | None:
        """The job, unless it expired (the others expire in ``expire``, which the service runs periodically)."""
        job = self.jobs.get(job_id)
        if job is not None and job.finished_at is not None and time.monotonic() - job.finished_at > self.ttl:
            del self.jobs[job_id]
            return None
        return job

    def expire(self) -> int:
        """Drop finished jobs past their TTL, then, past the store's bounds (listed log-probs, step-event bytes), the
        oldest of the owner holding the most. Returns how many jobs it dropped."""
        now = time.monotonic()
        old = [job.id for job in self._finished() if now - job.finished_at > self.ttl]
        for jid in old:
            del self.jobs[jid]
        dropped = 0
        if self.most_listed is not None:
            listing = {job.id: listed for job in self._finished() if (listed := listed_log_probs(job.result))}
            dropped += self._drop_from_the_largest(listing, sum(listing.values()) - self.most_listed)
        if self.most_event_bytes is not None:
            replays = {job.id: job.event_bytes for job in self._finished() if job.event_bytes}
            dropped += self._drop_from_the_largest(replays, sum(replays.values()) - self.most_event_bytes)
        return len(old) + dropped

    def _finished(self) -> list[Job]:
        return [job for job in self.jobs.values() if job.finished_at is not None]

    def _drop_from_the_largest(self, weights: dict[str, int], excess: int) -> int:
        """Drop finished jobs (``weights``: the candidates' ids and what each holds) until ``excess`` of the weight is
        gone, each time the oldest job of the owner whose candidates hold the most. Returns how many went."""
        by_owner: dict[str | None, list[Job]] = {}
        for jid in weights:
            by_owner.setdefault(self.jobs[jid].owner, []).append(self.jobs[jid])
        for jobs in by_owner.values():
            jobs.sort(key=lambda job: job.finished_at, reverse=True)  # the oldest last, popped first
        held = {owner: sum(weights[job.id] for job in jobs) for owner, jobs in by_owner.items()}
        dropped = 0
        while excess > 0 and held:
            owner = max(held, key=held.__getitem__)
            job = by_owner[owner].pop()
            del self.jobs[job.id]
            excess -= weights[job.id]
            held[owner] -= weights[job.id]
            dropped += 1
            if not by_owner[owner]:
                del held[owner]
        return dropped

    def unfinished(self) -> list[Job]:
        return [job for job in self.jobs.values() if not job.status.finished]

    def __len__(self) -> int:
        return len(self.jobs)
