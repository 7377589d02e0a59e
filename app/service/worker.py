"""The engine worker: one thread owns the models and runs continuous batches of chains.

Requests wait in a bounded queue. Between steps the worker admits queued requests while the batch
has room (``max_batch_chains``), drops cancelled or expired ones, runs one batched step, publishes
each request's step event, and hands finished results back to the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import sys
import threading
import time
import traceback

import torch

from app.engine.sea import Engine
from app.engine.state import RequestState, Starting
from app.service.events import step_event
from app.service.jobs import ErrorKind, Job, JobStatus
from app.service.metrics import Metrics
from models.errors import is_out_of_memory

log = logging.getLogger(__name__)

GIL_SWITCH_SECONDS = 0.001
BASELINE_SLICE_SECONDS = 0.25  # a baseline runs at least this long between the worker's looks at its queue


def _deliver(job: Job, last_event: dict | None, result) -> None:
    if last_event is not None:
        job.publish(last_event)
    job.finish(JobStatus.succeeded, result)


def _unwanted(job: Job, now: float | None = None) -> bool:
    """Whether nobody waits for a job's result any more: cancelled, past its deadline, or already ended (a shutdown
    fails the jobs still running before the step they are in ends)."""
    return (job.cancel_requested or job.status.finished
            or (job.deadline is not None and (time.monotonic() if now is None else now) > job.deadline))


def _release_accelerator_memory() -> None:
    """Give the cached blocks of a failed step back to the device (call it outside the handler, once they are free)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _accelerator_broken(error: BaseException) -> bool:
    """Whether ``error`` leaves the device unusable for the rest of the process (not an out-of-memory error)."""
    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


class QueueFullError(RuntimeError):
    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class DrainingError(RuntimeError):
    """The service is shutting down and takes no new work."""


