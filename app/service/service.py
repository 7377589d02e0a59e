"""The service layer: turns validated requests into jobs, queues them, and waits for them on behalf of routes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from app.engine.types import AlignResult, SEAConfig
from app.errors import (
    NO_RETRY,
    ClientClosed,
    GatewayTimeout,
    NotFound,
    ServiceBroken,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from app.runtime import PromptError, Runtime, UnknownRewardError, UnspellableKeywordsError
from app.service.jobs import ErrorKind, Job, JobStatus, JobStore, engine_job, prompt_characters, spawn_background
from app.service.metrics import Metrics
from app.service.shared import RedisError, SharedJobs, unreachable
from app.service.worker import DrainingError, EngineWorker, QueueFullError
from app.settings import Settings

log = logging.getLogger(__name__)

WORKER_STOPPED = "the engine worker stopped; the service needs a restart"
LOAD_FAILED = "the models failed to load (see the server log); the service needs a restart"
START_FAILED = "the service failed to start (see the server log); it needs a restart"
SHARED_RETRY_MAX_SECONDS = 30.0
MOST_EVENT_BYTES = 256 * 2**20  # the finished jobs' step events a replica keeps for their replay (past it the oldest such jobs go)


@contextlib.contextmanager
def _shared_store_errors():
    """Redis unreachable: 503 with Retry-After, the details in the log."""
    try:
        yield
    except RedisError as exc:
        if unreachable(exc):  # a warning a request through an outage, not a traceback each
            log.warning("shared job store call failed: %s", exc)
        else:
            log.exception("shared job store call failed")
        raise ServiceUnavailable("the shared job store is unavailable", headers={"Retry-After": "5"}) from None


class AlignService:
    """Owns the job store and the engine worker once the models are loaded."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        # Kept results may list 8 of the largest log-prob answers (about 230 MB at the default limit).
        self.store = JobStore(settings.job_ttl_seconds, most_listed=8 * settings.max_listed_log_probs, most_event_bytes=MOST_EVENT_BYTES)
        self._entering: collections.Counter[str] = collections.Counter()  # per API key: requests being submitted
        self.runtime: Runtime | None = None
        self.serving_since = 0  # Unix time the models were attached (the served model's `created` on /v1/models)
        self.fingerprint: str | None = None
        self.worker: EngineWorker | None = None
        self.shared: SharedJobs | None = None  # the Redis job store, when SEA_REDIS_URL is set
        self.draining = False
        self.load_error: str | None = None  # set when loading the models failed: a restart is needed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        shared_ok = self.shared is None or self.shared.healthy
        return self.worker is not None and self.worker.alive and not self.draining and shared_ok

    @property
    def waiting_for(self) -> str:
        """What a service that is not ready (and not broken) waits for, as a 503 says it."""
        if self.draining:
            return "the service is shutting down"
        if self.runtime is None:
            return "the models are still loading"
        return "the shared job store is unavailable"

    @property
    def broken(self) -> str | None:
        """Why this process can never serve, if it cannot: the models failed to load, the accelerator failed for good, or
        the engine thread ended while the service should be running (a bug no handler caught). It then refuses work and
        fails its liveness check, to get restarted."""
        if self.load_error is not None:
            return self.load_error
        if self.worker is not None and self.worker.fatal is not None:
            return self.worker.fatal
        if self.worker is not None and not self.worker.alive and not self.draining:
            return WORKER_STOPPED
        return None

    @property
    def model_name(self) -> str:
        return self.runtime.lm.name if self.runtime else "loading"

    async def attach(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        """Start serving with loaded models (unless a SIGTERM came while they loaded)."""
        if self.draining:
            return
        self.runtime = runtime
        self.serving_since = int(time.time())
        self._loop = loop
        worker = EngineWorker(runtime.engine, loop, self.metrics, self.settings.max_batch_chains, self.settings.max_queue,
                              self.settings.batch_window_ms / 1000)
        if self.settings.redis_url.get_secret_value():
            s = self.settings
            self.shared = SharedJobs.connect(
                s.redis_url.get_secret_value(), runtime=runtime, worker=worker, prefix=s.redis_prefix, ttl=s.job_ttl_seconds,
                lease=s.replica_lease_seconds, max_attempts=s.job_max_attempts, max_queue=s.max_queue, jobs=self.store.jobs,
                is_draining=lambda: self.draining, queue_depth=self.metrics.add_shared_queue_depth(), limit_error=s.limit_error,
                longest_timeout=s.request_timeout_seconds, max_prompt_tokens=s.max_prompt_tokens)
            if not await self._start_shared():
                return  # a SIGTERM came first: nothing to drain
        worker.start()
        self.worker = worker
        served = {"model": runtime.lm.name, "device": str(runtime.lm.device), "dtype": str(runtime.lm.dtype).replace("torch.", ""),
                  "rewards": ",".join(sorted(runtime.rewards))}
        self.metrics.model_info.info(served)
        # OpenAI's `system_fingerprint`: what, besides the seed, decides an answer (a change may change seeded answers)
        self.fingerprint = "fp_" + hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:10]

    async def _start_shared(self) -> bool:
        """Join the shared store, retrying while Redis is unreachable (it may start after this replica). False when a
        SIGTERM came first: then nothing of the store runs (its drain has already passed)."""
        delay = 1.0
        while not self.draining:
            try:
                await self.shared.start()
            except Exception as exc:
                if not unreachable(exc):
                    raise
                log.warning("the shared job store is unreachable (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, SHARED_RETRY_MAX_SECONDS)
                continue
            if self.draining:  # the signal came while it joined
                await self.shared.close()
                return False
            return True
        await self.shared.disconnect()
        return False

    # ----- submitting ---------------------------------------------------------------------------

    async def submit(
        self,
        config: SEAConfig,
        messages: list[dict[str, str]],
        reward_options: dict | None = None,
        timeout: float | None = None,
        stream_events: bool = False,
        return_trace: bool = False,
        prompt_param: str = "prompt",
        owner: str | None = None,
        also: int = 0,
    ) -> Job:
        """Build the engine job, check the prompt limit (an error names ``prompt_param``, the field the request sent), and
        queue it (429 when the queue is full). ``also``: jobs of the same request still to come (a completion's further
        prompts), which the key's share counts too."""
        if self.broken is not None:
            raise ServiceBroken(self.broken, headers=NO_RETRY)
        if self.worker is None or self.draining:
            raise ServiceUnavailable(self.waiting_for, headers={"Retry-After": "5"})
        if owner is None or not self.settings.max_jobs_per_key:
            return await self._submit(config, messages, reward_options, timeout, stream_events, return_trace, prompt_param, owner)
        mine = (self._entering[owner] + self.worker.ended_in_batch(owner)
                + sum(1 for other in self.store.jobs.values() if other.owner == owner and not other.status.finished))
        if mine + also >= self.settings.max_jobs_per_key:
            more = f" and this request has {also} more prompt{'s' * (also > 1)} to run" if also else ""
            raise TooManyRequests(f"this API key has {mine} request{'s' * (mine != 1)} in flight{more}; one key may have "
                                  f"{self.settings.max_jobs_per_key} (SEA_MAX_JOBS_PER_KEY): retry when one ends",
                                  headers={"Retry-After": str(self.worker.retry_after())})
        self._entering[owner] += 1  # counted while it is tokenized or queued in Redis (awaits: the key's next request may come)
        try:
            return await self._submit(config, messages, reward_options, timeout, stream_events, return_trace, prompt_param, owner)
        finally:
            self._entering[owner] -= 1
            if not self._entering[owner]:
                del self._entering[owner]

    async def _submit(self, config: SEAConfig, messages: list[dict[str, str]], reward_options: dict | None, timeout: float | None,
                      stream_events: bool, return_trace: bool, prompt_param: str, owner: str | None) -> Job:
        characters = prompt_characters(messages)
        if characters > self.settings.max_prompt_tokens * self.runtime.longest_token_characters:  # sure to be over: not tokenized
            raise Unprocessable(f"the prompt has {characters} characters, more than {self.settings.max_prompt_tokens} tokens "
                                f"hold (the limit is {self.settings.max_prompt_tokens} tokens)", param=prompt_param,
                                code="context_length_exceeded")
        try:
            work = await engine_job(self.runtime, messages, config, reward_options or {})
        except PromptError as exc:
            raise Unprocessable(str(exc), param=prompt_param) from None
        except UnknownRewardError as exc:
            raise Unprocessable(str(exc), param="reward.terms") from None
        except UnspellableKeywordsError as exc:
            raise Unprocessable(str(exc), param="reward.keywords") from None
        except ValueError as exc:  # e.g. an empty reward mix
            raise Unprocessable(str(exc), param="reward") from None
        error = self.runtime.prompt_error(work, self.settings.max_prompt_tokens)
        if error is not None:
            raise Unprocessable(error, param=prompt_param, code="context_length_exceeded")
        timeout = min(timeout or self.settings.request_timeout_seconds, self.settings.request_timeout_seconds)
        job = Job(work, self.model_name, stream_events=stream_events, deadline=time.monotonic() + timeout, return_trace=return_trace,
                  owner=owner)
        if self.shared is not None:
            with _shared_store_errors():
                queued = await self.shared.enqueue(job, messages, reward_options or {})
            if not queued:
                raise TooManyRequests("the queue is full; retry later", headers={"Retry-After": str(self.worker.retry_after())})
        else:
            try:
                self.worker.submit(job)
            except QueueFullError as exc:
                raise TooManyRequests("the queue is full; retry later", headers={"Retry-After": str(exc.retry_after)}) from None
            except DrainingError:
                raise ServiceUnavailable("the service is shutting down", headers={"Retry-After": "5"}) from None
        self.store.add(job)  # (the shared store put it there already: adding keeps the store's bound)
        self._arm_deadline(job, timeout)
        return job

    def _arm_deadline(self, job: Job, timeout: float) -> None:
        """The job fails at its deadline whoever waits for it (a stream, a poller, nobody) and whatever the worker is
        busy with: the worker itself looks at queued deadlines only between steps, which take minutes on a CPU."""
        def passed() -> None:
            if not job.status.finished:
                reason = "the request timed out while queued" if job.status == JobStatus.queued else "the request ran past its deadline"
                self.cancel(job, kind=ErrorKind.timeout, reason=reason)

        timer = asyncio.get_running_loop().call_later(timeout, passed)
        job.listeners.append(lambda job, event: timer.cancel() if event["event"] == "end" else None)

    async def wait(self, job: Job, client_gone: Callable[[], Awaitable[None]] | None = None) -> AlignResult:
        """The job's result; ``client_gone()`` returns when the client leaves, which cancels the job."""
        return (await self.wait_all([job], client_gone))[0]

    async def wait_all(self, jobs: list[Job], client_gone: Callable[[], Awaitable[None]] | None = None) -> list[AlignResult]:
        """The jobs' results (one request's), or the error of the first that fails, as soon as it fails: the others are
        then cancelled, as they are when ``client_gone()`` returns (the client left).

        Nothing polls: the wait wakes when a job finishes (at its deadline at the latest: ``submit`` armed it) or the
        client leaves.
        """
        waiting = {asyncio.ensure_future(job.wait()): job for job in jobs if not job.status.finished}
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None and waiting else None
        try:
            failed = next((job for job in jobs if job.status.finished and job.status != JobStatus.succeeded), None)
            while waiting and failed is None:
                done, _ = await asyncio.wait([*waiting, *([gone] if gone else [])], return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    raise ClientClosed("the client closed the connection")
                ended = [waiting.pop(task) for task in done]
                failed = next((job for job in ended if job.status != JobStatus.succeeded), None)
        except BaseException:
            self.cancel_all(jobs, "the client closed the connection")
            raise
        finally:
            for task in [*waiting, gone]:
                if task is not None and not task.done():
                    task.cancel()
        if failed is not None:
            self.end_with(jobs, failed)
            self.outcome(failed)  # raises its error
        return [self.outcome(job) for job in jobs]

    def end_with(self, jobs: list[Job], failed: Job) -> None:
        """End a request's unfinished jobs once its job ``failed`` has: past the deadline they share, as timed out (each
        a few milliseconds before its own timer); otherwise cancelled (nobody waits for them)."""
        if failed.error_kind == ErrorKind.timeout:
            self.cancel_all(jobs, "the request ran past its deadline", kind=ErrorKind.timeout)
        else:
            self.cancel_all(jobs, "another prompt of its request failed")

    def cancel_all(self, jobs: list[Job], reason: str, kind: ErrorKind = ErrorKind.cancelled) -> None:
        """Cancel those of ``jobs`` (one request's) that have not finished, saying ``reason``."""
        for job in jobs:
            if not job.status.finished:
                self.cancel(job, kind, reason)

    def outcome(self, job: Job) -> AlignResult:
        """The result of a finished job, or the matching error."""
        if job.status == JobStatus.succeeded:
            return job.result
        if job.error_kind == ErrorKind.timeout:
            raise GatewayTimeout(job.error or "timed out", code=ErrorKind.timeout.value, headers=NO_RETRY)
        if job.error_kind == ErrorKind.cancelled:
            raise ClientClosed(job.error or "cancelled", code=ErrorKind.cancelled.value)
        if job.error_kind in (ErrorKind.overloaded, ErrorKind.shutdown, ErrorKind.lost):
            raise ServiceUnavailable(job.error or "overloaded", code=str(job.error_kind), headers={"Retry-After": "5"})
        raise RuntimeError(f"job {job.id} failed: {job.error}")

    # ----- jobs ---------------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if ``owner`` (the API key's holder; None without keys) submitted it: to anyone else it is unknown."""
        job = self.store.get(job_id)
        if job is None and self.shared is not None:
            with _shared_store_errors():
                job = await self.shared.lookup(job_id)
        if job is None or job.owner != owner:
            raise NotFound(f"no job {job_id!r} (unknown, or expired after {self.settings.job_ttl_seconds:g} s)", param="id")
        return job

    async def position(self, job: Job) -> int | None:
        if self.shared is not None and not self.shared.runs(job):
            with _shared_store_errors():
                return await self.shared.position(job)
        return self.worker.position(job) if self.worker and job.status == JobStatus.queued else None

    def cancel(self, job: Job, kind: ErrorKind = ErrorKind.cancelled, reason: str = "cancelled by the client") -> None:
        """Cancel a job: here if it runs or waits here, else through the shared store (in the background). The first
        cancellation holds: a client's cancel, then its deadline, ends it cancelled."""
        if self.worker is None or job.status.finished:
            return
        if self.shared is not None and not self.shared.runs(job):
            if job.cancellation is None:
                job.cancellation = (kind, reason)
            spawn_background(self.shared.cancel(job, kind, reason), self._background)
        else:
            self.worker.cancel(job, kind, reason)
        if kind != ErrorKind.cancelled:  # a deadline answers now, as the first cancellation asked; the chains leave at the next step
            first, why = job.cancellation or (kind, reason)
            job.finish(JobStatus.cancelled if first == ErrorKind.cancelled else JobStatus.failed, None, why, first)

    def request_drain(self) -> None:
        """Stop taking work at once and start draining (safe to call from a signal handler).

        Called on SIGTERM, before the server stops listening, so that the grace period (SEA_DRAIN_SECONDS)
        runs from the signal: a blocking request whose job cannot finish in time gets its 503 while its
        connection is still open.
        """
        self.draining = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> asyncio.Task:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return self._drain_task

    async def shutdown(self) -> None:
        """Drain: refuse new work, let accepted work finish within the grace period, fail the rest."""
        self.draining = True
        await self._start_drain()

    async def _drain(self) -> None:
        if self.worker is None:
            return
        if self.shared is not None:
            self.shared.stop_claiming()
        accepted = self.store.unfinished()
        started = time.monotonic()
        log.info("draining: %d queued, %d chains running; grace period %g s", *self.worker.load, self.settings.drain_seconds)
        await self.worker.drain(self.settings.drain_seconds)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe callbacks run
        elsewhere = [job for job in accepted if not job.status.finished]  # in the shared queue, or run by another replica
        left = self.settings.drain_seconds - (time.monotonic() - started)
        if elsewhere and left > 0:  # their waiters here (a blocking request, a stream) get the result within the grace period
            log.info("draining: waiting up to %.0f s for %d jobs in the shared queue or on other replicas", left, len(elsewhere))
            await asyncio.wait([asyncio.ensure_future(job.wait()) for job in elsewhere], timeout=left)
        # One line per job that was accepted but unfinished at the signal: none is lost silently.
        for job in accepted:
            log.info("drained job %s: %s%s", job.id, job.status.value, f" ({job.error})" if job.error else "")
        if self.shared is not None:
            await self.shared.close()