class EngineWorker:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, metrics: Metrics, max_batch_chains: int, max_queue: int,
                 batch_window: float = 0.0):
        self.engine = engine
        self.loop = loop
        self.metrics = metrics
        self.max_batch_chains = max_batch_chains
        self.max_queue = max_queue
        self.batch_window = batch_window  # seconds an idle engine waits for more requests before starting (see _gather)
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[tuple[Job, RequestState]] = []
        self._starting: list[Job] = []  # admitted, drawing their initial samples (not yet active)
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="sea-engine", daemon=True)
        self._job_seconds = 5.0  # running mean of a job's run time, for Retry-After
        self.fatal: str | None = None  # why the device can no longer serve (a sticky accelerator error), once it cannot

    # ----- called on the event loop ------------------------------------------------------------

    def start(self) -> None:
        # The engine thread runs long stretches of Python between kernels (module calls, proposals). At the default
        # 5 ms switch interval the event loop waits up to 5 ms for the GIL every time it wakes, on every request.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_SECONDS))
        self._thread.start()

    def submit(self, job: Job, bounded: bool = True) -> None:
        """Queue a job (429 past ``max_queue`` unless ``bounded`` is off: the shared store queues in Redis)."""
        with self._cond:
            if self._draining:
                raise DrainingError("the service is shutting down")
            if bounded and self._waiting_locked() >= self.max_queue:
                raise QueueFullError(self.retry_after())
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        if bounded and self._count_end not in job.listeners:  # the shared store counts the jobs it hands the worker
            job.listeners.append(self._count_end)

    def _count_end(self, job: Job, event: dict) -> None:
        """A listener of a local job's events: counts how it ended."""
        if event["event"] == "end":
            job.listeners.remove(self._count_end)
            self.metrics.count_job_end(job)

    def _waiting_locked(self) -> int:
        """Queued jobs that will not join the batch at the next step boundary: the queue limit counts only those (the
        jobs that fit the batch's free chains wait only for the batching window, or the step or start in progress)."""
        return len(self._pending) - self._joining_locked(self._running())

    def _running(self) -> list[Job]:
        """The jobs in the batch, and those drawing their start to join it."""
        active = [job for job, _ in self._active]
        return active + [job for job in self._starting if job not in active]  # a started job joins before _starting clears

    def _joining_locked(self, batch: list[Job]) -> int:
        """How many queued jobs, from the front, join a batch of ``batch``'s jobs at the next step boundary (an idle
        engine takes the first whatever its chains)."""
        chains, joining = sum(job.chains for job in batch), 0
        for job in self._pending:
            if (batch or joining) and chains + job.chains > self.max_batch_chains:
                break
            joining += 1
            chains += job.chains
        return joining

    def has_room(self) -> bool:
        """Whether a job taken now would join the batch at the next step (nothing waits, chains to spare)."""
        with self._cond:
            return not self._draining and not self._pending and sum(job.chains for job in self._running()) < self.max_batch_chains

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: a queued job moves into the batch whenever a running one ends,
        and with ``running`` jobs in flight one ends about every mean job time / ``running`` (not when the whole
        queue has drained, which is what a client waiting for one slot would otherwise be told)."""
        running = max(1, len(self._active))
        return max(1, math.ceil(self._job_seconds / running))

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def cancel(self, job: Job, kind: ErrorKind = ErrorKind.cancelled, reason: str = "cancelled by the client") -> None:
        """Cancel a job: a queued one at once, a running one at the next step boundary. The first cancellation holds
        (a client's cancel then its deadline: cancelled, not timed out)."""
        if job.cancellation is None:
            job.cancellation = (kind, reason)
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                self.metrics.observe_left_queue(job)
                self._finish_cancelled(job, kind, reason)

    def _finish_cancelled(self, job: Job, kind: ErrorKind, reason: str) -> None:
        status = JobStatus.cancelled if kind == ErrorKind.cancelled else JobStatus.failed
        self._call(job.finish, status, None, reason, kind)

    @property
    def idle(self) -> bool:
        """Nothing queued, running or drawing its start."""
        with self._cond:
            return not self._pending and not self._running()

    def ended_in_batch(self, owner: str) -> int:
        """``owner``'s jobs that a deadline ended at once (the 504 does not wait) while their chains are still in the batch or
        drawing their start: they leave at the next step boundary, and hold the engine until then. A job that ended
        with its result is not one: its chains are done, though it stays listed until the step has delivered the
        others' results."""
        with self._cond:
            return sum(1 for job in self._running() if job.owner == owner and job.status.finished and job.cancellation is not None)

    @property
    def load(self) -> tuple[int, int]:
        """(queued requests, chains in the running batch and in the requests drawing their start)."""
        with self._cond:
            return len(self._pending), sum(job.chains for job in self._running())

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it is started by ``start`` and ends only with ``stop``)."""
        return self._thread.is_alive()

    async def drain(self, timeout: float) -> None:
        """Stop taking work; let queued and running jobs finish within ``timeout``; fail what is left."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # stop() joins the worker thread, which may be inside a long step: keep the event loop free meanwhile.
        await asyncio.to_thread(self.stop, "the service shut down before the job could finish")

    def stop(self, reason: str = "the service stopped") -> None:
        """Stop at once: queued, starting and running jobs fail with ``reason`` (kind `shutdown`), then the thread is
        joined (at most 30 s). ``drain`` is the gentle way."""
        with self._cond:
            self._stopping = True
            self._draining = True
            leftover = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        # Fail what is left before joining: the thread may be inside a long step, and a waiter must get its 503
        # while its connection is open (a job that the step finishes meanwhile keeps this first ending).
        for job in leftover:
            self.metrics.observe_left_queue(job)
        for job in leftover + list(self._starting) + [job for job, _ in list(self._active)]:
            self._call(job.finish, JobStatus.failed, None, reason, ErrorKind.shutdown)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for job, _ in list(self._active):  # started during the join (the thread admits nothing once stopping)
            self._call(job.finish, JobStatus.failed, None, reason, ErrorKind.shutdown)
        self._active = []
        self._starting = []
        self.metrics.queue_depth.set(0)
        self._update_gauges()

    # ----- the worker thread -------------------------------------------------------------------

    def _call(self, fn, *args) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        torch.set_grad_enabled(True)
        device = self.engine.device
        if device.type == "cuda" and device.index is not None:  # CUDA's current device is per thread (cuda:0 unless set)
            torch.cuda.set_device(device)
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                self._gather_locked()
                self._expire_queued_locked()
                admitted = self._starting = self._admit_locked()
            self._update_gauges()
            try:
                if admitted:
                    self._start(admitted)
                    self._starting = []
                self._drop_cancelled()
                if self._active:
                    self._step()
            except Exception as exc:
                # A bug outside the engine's own calls (which _start and _tick_resilient guard) must not kill the
                # thread: fail the running batch and the jobs being started, keep serving the queue.
                self._note_fatal(exc)
                failing = {job.id: job for job in admitted + [job for job, _ in self._active]}
                log.exception("worker error with %d requests running or starting; failing them", len(failing))
                for job in failing.values():  # finish() ignores a job that already finished
                    self._call(job.finish, JobStatus.failed, None, "internal engine error", ErrorKind.engine)
                self._active = []
                self._starting = []
                self._update_gauges()

    def _gather_locked(self) -> None:
        """With the engine idle and a request waiting, wait until none has arrived for ``batch_window`` (at most ten
        windows in all, or until the batch is full). Requests sent together reach the engine a few milliseconds
        apart (each is parsed, validated and tokenised on the event loop first); started together, their starts
        (drawing the initial samples, a third of a request) run as one batch instead of one after another."""
        if not self.batch_window or self._active or not self._pending:
            return
        now = time.monotonic()
        give_up, quiet_until, seen = now + 10 * self.batch_window, now + self.batch_window, len(self._pending)
        while not self._stopping and sum(job.chains for job in self._pending) < self.max_batch_chains:
            now = time.monotonic()
            if now >= min(quiet_until, give_up):
                return
            self._cond.wait(timeout=min(quiet_until, give_up) - now)
            if len(self._pending) > seen:
                seen, quiet_until = len(self._pending), time.monotonic() + self.batch_window

    def _expire_queued_locked(self) -> None:
        """Fail queued jobs whose deadline passed while they waited (nobody may be polling for them)."""
        now = time.monotonic()
        expired = [job for job in self._pending if job.deadline is not None and now > job.deadline]
        for job in expired:
            self._pending.remove(job)
            self._expire(job)
        if expired:
            self.metrics.queue_depth.set(len(self._pending))

    def _expire(self, job: Job) -> None:
        """Fail a job whose deadline passed before the engine took it."""
        self.metrics.observe_left_queue(job)
        self._call(job.finish, JobStatus.failed, None, "the request timed out while queued", ErrorKind.timeout)

    def _admit_locked(self) -> list[Job]:
        admitted = [self._pending.popleft() for _ in range(self._joining_locked([job for job, _ in self._active]))]
        self.metrics.queue_depth.set(len(self._pending))
        return admitted

    def _start(self, admitted: list[Job]) -> None:
        """Start the jobs admitted together in one batch; if that fails, one by one, so a bad job fails alone."""
        jobs = []
        for job in admitted:
            if job.cancellation is not None:
                self.metrics.observe_left_queue(job)
                self._finish_cancelled(job, *job.cancellation)
            elif job.deadline is not None and time.monotonic() > job.deadline:
                self._expire(job)
            else:
                job.started = time.monotonic()
                job.work.abandoned = functools.partial(_unwanted, job)
                self._call(job.mark_running, job.started)  # the stamp travels with the call: the loop may run it later
                self.metrics.queue_wait.observe(job.started - job.enqueued)
                jobs.append(job)
        if not jobs:
            return
        failure = None
        try:
            states = self.engine.start_many([job.work for job in jobs], sliced=True)
        except Exception as exc:  # noqa: BLE001 -- retried below, outside this block
            failure = exc
            traceback.clear_frames(exc.__traceback__)  # the failed start's locals (its tensors): a log record keeps the rest
        if failure is not None:
            # Retried out here, its frames cleared: the exception's traceback would keep the failed batch's tensors (its
            # prompt caches and samples) alive, and a job that fits alone could run out of memory again.
            if len(jobs) == 1:
                self._start_failed(jobs[0], failure)
                return
            log.warning("starting %d jobs together failed; starting them one by one", len(jobs), exc_info=failure)
            failure = None
            _release_accelerator_memory()
            states = [self._start_alone(job) for job in jobs]
        for job, state in zip(jobs, states):
            if state is not None:
                self._started(job, state, self._active)
        self._update_gauges()

    def _start_alone(self, job: Job) -> RequestState | None:
        """Start ``job`` by itself, in one go (its start with others failed: those started again one after another
        hold no more memory than one); None if that fails too (the job failed)."""
        try:
            return self.engine.start_many([job.work])[0]
        except Exception as exc:  # noqa: BLE001 -- logged with its traceback by _start_failed
            self._start_failed(job, exc)
            return None

    def _start_failed(self, job: Job, error: BaseException) -> None:
        """Fail a job whose start raised ``error``."""
        self._fail_alone(job, error, "starting", "out of memory: ask for fewer chains, samples or tokens")

    def _fail_alone(self, job: Job, error: BaseException, doing: str, out_of_memory: str) -> None:
        """Fail ``job`` alone after ``error`` while ``doing`` its own work: as overloaded, saying ``out_of_memory``, when
        the device ran out of memory; else as an engine error."""
        self._note_fatal(error)
        if is_out_of_memory(error):
            log.error("out of memory %s job %s", doing, job.id, exc_info=error)
            self._call(job.finish, JobStatus.failed, None, out_of_memory, ErrorKind.overloaded)
        else:
            log.error("engine failed %s job %s", doing, job.id, exc_info=error)
            self._call(job.finish, JobStatus.failed, None, "internal engine error", ErrorKind.engine)

    def _note_fatal(self, error: BaseException) -> None:
        """An accelerator error (an illegal memory access, a device-side assert) fails every later call on the device:
        the process can no longer serve, and says so (the service refuses work and fails its liveness check)."""
        if self.fatal is None and _accelerator_broken(error):
            self.fatal = f"the accelerator failed ({str(error).splitlines()[0][:200]}); the service needs a restart"
            log.critical("%s", self.fatal)

    def _started(self, job: Job, state: RequestState, batch: list) -> None:
        """A started job, or one whose start (``state.starting``) just ended, joins ``batch`` unless it has ended."""
        if state.cancelled:  # abandoned while it started
            self._end_unwanted(job)
            return
        if state.starting is None and state.step == 0 and state.initial:  # its initial chains scored (the discrete update)
            self._call(job.publish, step_event(self.engine, state, job.stream_events))
        if state.done:
            self._complete(job, state)
        else:
            batch.append((job, state))

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        keep = []
        for job, state in self._active:
            if _unwanted(job, now):
                self.engine.cancel(state)
                self._end_unwanted(job)
            else:
                keep.append((job, state))
        self._active = keep
        self._update_gauges()

    def _end_unwanted(self, job: Job) -> None:
        if job.cancellation is not None:  # by the client, or by the service (the deadline timer submit armed)
            self._finish_cancelled(job, *job.cancellation)
        else:
            self._call(job.finish, JobStatus.failed, None, "the request ran past its deadline", ErrorKind.timeout)

    def _step(self) -> None:
        """One step of the SEA requests in the batch (their events published), then the baselines' runs and the
        starts' draws for as long as that step took (at least ``BASELINE_SLICE_SECONDS``), shared among them: a
        Best-of-256, or a request joining with 64 chains to draw, no longer holds the batch for its whole run."""
        stepping = [(job, state) for job, state in self._active if state.baseline is None and state.starting is None]
        running = [(job, state) for job, state in self._active if state.baseline is not None]
        starts = {id(state.starting): state.starting for _, state in self._active if state.starting is not None}
        started = time.perf_counter()
        failed = self._tick_resilient([state for _, state in stepping]) if stepping else {}
        took = time.perf_counter() - started
        if stepping:
            self.metrics.step_seconds.observe(took)
            self.metrics.batch_chains.observe(sum(state.chains for _, state in stepping))
        still = []
        for job, state in stepping:
            if id(state) in failed:
                self._call(job.finish, JobStatus.failed, None, *failed[id(state)])
                continue
            if state.cancelled:  # abandoned during the step (a restart stopped drawing for it)
                self._end_unwanted(job)
                continue
            event = step_event(self.engine, state, job.stream_events)
            if state.done and state.result is None:  # an engine bug must fail its own job only, not the batch
                log.error("job %s: the engine ended it without a result", job.id)
                self._call(job.finish, JobStatus.failed, None, "internal engine error", ErrorKind.engine)
                continue
            if state.done:
                self._complete(job, state, event)
            else:
                self._call(job.publish, event)
                still.append((job, state))
        share = max(took, BASELINE_SLICE_SECONDS) / max(len(running) + len(starts), 1)
        for job, state in running:  # each runs at least one piece of its work; no step events: its result ends it
            try:
                self.engine.advance(state, share)
            except Exception as exc:  # noqa: BLE001 -- its own run: it fails alone
                traceback.clear_frames(exc.__traceback__)
                self._fail_alone(job, exc, "running", "out of memory: ask for fewer samples or tokens")
                _release_accelerator_memory()
                continue
            if state.cancelled:  # abandoned while it ran
                self._end_unwanted(job)
            elif state.done:
                self._complete(job, state)
            else:
                still.append((job, state))
        for starting in starts.values():
            self._advance_start(starting, share, still)
        self._active = still
        self._update_gauges()

    def _advance_start(self, starting: Starting, seconds: float, batch: list) -> None:
        """Draw a start's samples for about ``seconds``; its jobs go on in ``batch`` (stepping once it has ended). If it
        fails, a job started alone fails; jobs started together start again one by one (those still wanted)."""
        members = [(job, state) for job, state in self._active if state.starting is starting]
        try:
            ended = self.engine.advance_start(starting, seconds)
        except Exception as exc:  # retried below, its frames cleared (the failed draw's tensors)
            traceback.clear_frames(exc.__traceback__)
            _release_accelerator_memory()
            if len(starting.states) == 1:  # by the draw's rows: a cancelled batch mate's rows were drawn too
                self._start_failed(members[0][0], exc)
                return
            log.warning("starting %d jobs together failed; starting them one by one", len(starting.states), exc_info=exc)
            for job, _ in members:
                if (state := self._start_alone(job)) is not None:
                    self._started(job, state, batch)
            return
        for job, state in members:
            if ended:
                self._started(job, state, batch)
            else:
                batch.append((job, state))

    def _tick_resilient(self, states: list[RequestState]) -> dict[int, tuple[str, str]]:
        """Tick ``states``; if the step fails (out of memory, or an error), split the batch and retry, failing only a
        request that fails alone: one request must not end the others batched with it. Returns, per failed state's id,
        its error and error kind. The engine steps each update
        rule's states apart: they are ticked apart here too, so that a failure in one never steps the other twice."""
        by_update = [[s for s in states if s.config.update == update] for update in dict.fromkeys(s.config.update for s in states)]
        if len(by_update) > 1:
            return {key: value for group in by_update for key, value in self._tick_resilient(group).items()}
        try:
            self.engine.tick(states)
            return {}
        except Exception as exc:
            self._note_fatal(exc)  # never for running out of memory
            out_of_memory = is_out_of_memory(exc)
            if len(states) == 1:
                if out_of_memory:
                    log.warning("out of memory on a single request; failing it")
                    return {id(states[0]): ("out of memory: ask for fewer chains or tokens", ErrorKind.overloaded)}
                log.exception("engine step failed for a request")
                return {id(states[0]): ("internal engine error", ErrorKind.engine)}
            if out_of_memory:
                log.warning("out of memory on a batch of %d requests; splitting", len(states))
            else:
                log.warning("engine step failed for a batch of %d requests; splitting to find the one that fails", len(states),
                            exc_info=True)
        _release_accelerator_memory()  # out of the handler: the failed step's tensors are free by now
        half = len(states) // 2
        return {**self._tick_resilient(states[:half]), **self._tick_resilient(states[half:])}

    def _complete(self, job: Job, state: RequestState, last_event: dict | None = None) -> None:
        """Hand the result to the event loop (after the last step event, in the same callback), then count it. The
        log-probs a request asked for are added first: if that fails, this job fails alone."""
        failure = None
        try:
            self.engine.attach_token_log_probs(state)
        except Exception as exc:  # noqa: BLE001 -- this request's own pass: it fails alone
            failure = exc
            traceback.clear_frames(exc.__traceback__)
        if failure is not None:
            self._fail_alone(job, failure, "listing the log-probs of", "out of memory listing log-probs: ask for fewer choices or tokens")
            _release_accelerator_memory()
            return
        result = state.result
        self._call(_deliver, job, last_event, result)
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * result.timings.total
        self.metrics.observe_result(result)

    def _update_gauges(self) -> None:
        running = self._running()
        self.metrics.jobs_running.set(len(running))
        self.metrics.chains_in_flight.set(sum(job.chains for job in running))
