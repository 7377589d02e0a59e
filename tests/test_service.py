"""The service layer with a fake engine (no model): queueing, continuous batching, cancellation, faults, drain."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.engine.types import AlignResult, ChainResult, SEAConfig, StepStats, Timings, Usage
from app.errors import GatewayTimeout, NotFound, ServiceUnavailable, TooManyRequests, Unprocessable
from app.runtime import Runtime
from app.service.jobs import JobStatus
from app.service.metrics import JOB_OUTCOMES, Metrics
from app.service.service import AlignService
from app.settings import Settings
from models.rewards import RewardComponent
from tests.tiny import tiny_tokenizer


class FakeState:
    def __init__(self, job, chains):
        self.job = job
        self.config = job.config
        self.chains = chains
        self.step = -1
        self.done = False
        self.result = None
        self.cancelled = False
        self.tokens = None
        self.initial = [StepStats(1.0, 0.0, -1.0, 0.0)] * chains
        self.traces = [[] for _ in range(chains)]
        self.baseline = None
        self.starting = None


class FakeEngine:
    """Each request needs ``config.steps + 1`` ticks; records which requests shared each tick."""

    def __init__(self, tick_seconds: float = 0.005, fail_when=None, oom_when=None, start_seconds: float = 0.0):
        self.tick_seconds = tick_seconds
        self.start_seconds = start_seconds  # a start that draws for this long, checking `abandoned` as the real one does
        self.batches: list[list[str]] = []  # the ticks that ran
        self.attempted: list[list[str]] = []  # every tick asked for, including those that raised
        self.fail_when = fail_when or (lambda states: False)
        self.oom_when = oom_when or (lambda states: False)
        self.started_together: list[list[str]] = []
        self.device = torch.device("cpu")

    def start(self, job):
        return FakeState(job, job.config.chains)

    def start_many(self, jobs, sliced=False):
        self.started_together.append([job.prompt.messages[0]["content"] for job in jobs])
        states = [self.start(job) for job in jobs]
        until = time.monotonic() + self.start_seconds
        while time.monotonic() < until and not all(job.abandoned and job.abandoned() for job in jobs):
            time.sleep(0.01)
        for state in states:
            if state.job.abandoned and state.job.abandoned():
                state.cancelled = state.done = True
        return states

    def cancel(self, state):
        state.done = True

    def attach_token_log_probs(self, state):
        pass

    def tick(self, states):
        self.attempted.append([s.job.prompt.messages[0]["content"] for s in states])
        if self.oom_when(states):
            raise torch.OutOfMemoryError("fake")
        if self.fail_when(states):
            raise RuntimeError("boom")
        self.batches.append([s.job.prompt.messages[0]["content"] for s in states])
        time.sleep(self.tick_seconds)
        for state in states:
            state.step += 1
            if state.step > 0:
                for trace in state.traces:
                    trace.append(StepStats(0.5, 0.1, -0.4, 0.1))
            if state.step >= state.config.steps:
                state.done = True
                stats = StepStats(0.5, 0.1, -0.4, 0.1)
                chains = [ChainResult("text", [1], 0.1, -0.4, 0.5, state.step, stats, []) for _ in range(state.chains)]
                state.result = AlignResult("sea", "text", 0.1, -0.4, 0.5, 0.5, 0, chains, Usage(3, 1), Timings(total=0.01), "stop")


class _LM:
    tokenizer = tiny_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=None),  # a context nothing bounds
                            get_input_embeddings=lambda: SimpleNamespace(weight=torch.empty(len(_LM.tokenizer), 0)))
    name = "fake"
    device = "cpu"
    dtype = "float32"


def unattached_service(engine: FakeEngine, **settings) -> tuple[AlignService, Runtime]:
    """A service and the runtime to attach to it (``make_service`` attaches it)."""
    batch = settings.get("max_batch_chains", 4)
    settings = Settings(**{"max_batch_chains": batch, "default_chains": min(4, batch), "max_queue": 8, **settings})
    return AlignService(settings, Metrics()), Runtime(_LM(), engine, {"principle": RewardComponent()}, [("principle", 1.0)])


async def make_service(engine: FakeEngine, **settings) -> AlignService:
    service, runtime = unattached_service(engine, **settings)
    await service.attach(runtime, asyncio.get_running_loop())
    return service


async def submit(service: AlignService, text: str, chains: int = 2, steps: int = 2, timeout: float | None = None):
    return await service.submit(SEAConfig(chains=chains, steps=steps), [{"role": "user", "content": text}], timeout=timeout)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_engine_thread_works_on_the_model_s_cuda_device(monkeypatch):
    """CUDA's current device is the thread's: the load made cuda:N current in its own thread, and the engine thread's
    calls without a device (synchronize, memory figures) went to cuda:0. Simulated: no GPU here."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append((threading.current_thread().name, device.index)))
    engine = FakeEngine()
    engine.device = torch.device("cuda", 1)

    async def scenario():
        service = await make_service(engine)
        await service.shutdown()

    run(scenario())
    assert chosen == [("sea-engine", 1)]


def test_requests_join_and_leave_a_running_batch():
    async def scenario():
        engine = FakeEngine()
        service = await make_service(engine)
        jobs = [await submit(service, "a", steps=2), await submit(service, "b", steps=6), await submit(service, "c", steps=2)]
        results = [await service.wait(job) for job in jobs]
        await service.shutdown()
        return engine, jobs, results

    engine, jobs, _ = run(scenario())
    assert all(job.status == JobStatus.succeeded for job in jobs)
    assert max(len(batch) for batch in engine.batches) == 2  # 4 chains fill the batch: never a, b and c at once
    assert ["a", "b"] in engine.batches
    assert ["b", "c"] in engine.batches  # c joined when a left, while b was still running


def test_jobs_admitted_together_start_in_one_batch_and_a_bad_one_fails_alone():
    class BadStart(FakeEngine):
        def start(self, job):
            if job.prompt.messages[0]["content"] == "bad":
                raise ValueError("cannot start this one")
            return super().start(job)

    async def scenario():
        engine = BadStart(tick_seconds=0.05)
        service = await make_service(engine, max_batch_chains=6)
        blocker = await submit(service, "blocker", chains=6, steps=10)  # fills the batch while the others queue
        jobs = [await submit(service, name, chains=2) for name in ("a", "bad", "c")]
        await service.wait(blocker)
        for job in jobs:
            await job.wait(10)
        await service.shutdown()
        return engine, jobs

    engine, (a, bad, c) = run(scenario())
    assert ["a", "bad", "c"] in engine.started_together
    assert a.status == c.status == JobStatus.succeeded
    assert bad.status == JobStatus.failed and bad.error == "internal engine error"
    assert ["a", "c"] in engine.batches  # the two good ones then ran side by side


def test_queue_wait_ends_when_the_engine_takes_the_job_even_if_the_loop_hears_of_it_later():
    """The worker stamps the start; a busy event loop that runs its notification later must not move the stamp (it
    did, and the queue wait then counted the engine's own start-up twice: latency minus queue and engine < 0)."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01))
        job = await submit(service, "a", steps=3)
        time.sleep(2.0)  # noqa: ASYNC251 -- on purpose: the loop is busy while the worker takes the job and runs it
        await service.wait(job)
        await service.shutdown()
        return job

    job = run(scenario())
    assert job.status == JobStatus.succeeded
    assert job.queue_seconds < 1.0


@pytest.mark.parametrize("window_ms, first", [(1000, ["a", "b", "c"]), (0, ["a"])])
def test_requests_sent_together_to_an_idle_engine_start_in_one_batch(window_ms, first):
    async def scenario():
        engine = FakeEngine()
        service = await make_service(engine, max_batch_chains=8, batch_window_ms=window_ms)
        jobs = [await submit(service, "a", steps=3)]
        await asyncio.sleep(0.3)  # with no window the engine has long started "a"; with one it is still waiting
        jobs += [await submit(service, "b", steps=3), await submit(service, "c", steps=3)]
        for job in jobs:
            await service.wait(job)
        await service.shutdown()
        return engine.started_together

    assert run(scenario())[0] == first


def test_full_queue_answers_429_with_retry_after_until_one_slot_frees():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.05), max_queue=4, max_batch_chains=2)
        first = await submit(service, "running", steps=50)
        await asyncio.sleep(0.1)
        for i in range(4):
            await submit(service, f"queued {i}")
        with pytest.raises(TooManyRequests) as err:
            await submit(service, "one too many")
        service.cancel(first)
        await service.shutdown()
        return err.value

    error = run(scenario())
    # One job runs and none has finished yet: a slot frees when it ends, about one mean job time (5 s before any
    # job has been timed), however many wait behind it.
    assert error.status == 429 and 1 <= int(error.headers["Retry-After"]) <= 5


def test_the_queue_limit_counts_only_jobs_that_do_not_fit_the_batch():
    """Jobs that join the batch at the next step wait in the queue only for the step (or the batching window) in
    progress: SEA_MAX_QUEUE=1 answered 429 to a second request that fitted beside the first."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.05, start_seconds=0.5), max_queue=1, max_batch_chains=8, batch_window_ms=0)
        running = await submit(service, "starting", steps=50)
        await asyncio.sleep(0.05)
        joining = [await submit(service, f"joins {i}", steps=50) for i in range(3)]  # 2 + 3 × 2 chains: the batch is full
        waiting = await submit(service, "waits", steps=50)  # the one queued job SEA_MAX_QUEUE allows
        with pytest.raises(TooManyRequests):
            await submit(service, "one too many")
        for job in [running, *joining, waiting]:
            service.cancel(job)
        await service.shutdown()

    run(scenario())


def test_cancel_queued_and_running_jobs_without_blocking_others():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2)
        running = await submit(service, "running", steps=500)
        queued = await submit(service, "queued", steps=2)
        other = await submit(service, "other", steps=2)
        await asyncio.sleep(0.05)
        assert await service.position(queued) == 0 and await service.position(other) == 1
        service.cancel(queued)
        await asyncio.sleep(0)
        service.cancel(running)
        await service.wait(other)
        await running.wait(5)
        await service.shutdown()
        return running, queued, other

    running, queued, other = run(scenario())
    assert queued.status == JobStatus.cancelled and running.status == JobStatus.cancelled
    assert other.status == JobStatus.succeeded


def test_every_job_taken_is_counted_once_by_how_it_ended_and_a_wait_that_ended_in_the_queue_is_timed():
    """sea_jobs_total counts each ending; the queue wait of a job that left the queue (cancelled, timed out) is
    observed too (only the jobs the engine took were, with the shortest waits)."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2)
        running = await submit(service, "running", steps=500)
        cancelled = await submit(service, "cancelled", steps=2)
        timed_out = await submit(service, "timed out", steps=2, timeout=0.3)
        await asyncio.sleep(0.1)
        service.cancel(cancelled)
        await timed_out.wait(5)
        service.cancel(running)
        await running.wait(5)
        done = await submit(service, "done", steps=2)
        await service.wait(done)
        await service.shutdown()
        return service.metrics.registry, [running, cancelled, timed_out, done]

    registry, jobs = run(scenario())
    assert [(job.status, job.error_kind) for job in jobs] == [
        (JobStatus.cancelled, "cancelled"), (JobStatus.cancelled, "cancelled"), (JobStatus.failed, "timeout"), (JobStatus.succeeded, None)]
    counted = {outcome: registry.get_sample_value("sea_jobs_total", {"outcome": outcome}) for outcome in ("cancelled", "timeout", "succeeded")}
    assert counted == {"cancelled": 2, "timeout": 1, "succeeded": 1}
    assert registry.get_sample_value("sea_queue_wait_seconds_count") == 4
    assert registry.get_sample_value("sea_queue_wait_seconds_sum") >= 0.1 + 0.3  # the two that never left the queue


def test_a_fresh_scrape_holds_every_job_outcome_at_zero_and_the_process_metrics():
    """increase() and rate() cannot see the first count of a series they never saw: an alert on the first `engine`
    failure after a restart would miss it. A gain of exactly 0 (Best-of-N's) falls in a bucket that ends at 0."""
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    assert {outcome: sample("sea_jobs_total", {"outcome": outcome}) for outcome in JOB_OUTCOMES} == dict.fromkeys(JOB_OUTCOMES, 0.0)
    if Path("/proc/self/stat").exists():
        assert sample("process_resident_memory_bytes") > 0
    metrics.reward_gain.labels("bon").observe(0.0)
    assert sample("sea_reward_gain_bucket", {"method": "bon", "le": "-0.01"}) == 0
    assert sample("sea_reward_gain_bucket", {"method": "bon", "le": "0.0"}) == 1


def test_gauges_count_jobs_drawing_their_start_and_fall_to_zero_when_the_worker_stops():
    async def starting():
        service = await make_service(FakeEngine(start_seconds=25))
        job = await submit(service, "starting", chains=3)
        while job.status != JobStatus.running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        gauges = service.metrics.registry.get_sample_value
        seen = gauges("sea_jobs_running"), gauges("sea_chains_in_flight")
        service.cancel(job)
        await service.shutdown()
        return seen

    async def stopped():  # the drain's grace period ends with a job running and one queued
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2, drain_seconds=0)
        running = await submit(service, "running", steps=500)
        await submit(service, "queued")
        while running.status != JobStatus.running:
            await asyncio.sleep(0.01)
        gauges = service.metrics.registry.get_sample_value
        before = gauges("sea_jobs_running"), gauges("sea_chains_in_flight"), gauges("sea_queue_depth")
        await service.shutdown()
        return before, (gauges("sea_jobs_running"), gauges("sea_chains_in_flight"), gauges("sea_queue_depth"))

    assert run(starting()) == (1, 3)
    assert run(stopped()) == ((1, 2, 1), (0, 0, 0))


@pytest.mark.parametrize("where", ["queued", "running"])
def test_the_worker_ends_a_job_cancelled_for_a_timeout_as_a_timeout(where):
    """What the worker records is what the shared store writes for other replicas: a job cancelled because its
    waiter saw the deadline pass ends as a timeout (504), not as cancelled by the client."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2)
        running = await submit(service, "running", steps=500)
        queued = await submit(service, "queued", steps=2)
        while running.status != JobStatus.running:
            await asyncio.sleep(0.01)
        job = running if where == "running" else queued
        service.worker.cancel(job, "timeout", "the request ran past its deadline")
        await job.wait(5)
        for other in (running, queued):
            service.cancel(other)
        await service.shutdown()
        return job

    job = run(scenario())
    assert (job.status, job.error_kind, job.error) == (JobStatus.failed, "timeout", "the request ran past its deadline")


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_request_abandoned_while_it_starts_ends_then_and_the_next_is_served(ending):
    async def scenario():
        engine = FakeEngine(start_seconds=25)
        service = await make_service(engine)
        starting = await submit(service, "starting", timeout=1 if ending == "deadline" else None)
        while starting.status != JobStatus.running:
            await asyncio.sleep(0.01)
        if ending == "cancel":
            service.cancel(starting)
        await starting.wait(10)  # the start would take 25 s
        ended = starting.status, starting.error_kind
        engine.start_seconds = 0
        after = await submit(service, "after")
        await service.wait(after)
        await service.shutdown()
        return ended, after

    ended, after = run(scenario())
    assert ended == ((JobStatus.cancelled, "cancelled") if ending == "cancel" else (JobStatus.failed, "timeout"))
    assert after.status == JobStatus.succeeded


def test_an_engine_failure_fails_only_the_request_that_fails_alone_and_the_worker_goes_on():
    """A step that raised failed every request of its batch: one request could end every other client's job. The batch
    is split and retried like an out-of-memory one, down to the request that fails alone."""
    async def scenario():
        engine = FakeEngine(fail_when=lambda states: any(s.job.prompt.messages[0]["content"] == "poison" for s in states))
        service = await make_service(engine, max_batch_chains=8)
        good = [await submit(service, "fine", steps=50), await submit(service, "also fine", steps=50)]
        bad = await submit(service, "poison")
        with pytest.raises(RuntimeError, match="failed"):
            await service.wait(bad)
        results = [await service.wait(job) for job in good]
        await service.shutdown()
        return bad, results, engine

    bad, results, engine = run(scenario())
    assert bad.status == JobStatus.failed and bad.error == "internal engine error"
    assert [result.text for result in results] == ["text", "text"]
    assert any("poison" in batch and "fine" in batch for batch in engine.attempted)  # they did share the batch it broke


class BrokenStartEvent(FakeEngine):
    """A start whose initial scores the worker cannot publish: a bug in the worker's own code around a start."""

    def start(self, job):
        state = super().start(job)
        if job.prompt.messages[0]["content"] == "poison":
            state.step = 0
            state.initial = [None] * state.chains
        return state


def test_a_worker_bug_while_starting_fails_only_those_jobs_and_the_worker_goes_on():
    async def scenario():
        service = await make_service(BrokenStartEvent(), batch_window_ms=0)
        bad = await submit(service, "poison", timeout=5)
        with pytest.raises(RuntimeError, match="failed"):
            await service.wait(bad)
        good = await submit(service, "fine", timeout=5)
        result = await service.wait(good)
        alive = service.worker.alive and service.broken is None
        await service.shutdown()
        return bad, result, alive

    bad, result, alive = run(scenario())
    assert bad.status == JobStatus.failed and bad.error == "internal engine error"
    assert result.text == "text" and alive


# Running out of memory as torch raises it, and as a plain RuntimeError (cuBLAS creating a handle, a CUDA call that
# returned cudaErrorMemoryAllocation, the CPU allocator): the latter were failed as engine errors, and "CUDA error: out
# of memory" marked the whole service broken.
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["torch", "cublas", "cuda", "cpu"])
def test_out_of_memory_splits_the_batch(error):
    class Failing(FakeEngine):
        def tick(self, states):
            if len(states) > 1 or states[0].job.prompt.messages[0]["content"] == "huge":
                self.attempted.append([s.job.prompt.messages[0]["content"] for s in states])
                raise error
            super().tick(states)

    async def scenario():
        engine = Failing()
        service = await make_service(engine, max_batch_chains=6)
        jobs = [await submit(service, "x", chains=2), await submit(service, "y", chains=2), await submit(service, "huge", chains=2)]
        for job in jobs:
            await job.wait(10)
        broken = service.broken
        await service.shutdown()
        return engine, jobs, broken

    engine, jobs, broken = run(scenario())
    assert [job.status for job in jobs[:2]] == [JobStatus.succeeded] * 2
    assert max(len(batch) for batch in engine.attempted) > 1 and all(len(batch) == 1 for batch in engine.batches)
    assert (jobs[2].status, jobs[2].error_kind) == (JobStatus.failed, "overloaded")  # 503 with Retry-After, not a 500
    assert "fewer chains" in jobs[2].error and broken is None


def test_deadline_fails_the_job_with_504():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.02))
        job = await submit(service, "slow", steps=10_000, timeout=0.2)
        with pytest.raises(GatewayTimeout):
            await service.wait(job)
        await service.shutdown()
        return job

    job = run(scenario())
    assert job.status == JobStatus.failed and job.error_kind == "timeout"


def test_finished_jobs_expire_then_answer_404():
    async def scenario():
        service = await make_service(FakeEngine(), job_ttl_seconds=0.1)
        job = await submit(service, "short", steps=1)
        await service.wait(job)
        assert await service.get(job.id) is job
        await asyncio.sleep(0.2)
        with pytest.raises(NotFound):
            await service.get(job.id)
        await service.shutdown()

    run(scenario())


def test_drain_finishes_accepted_work_and_refuses_new_work():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2)
        jobs = [await submit(service, f"job {i}", steps=3) for i in range(4)]
        await service.shutdown()
        with pytest.raises(ServiceUnavailable):
            await submit(service, "late")
        return jobs

    jobs = run(scenario())
    assert all(job.status == JobStatus.succeeded for job in jobs)


def test_drain_past_the_grace_period_reports_unfinished_jobs_failed():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2, drain_seconds=0.1)
        jobs = [await submit(service, "endless", steps=100_000), await submit(service, "queued behind it", steps=1)]
        await service.shutdown()
        return jobs

    jobs = run(scenario())
    assert all(job.status == JobStatus.failed and job.error_kind == "shutdown" for job in jobs)


@pytest.mark.parametrize("stuck_in", ["step", "start"])
def test_drain_fails_unfinished_jobs_at_the_deadline_even_while_a_step_or_start_runs_on(stuck_in):
    """The worker thread is inside a step (or a request's start) that outlasts the grace period: the jobs still get
    their failure (503) at the deadline, not once the thread is free (when the server may have closed their
    connections)."""
    release = threading.Event()

    def stuck(states):
        release.wait(20)
        return False

    async def scenario():
        engine = FakeEngine(tick_seconds=0.01, fail_when=stuck if stuck_in == "step" else None)
        if stuck_in == "start":  # a start that does not look at `abandoned` meanwhile
            original = engine.start_many

            def start_many(jobs, **kwargs):
                release.wait(20)
                return original(jobs, **kwargs)

            engine.start_many = start_many
        service = await make_service(engine, drain_seconds=0.1)
        job = await submit(service, "long", steps=3)
        while job.status != JobStatus.running:
            await asyncio.sleep(0.01)
        shutdown = asyncio.create_task(service.shutdown())
        while not job.status.finished:
            await asyncio.sleep(0.01)
        assert not release.is_set() and not shutdown.done()  # the thread is still stuck
        release.set()
        await shutdown
        return job

    job = run(scenario())
    assert job.status == JobStatus.failed and job.error_kind == "shutdown"


def test_a_result_crosses_the_shared_store_whole_and_ignores_what_a_newer_replica_adds():
    import json

    from app.engine.types import TokenLogProb, chain_order
    from app.service.shared.records import result_from_json, result_to_json

    stats = StepStats(0.5, 50.0, -30.0, 0.1)
    chains = [ChainResult("fragment", [1, 2], 50.0, -30.0, -20.0, 2, stats, [stats], counted=4),
              ChainResult("sentence", [3, 4], 50.0, -60.0, 10.0, 3, stats, [stats], counted=24,
                          token_log_probs=[TokenLogProb(3, -1.5, [(7, -0.5), (3, -1.5)]), TokenLogProb(4, -0.25, [])])]
    result = AlignResult("sea", "sentence", 50.0, -60.0, 10.0, 0.4, 1, chains, Usage(3, 24), Timings(total=0.5), "stop")
    text = result_to_json(result)
    assert result_from_json(text) == result
    assert chain_order(result_from_json(text).chains, "reward") == [1, 0]
    newer = json.loads(text)
    for chain in newer["chains"]:
        chain["added_later"] = "a field this version does not know"
    assert result_from_json(json.dumps(newer)) == result


def test_every_discrete_option_of_a_request_reaches_the_engine():
    from app.api.schemas import AlignRequest

    config = AlignRequest(prompt="hi", candidates=6, restart_after=3, init_samples=5, proposal="lm", max_compute=900).to_config(Settings())
    assert (config.candidates, config.restart_after, config.init_samples, config.proposal, config.max_compute) == (6, 3, 5, "lm", 900)


def test_a_request_left_to_its_defaults_runs_the_engine_s_defaults():
    """The HTTP request's schema repeats each default of the engine's config (the CLI's and `sea eval`'s): a default
    changed on one side only would make the service and the CLI run differently."""
    import dataclasses

    from app.api.schemas import AlignRequest

    assert dataclasses.asdict(AlignRequest(prompt="hi").to_config(Settings())) == dataclasses.asdict(SEAConfig())


def test_the_pick_defaults_to_the_server_setting_unless_the_request_names_one():
    from app.api.schemas import AlignRequest

    assert AlignRequest(prompt="hi").to_config(Settings()).select == "reward"  # the paper's pick
    assert AlignRequest(prompt="hi").to_config(Settings(default_select="energy")).select == "energy"
    assert AlignRequest(prompt="hi", select="reward").to_config(Settings(default_select="energy")).select == "reward"


def test_a_server_with_tight_limits_takes_every_method_s_defaults():
    """With SEA_MAX_CHAINS=1 every request answered 422 "beams must be at most 1": beam search's `beams` (default 2) and
    `successors` (default 4), left out, tripped the limits whatever the method. A parameter sent is checked (the
    OpenAPI document gives each its limit)."""
    from app.api.schemas import AlignRequest, LimitError

    for tight in (Settings(max_chains=1, default_chains=1), Settings(max_batch_chains=1, default_chains=1), Settings(max_samples=2)):
        for method in ("sea", "bon", "cbs", "args", "sample"):
            AlignRequest(prompt="hi", method=method).to_config(tight)
    one_chain = Settings(max_chains=1, default_chains=1)
    for method, field, value in (("cbs", "beams", 2), ("bon", "samples", 300), ("sea", "chains", 2), ("sea", "init_samples", 300),
                                 ("sea", "beams", 2)):
        with pytest.raises(LimitError) as past:
            AlignRequest(prompt="hi", method=method, **{field: value}).to_config(one_chain)
        assert past.value.field == field
    with pytest.raises(LimitError) as batch:
        AlignRequest(prompt="hi", chains=8).to_config(Settings(max_chains=16, max_batch_chains=4, default_chains=2))
    assert str(batch.value) == "chains must be at most 4 (the engine batch size)"


def test_an_openai_stream_sends_keep_alives_while_its_job_waits_to_start(monkeypatch):
    """No step event comes while a job is queued or drawing its initial samples (tens of seconds on a loaded CPU):
    the stream sends SSE comments meanwhile (the openai client skips them), so idle-timeout proxies keep it open."""
    from app.api import openai as v1

    monkeypatch.setattr(v1, "KEEP_ALIVE_SECONDS", 0.05)

    async def scenario():
        service = await make_service(FakeEngine(start_seconds=0.5))
        body = v1.ChatCompletionRequest(model="sea", messages=[{"role": "user", "content": "hi"}], stream=True)
        job = await submit(service, "hi")
        stream = v1._stream(v1._Answer([job], body, "reward", [], True, service))
        pieces = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # the client leaves: the job is cancelled
        await job.wait(5)
        await service.shutdown()
        return pieces, job

    pieces, job = run(scenario())
    assert pieces[0].startswith("data: ") and '"role": "assistant"' in pieces[0]
    assert pieces[1:] == [": keep-alive\n\n", ": keep-alive\n\n"]
    assert job.status == JobStatus.cancelled


def test_an_openai_stream_reports_a_failure_in_band_with_its_type_and_code():
    from app.api import openai as v1

    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.05))
        body = v1.ChatCompletionRequest(model="sea", messages=[{"role": "user", "content": "hi"}], stream=True)
        job = await service.submit(SEAConfig(chains=2, steps=200), [{"role": "user", "content": "hi"}], timeout=1)
        pieces = [piece async for piece in v1._stream(v1._Answer([job], body, "reward", [], True, service))]
        await service.shutdown()
        return pieces

    pieces = run(scenario())
    errors = [json.loads(p.removeprefix("data: "))["error"] for p in pieces if p.startswith("data: {\"error\"")]
    assert errors == [{"message": errors[0]["message"], "type": "timeout_error", "param": None, "code": "timeout"}]
    assert pieces[-1] == "data: [DONE]\n\n"


def test_a_failed_response_stream_names_a_code_the_openai_client_accepts():
    """A Responses stream whose job times out ends with `response.failed`; its `error.code` was the service's own kind
    (`timeout`), which OpenAI's clients type as a Literal without it: now `server_error`, the message saying what
    happened."""
    from openai.types.responses import ResponseFailedEvent

    from app.api import responses as v1_responses

    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.05))
        body = v1_responses.ResponseRequest(model="sea", input="hi", stream=True)
        job = await service.submit(SEAConfig(chains=2, steps=200), [{"role": "user", "content": "hi"}], timeout=1)
        pieces = [piece async for piece in v1_responses._events(v1_responses._Run(body, job, service))]
        await service.shutdown()
        return pieces

    last = run(scenario())[-1]
    assert last.startswith("event: response.failed\n")
    failed = ResponseFailedEvent.model_validate(json.loads(last.split("data: ", 1)[1]))
    assert failed.response.error.code == "server_error" and "deadline" in failed.response.error.message


def test_an_ended_job_keeps_token_pieces_only_where_a_replay_marks_them_and_live_readers_keep_theirs():
    from app.service.jobs import Job

    async def scenario():
        job = Job(None, "m", stream_events=True)  # type: ignore[arg-type]
        entry = {"energy": 1.0, "text": "a b", "pieces": ["a", " b"], "changed_positions": [False, True]}
        for step in range(4):
            job.publish({"event": "step", "step": step, "chains": [dict(entry), dict(entry)]})
        past, live = job.subscribe()
        stats = StepStats(0.5, 0.1, -0.4, 0.1)
        chains = [ChainResult("a b", [1, 2], 0.1, -0.4, 0.5, best, stats, []) for best in (1, 3)]
        job.finish(JobStatus.succeeded, AlignResult("sea", "a b", 0.1, -0.4, 0.5, 0.5, 0, chains, Usage(3, 1), Timings(total=0.01), "stop"))
        return job, past, [live.get_nowait() for _ in range(live.qsize())]

    job, past, live = asyncio.run(scenario())
    kept = [[("pieces" in c, "changed_positions" in c, "text" in c) for c in e["chains"]] for e in job.events if e["event"] == "step"]
    assert kept == [[(False, False, True)] * 2,
                    [(True, True, True), (False, False, True)],  # chain 0's best step
                    [(False, False, True)] * 2,
                    [(True, True, True)] * 2]  # the last step, also chain 1's best
    assert all("pieces" in c for e in past for c in e["chains"]), "a reader that subscribed before the end got full events"
    assert [e["event"] for e in live] == ["end"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"reward": ""}, "name at least one reward"),
    ({"reward": "principle:nan"}, "finite weight"),
    ({"reward": "principle:1e9"}, "within ±1000"),
    ({"reward": "principle:x"}, "not a number"),
    ({"default_alpha": "inf"}, "finite number"),
    ({"max_batch_chains": 2}, "SEA_DEFAULT_CHAINS \\(4\\) is past SEA_MAX_BATCH_CHAINS \\(2\\)"),
    ({"default_max_tokens": 512}, "SEA_DEFAULT_MAX_TOKENS \\(512\\) is past SEA_MAX_TOKENS_LIMIT"),
    ({"device": "gpu"}, "device"),
    ({"log_level": "verbose"}, "log_level"),
])
def test_settings_refuse_at_start_what_would_fail_every_request(settings, message):
    """Each of these started, then failed requests (blaming the client, or with NaN rewards) or the model load."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Settings(**settings)


def test_settings_accept_what_they_document():
    settings = Settings(reward="principle, rm:0.5", log_level="INFO", device="cuda:1", max_batch_chains=2, default_chains=2)
    assert settings.reward_terms() == [("principle", 1.0), ("rm", 0.5)] and settings.log_level == "info"


def _stuck_engine() -> tuple[FakeEngine, threading.Event, threading.Event]:
    """An engine whose first step blocks until released (a step takes minutes on a CPU); and the event it sets once
    that step has begun."""
    release, stepping = threading.Event(), threading.Event()

    def stuck(states):
        stepping.set()
        release.wait(20)
        return False

    return FakeEngine(tick_seconds=0.001, fail_when=stuck), release, stepping


async def _until(condition, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def test_a_deadline_ends_queued_and_running_jobs_while_the_worker_is_busy_and_nothing_follows_the_end():
    """A queued job's deadline was looked at only between steps, and a running job's only by a waiter: a /v1 stream or
    a /jobs poller was held past its deadline for as long as a step took. And the step that then ended published a
    step event after the job's end."""
    async def scenario():
        engine, release, stepping = _stuck_engine()
        service = await make_service(engine, max_batch_chains=2)
        running = await submit(service, "long", steps=3, timeout=0.3)
        queued = await submit(service, "waiting", steps=1, timeout=0.3)  # no room beside the first: queued
        await _until(stepping.is_set)
        await _until(lambda: running.status.finished and queued.status.finished)
        still_stuck = not release.is_set()
        release.set()
        await _until(lambda: service.worker.idle)
        await service.shutdown()
        return running, queued, still_stuck

    running, queued, still_stuck = run(scenario())
    assert still_stuck, "they ended while the step still ran"
    assert (running.error_kind, running.error) == ("timeout", "the request ran past its deadline")
    assert (queued.error_kind, queued.error) == ("timeout", "the request timed out while queued")
    assert running.events[-1]["event"] == "end", [event["event"] for event in running.events]


def test_a_client_s_cancel_holds_against_the_deadline_that_follows():
    async def scenario():
        engine, release, stepping = _stuck_engine()
        service = await make_service(engine)
        job = await submit(service, "long", steps=3)
        await _until(stepping.is_set)
        service.cancel(job)  # the chains leave at the next step; the deadline passes meanwhile
        service.cancel(job, kind="timeout", reason="the request ran past its deadline")
        ended_in_the_step = job.status.finished and not release.is_set()  # the deadline answers at once, as cancelled
        release.set()
        await _until(lambda: job.status.finished)
        await service.shutdown()
        return job, ended_in_the_step

    job, ended_in_the_step = run(scenario())
    assert (job.status, job.error_kind) == (JobStatus.cancelled, "cancelled") and ended_in_the_step


class _DiscreteFirstEngine(FakeEngine):
    """Steps the discrete states, then the others, as the real engine's tick does; the others' part raises for a
    poisoned request."""

    def tick(self, states):
        self.attempted.append([s.job.prompt.messages[0]["content"] for s in states])
        discrete = [s for s in states if s.config.update == "discrete"]
        if discrete:
            super().tick(discrete)
        others = [s for s in states if s.config.update != "discrete"]
        if any(s.job.prompt.messages[0]["content"] == "poison" for s in others):
            raise RuntimeError("boom")
        if others:
            super().tick(others)


def test_a_failure_in_one_update_rule_s_part_of_a_step_does_not_step_the_other_part_twice():
    """The engine steps discrete states before logits ones: when the logits part raised, the split retry stepped the
    discrete requests a second time in one worker step (their step events skipped a number)."""
    async def scenario():
        engine = _DiscreteFirstEngine()
        service = await make_service(engine, max_batch_chains=8)
        innocent = await submit(service, "fine", steps=6)
        bad = await service.submit(SEAConfig(chains=2, steps=6, update="logits"), [{"role": "user", "content": "poison"}])
        with pytest.raises(RuntimeError, match="failed"):
            await service.wait(bad)
        await service.wait(innocent)
        await service.shutdown()
        return innocent, engine

    innocent, engine = run(scenario())
    fine = [i for i, batch in enumerate(engine.attempted) if "fine" in batch]
    assert any("poison" in batch for batch in engine.attempted[fine[0] : fine[-1]])  # the poison ran beside it
    steps = [event["step"] for event in innocent.events if event["event"] == "step"]
    assert steps == list(range(7)), steps  # one event per tick, as alone (the fake takes steps + 1 ticks)


def test_job_store_keeps_finished_jobs_for_their_ttl_and_at_most_its_bound(monkeypatch):
    from app.service.jobs import Job, JobStore

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = JobStore(ttl=60, most_kept=10)
    running = Job(SimpleNamespace(config=SEAConfig()), "m")
    store.add(running)
    finished = []
    for _ in range(10):
        job = Job(SimpleNamespace(config=SEAConfig()), "m")
        store.add(job)
        job.finish(JobStatus.cancelled, error="cancelled by the client", kind="cancelled")
        finished.append(job)
        clock[0] += 1
    assert len(store) == 9  # the 11th job passed the bound: the oldest finished ones went, down to nine tenths of it
    assert store.get(running.id) is running and store.get(finished[0].id) is None and store.get(finished[1].id) is None
    assert [store.get(job.id) for job in finished[2:]] == finished[2:]
    clock[0] += 55  # finished[2] finished 63 s ago, finished[9] 55 s ago
    assert store.get(finished[2].id) is None and store.get(finished[9].id) is finished[9]
    assert store.get(running.id) is running  # unfinished jobs never expire


def test_one_key_filling_the_job_store_drops_its_own_results_not_another_key_s(monkeypatch):
    """10 240 jobs from one key (16-prompt completions) dropped another key's result 45 s into its 600 s TTL (security
    review): past either bound, the jobs go from the owner holding the most."""
    from app.engine.types import TokenLogProb
    from app.service.jobs import Job, JobStore

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = JobStore(ttl=600, most_kept=10, most_listed=100)

    def finished(owner: str, listing: int = 0) -> Job:
        job = Job(SimpleNamespace(config=SEAConfig(logprobs=0 if listing else None)), "m", owner=owner)
        store.add(job)
        listed = [TokenLogProb(1, -1.0, []) for _ in range(listing)] if listing else None
        chain = ChainResult("x", [1] * max(listing, 1), 0.0, 0.0, 0.0, 0, StepStats(0.0, 0.0, 0.0, 0.0), token_log_probs=listed)
        job.finish(JobStatus.succeeded, AlignResult("sea", "x", 0.0, 0.0, 0.0, 0.0, 0, [chain], Usage(), Timings(), "stop"))
        clock[0] += 1
        return job

    theirs = [finished("a"), finished("a", listing=40)]
    mine = [finished("b") for _ in range(30)]
    assert [store.get(job.id) for job in theirs] == theirs and len(store) <= 10
    assert store.get(mine[-1].id) is mine[-1] and store.get(mine[0].id) is None  # b's oldest went
    many = [finished("b", listing=50) for _ in range(3)]  # 150 + a's 40 listed: past 100
    assert store.expire() == 2 and store.get(theirs[1].id) is theirs[1] and store.get(many[-1].id) is many[-1]
    lone = JobStore(ttl=600, most_kept=3)  # one owner (no keys): the oldest go, as before
    for _ in range(5):
        job = Job(SimpleNamespace(config=SEAConfig()), "m")
        lone.add(job)
        job.finish(JobStatus.cancelled, error="x", kind="cancelled")
        clock[0] += 1
    assert len(lone) == 3


def test_job_store_drops_the_oldest_step_event_replays_past_its_bound(monkeypatch):
    """A `/jobs` request at the limits keeps a few MB of step events for its replay, for its TTL (the security review
    measured 3.3 MB of JSON, 7 MB of resident memory a job): the finished jobs' replays are bounded like their
    log-probs, the owner holding the most losing its oldest first."""
    from app.service.events import held_event_bytes
    from app.service.jobs import Job, JobStore

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = JobStore(ttl=600, most_event_bytes=12_000)

    def finished(owner: str, steps: int) -> Job:
        job = Job(SimpleNamespace(config=SEAConfig()), "m", owner=owner, stream_events=True)
        store.add(job)
        for step in range(steps):
            job.publish({"event": "step", "step": step, "steps": steps, "chains": [{"energy": 1.0, "text": "x" * 300}] * 2})
        job.finish(JobStatus.cancelled, error="cancelled by the client", kind="cancelled")
        clock[0] += 1
        return job

    theirs, plain = finished("a", 4), finished("a", 0)
    mine = [finished("b", 4) for _ in range(3)]
    assert theirs.event_bytes == held_event_bytes(theirs.events) == 4 * 2 * (200 + 300) and plain.event_bytes == 0
    assert store.expire() == 1  # 16 000 bytes held: b's oldest goes, a's replay and the plain job stay
    assert store.get(mine[0].id) is None and [store.get(job.id) for job in (theirs, plain, *mine[1:])] == [theirs, plain, *mine[1:]]
    assert store.expire() == 0


def test_job_store_drops_the_oldest_results_listing_log_probs_past_its_bound(monkeypatch):
    """A Best-of-256 result listing every sample's 20 alternatives held ~170 MB for the job's TTL, and a client could
    keep dozens: past ``most_listed`` log-probs the oldest such results go at the next expiry."""
    from app.engine.types import TokenLogProb
    from app.service.jobs import Job, JobStore, listed_log_probs

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = JobStore(ttl=600, most_listed=100)

    def finished(tokens: int, alternatives: int | None) -> Job:
        job = Job(SimpleNamespace(config=SEAConfig(logprobs=alternatives)), "m")
        store.add(job)
        listed = None if alternatives is None else [TokenLogProb(1, -1.0, [(2, -2.0)] * alternatives) for _ in range(tokens)]
        chain = ChainResult("x", [1] * tokens, 0.0, 0.0, 0.0, 0, StepStats(0.0, 0.0, 0.0, 0.0), token_log_probs=listed)
        job.finish(JobStatus.succeeded, AlignResult("sea", "x", 0.0, 0.0, 0.0, 0.0, 0, [chain, chain], Usage(), Timings(), "stop"))
        clock[0] += 1
        return job

    plain = finished(50, None)
    first, second, third = finished(10, 2), finished(10, 1), finished(5, 0)  # 60, 40 and 10 log-probs listed
    assert listed_log_probs(first.result) == 60 and listed_log_probs(plain.result) == 0
    assert store.expire() == 1  # 110 held: the oldest listing result goes, the plain one older than it stays
    assert store.get(first.id) is None and [store.get(job.id) for job in (plain, second, third)] == [plain, second, third]
    assert store.expire() == 0


def test_one_request_lists_at_most_the_server_s_log_probs():
    """`logprobs` on a Best-of-256 of 256 tokens listed 1.4 million log-probs (an answer of ~70 MB, held while kept)."""
    from app.api.schemas import AlignRequest, LimitError

    settings = Settings()
    request = {"prompt": "x", "method": "bon", "samples": 256, "max_tokens": 256}
    with pytest.raises(LimitError, match="logprobs would list 1376256 log-probs .* at most 262144") as refused:
        AlignRequest(**request, logprobs=20).to_config(settings)
    assert refused.value.field == "logprobs"
    assert AlignRequest(**request, logprobs=0).to_config(settings).logprob_chains == 256  # the chosen tokens alone fit
    sea = AlignRequest(prompt="x", chains=16, max_tokens=256, logprobs=20).to_config(settings)  # the largest SEA request fits
    assert sea.logprob_chains == 16 and sea.logprobs == 20


def test_one_api_key_may_have_at_most_its_share_of_requests_in_flight():
    """SEA_MAX_JOBS_PER_KEY: one client cannot fill the queue for all; others (and the same key once a job ends) go on."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_jobs_per_key=2)
        long = SEAConfig(chains=1, steps=3000)
        first = [await service.submit(long, [{"role": "user", "content": "a"}], owner="key-a") for _ in range(2)]
        with pytest.raises(TooManyRequests) as refused:
            await service.submit(long, [{"role": "user", "content": "a"}], owner="key-a")
        other = await service.submit(long, [{"role": "user", "content": "b"}], owner="key-b")
        with pytest.raises(TooManyRequests, match="has 1 request in flight and this request has 1 more prompt to run"):
            await service.submit(long, [{"role": "user", "content": "b"}], owner="key-b", also=1)  # a completion's 2 prompts
        service.cancel(first[0])
        await asyncio.wait_for(first[0].wait(), 10)
        again = await service.submit(long, [{"role": "user", "content": "a"}], owner="key-a")
        for job in (first[1], other, again):
            service.cancel(job)
        await service.shutdown()
        return refused.value

    refused = run(scenario())
    assert "has 2 requests in flight; one key may have 2" in str(refused) and int(refused.headers["Retry-After"]) >= 1


def test_waiting_for_a_request_s_jobs_ends_at_the_first_failure_and_cancels_the_others():
    """A completion of several prompts waited for them in order: a later prompt's failure was reported only once the
    earlier ones had run to their end. The others end at once: past the deadline they share, as timed out (they were
    counted as cancelled, a few milliseconds before their own timers)."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01, fail_when=lambda states: any(s.job.prompt.messages[0]["content"] == "bad"
                                                                                                for s in states)))
        long = await service.submit(SEAConfig(chains=1, steps=3000), [{"role": "user", "content": "a"}])
        bad = await service.submit(SEAConfig(chains=1, steps=3000), [{"role": "user", "content": "bad"}])
        with pytest.raises(RuntimeError):
            await service.wait_all([long, bad])
        await asyncio.wait_for(long.wait(), 10)  # 30 s of steps had it run on
        timing_out = [await service.submit(SEAConfig(chains=1, steps=3000), [{"role": "user", "content": "c"}], timeout=1)
                      for _ in range(2)]
        with pytest.raises(GatewayTimeout):
            await service.wait_all(timing_out)
        await service.shutdown()
        return long, timing_out

    long, timing_out = run(scenario())
    assert (long.status, long.error) == (JobStatus.cancelled, "another prompt of its request failed")
    assert [(job.status, job.error_kind) for job in timing_out] == [(JobStatus.failed, "timeout")] * 2


def test_a_key_s_share_holds_for_requests_sent_together_whose_prompts_are_tokenized_in_a_thread():
    """The share was counted before a long prompt's tokenizing (in a thread, an await) and the job stored after it:
    five long prompts sent together by one key with a share of one were all accepted."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.01), max_jobs_per_key=1)
        long = SEAConfig(chains=1, steps=3000)
        prompt = [{"role": "user", "content": "lighthouse " * 1000}]  # past LONG_PROMPT_CHARACTERS, within the token limit
        outcomes = await asyncio.gather(*(service.submit(long, prompt, owner="key-a") for _ in range(5)), return_exceptions=True)
        for job in outcomes:
            if not isinstance(job, BaseException):
                service.cancel(job)
        await service.shutdown()
        return outcomes

    outcomes = run(scenario())
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert sum(isinstance(o, TooManyRequests) for o in outcomes) == 4


def test_a_job_ended_by_its_deadline_holds_its_key_s_share_until_its_chains_leave_the_batch():
    """A deadline answers at once (504) while the job's chains leave the batch at the next step boundary, which takes
    minutes on a CPU: its key's slot was free meanwhile, so a key that let its jobs time out could hold more of the
    engine than its share. Now the share counts such a job until its chains have left."""
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=3.0), max_jobs_per_key=1)
        prompt = [{"role": "user", "content": "hi"}]
        first = await service.submit(SEAConfig(chains=1, steps=50), prompt, timeout=1, owner="key-a")
        await first.wait(30)
        assert first.error_kind == "timeout"
        with pytest.raises(TooManyRequests) as refused:  # its chains are still in the 3-second step
            await service.submit(SEAConfig(chains=1, steps=1), prompt, owner="key-a")
        other_key = await service.submit(SEAConfig(chains=1, steps=0), prompt, owner="key-b")  # only key-a's share is full
        for _ in range(300):
            if not service.worker.ended_in_batch("key-a"):
                break
            await asyncio.sleep(0.05)
        later = await service.submit(SEAConfig(chains=1, steps=0), prompt, owner="key-a")
        results = [await job.wait(30) for job in (other_key, later)]
        await service.shutdown()
        return refused.value, results

    refused, results = run(scenario())
    assert "1 request in flight" in str(refused) and results == [True, True]


def test_a_key_s_next_request_is_taken_as_soon_as_its_answer_came_while_the_step_still_delivers_others():
    """A job that ended with its result stays in the worker's batch until the step has delivered every result of that
    step (others' log-probs, baselines' slices): the first count of jobs "ended but still in the batch" counted it,
    and a key with a share of one was refused its next request right after its answer."""
    async def scenario():
        engine = FakeEngine(tick_seconds=0.01)
        engine.attach_token_log_probs = lambda state: time.sleep(1.5) if state.job.prompt.messages[0]["content"] == "slow" else None
        service = await make_service(engine, max_jobs_per_key=1)
        config = SEAConfig(chains=1, steps=1)
        first, other = await asyncio.gather(service.submit(config, [{"role": "user", "content": "quick"}], owner="key-a"),
                                            service.submit(config, [{"role": "user", "content": "slow"}], owner="key-b"))
        await first.wait(30)
        still_delivering = not other.status.finished
        again = await service.submit(config, [{"role": "user", "content": "again"}], owner="key-a")
        done = [await job.wait(30) for job in (other, again)]
        await service.shutdown()
        return first, still_delivering, done

    first, still_delivering, done = run(scenario())
    assert first.status == JobStatus.succeeded and still_delivering and done == [True, True]


def test_a_chat_the_model_s_template_refuses_is_unprocessable_naming_the_messages():
    """A template's own check (roles must alternate, as Gemma's and Mistral's templates demand) was a 500."""
    async def scenario():
        service = await make_service(FakeEngine())
        service.runtime.lm = copy.copy(service.runtime.lm)
        service.runtime.lm.tokenizer = copy.deepcopy(service.runtime.lm.tokenizer)
        service.runtime.lm.tokenizer.chat_template = (
            "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
        try:
            twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
            with pytest.raises(Unprocessable) as refused:
                await service.submit(SEAConfig(chains=1, steps=1), twice, prompt_param="messages")
            return refused.value
        finally:
            await service.shutdown()

    error = run(scenario())
    assert error.param == "messages" and "roles must alternate" in str(error)


def test_a_batch_filled_by_requests_drawing_their_start_has_no_room():
    """With a shared store a replica claims the next job only when its batch has room: requests drawing their start
    did not count, so a replica whose batch they filled claimed one more."""
    async def scenario():
        service = await make_service(FakeEngine(start_seconds=0.5), max_batch_chains=4)
        job = await submit(service, "starting", chains=4)
        while not service.worker._starting:
            await asyncio.sleep(0.01)
        room = service.worker.has_room()
        await service.wait(job)
        while not service.worker.idle:  # the result reaches the loop before the worker thread lets go of the job
            await asyncio.sleep(0.01)
        after = service.worker.has_room()
        await service.shutdown()
        return room, after

    assert run(scenario()) == (False, True)


def test_a_request_the_engine_ends_without_a_result_fails_alone():
    """An engine bug (a request done without a result) crashed the worker's step: every job of the batch failed."""
    class Broken(FakeEngine):
        def tick(self, states):
            super().tick(states)
            for state in states:
                if state.job.prompt.messages[0]["content"] == "broken":
                    state.done, state.result = True, None

    async def scenario():
        service = await make_service(Broken())
        broken, fine = await submit(service, "broken", steps=3), await submit(service, "fine", steps=3)
        await fine.wait(10)
        await broken.wait(10)
        await service.shutdown()
        return broken, fine

    broken, fine = run(scenario())
    assert (broken.status, broken.error_kind, broken.error) == (JobStatus.failed, "engine", "internal engine error")
    assert fine.status is JobStatus.succeeded


def test_a_failed_batched_start_is_retried_one_by_one_after_its_memory_is_freed():
    """The one-by-one retries ran inside the handler, whose traceback kept the failed batch's tensors alive: on a GPU a
    job that fits alone could run out of memory again."""
    freed = []

    class Failing(FakeEngine):
        def start_many(self, jobs, **kwargs):
            if len(jobs) > 1:
                held = torch.zeros(1000)  # the batch's prompt caches and samples
                self.held = weakref.ref(held)
                raise torch.OutOfMemoryError("fake")
            return super().start_many(jobs, **kwargs)

        def start(self, job):
            if hasattr(self, "held"):
                freed.append(self.held() is None)
            return super().start(job)

    async def scenario():
        service = await make_service(Failing(start_seconds=0.0), batch_window_ms=200)
        jobs = [await submit(service, "a"), await submit(service, "b")]
        results = [await service.wait(job) for job in jobs]
        await service.shutdown()
        return results

    assert len(run(scenario())) == 2
    assert freed == [True, True]


def test_an_accelerator_error_marks_the_service_broken():
    """After an illegal memory access every call on the device fails: jobs failed one after another while /health
    said 200 (the liveness probe never restarted the pod)."""
    class Broken(FakeEngine):
        def tick(self, states):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    async def scenario():
        service = await make_service(Broken())
        job = await submit(service, "x")
        await job.wait(10)
        broken = service.broken
        with pytest.raises(ServiceUnavailable):
            await submit(service, "y")
        await service.shutdown()
        return job, broken

    job, broken = run(scenario())
    assert job.error_kind == "engine"
    assert broken == "the accelerator failed (CUDA error: an illegal memory access was encountered); the service needs a restart"


def test_the_shared_queue_carries_only_the_settings_a_request_changed():
    """Every field was written, so a replica of the previous release (a rolling update) failed every job of a newer one
    on a setting it did not know (`logprobs`), even jobs that never used it."""
    from app.service.shared.records import config_spec

    config = SEAConfig(chains=3, steps=5, seed=7)
    spec = config_spec(config)
    assert spec == {"chains": 3, "steps": 5, "seed": 7}
    assert SEAConfig(**json.loads(json.dumps(spec))) == config
    asked = SEAConfig(logprobs=2, logprob_chains=3)
    assert SEAConfig(**config_spec(asked)) == asked and set(config_spec(asked)) == {"logprobs", "logprob_chains"}


def test_a_request_whose_log_probs_fail_fails_alone():
    """The log-prob pass ran inside the batched step, after its requests were done: when it ran out of memory, the
    retried halves skipped them as done, and every request of the batch failed as an engine error."""
    class Failing(FakeEngine):
        def attach_token_log_probs(self, state):
            if state.job.config.logprobs is not None:
                raise torch.OutOfMemoryError("fake")

    async def scenario():
        service = await make_service(Failing(), max_batch_chains=4)
        asked = await service.submit(SEAConfig(chains=2, steps=2, logprobs=2), [{"role": "user", "content": "a"}])
        plain = await submit(service, "b")
        for job in (asked, plain):
            await job.wait(10)
        await service.shutdown()
        return asked, plain

    asked, plain = run(scenario())
    assert plain.status == JobStatus.succeeded
    assert (asked.status, asked.error_kind) == (JobStatus.failed, "overloaded") and "log-probs" in asked.error


def _real_service_scenario(lm, monkeypatch, scenario):
    """Run ``scenario(service, log)`` on a service over the tiny model's real engine; ``log`` records, in order, each
    batched step (``tick``) and each slice of a baseline's run (``advance``), one piece of its work a slice."""
    settings = Settings(max_batch_chains=8, max_queue=8)
    runtime = Runtime.from_lm(lm, settings)
    engine, log = runtime.engine, []
    tick, advance = engine.tick, engine.advance
    monkeypatch.setattr(engine, "tick", lambda states: (log.append("tick"), tick(states))[1])
    monkeypatch.setattr(engine, "advance", lambda state, seconds=math.inf: (log.append("advance"), advance(state, 0.0))[1])

    async def run_it():
        service = AlignService(settings, Metrics())
        await service.attach(runtime, asyncio.get_running_loop())
        try:
            await scenario(service, log)
        finally:
            await service.shutdown()

    run(run_it())


def test_a_baseline_runs_in_slices_between_the_batch_s_steps(lm, monkeypatch):
    """A Best-of-N request ran whole inside its start: every SEA request in the batch waited for all of its draws (a
    Best-of-256 held them for minutes on a CPU). Its passes now run between the batch's steps, and it returns what it
    returns alone."""
    messages = [{"role": "user", "content": "the dog"}]
    bon = SEAConfig(method="bon", samples=96, max_tokens=6, seed=4)  # three passes of 32 samples

    async def scenario(service, log):
        sea_job = await service.submit(SEAConfig(chains=2, steps=6, max_tokens=6, seed=1), messages)
        bon_job = await service.submit(bon, messages)
        sea_result, bon_result = await service.wait(sea_job), await service.wait(bon_job)
        slices = [i for i, entry in enumerate(log) if entry == "advance"]
        assert len(slices) >= 3 and "tick" in log[slices[0] : slices[-1]]  # steps ran between its passes
        alone = service.runtime.engine.run([service.runtime.job(messages, bon, terms=[("principle", 1.0)])])[0]
        assert [c.tokens for c in bon_result.chains] == [c.tokens for c in alone.chains] and bon_result.chosen == alone.chosen
        assert sea_result.method == "sea"

    _real_service_scenario(lm, monkeypatch, scenario)


def test_a_request_joining_the_batch_draws_its_start_between_the_batch_s_steps(lm, monkeypatch):
    """A SEA request drew its initial samples (a third of a request) in one go when it joined: the running batch
    waited for all of them. They are now drawn in slices between the batch's steps, and it returns what it returns
    alone."""
    messages, joining = [{"role": "user", "content": "the dog"}], SEAConfig(chains=4, init_samples=24, steps=2, max_tokens=6, seed=7)

    async def scenario(service, log):
        engine = service.runtime.engine
        advance_start = engine.advance_start
        def one_token(starting, seconds=math.inf):  # the worker's slices; a start in one go (Engine.run's) stays one
            log.append("draw")
            return advance_start(starting, 0.0 if seconds < math.inf else seconds)

        monkeypatch.setattr(engine, "advance_start", one_token)
        running = await service.submit(SEAConfig(chains=2, steps=40, max_tokens=6, seed=1), messages)
        while not [entry for entry in log if entry == "tick"]:
            await asyncio.sleep(0.01)
        joined = await service.submit(joining, messages)
        result = await service.wait(joined)
        first = log.index("draw", log.index("tick"))  # the joining request's slices, after the batch had started
        draws = [i for i, entry in enumerate(log) if entry == "draw" and i >= first]
        assert len(draws) >= 3 and "tick" in log[draws[0] : draws[-1]]  # steps ran between its drawn tokens
        alone = engine.run([service.runtime.job(messages, joining, terms=[("principle", 1.0)])])[0]
        assert [c.tokens for c in result.chains] == [c.tokens for c in alone.chains] and result.chosen == alone.chosen
        service.cancel(running)

    _real_service_scenario(lm, monkeypatch, scenario)


def test_a_start_that_fails_in_a_slice_fails_its_request_alone(lm, monkeypatch):
    messages = [{"role": "user", "content": "the dog"}]

    async def scenario(service, log):
        engine = service.runtime.engine
        advance_start = engine.advance_start
        failing = []

        def out_of_memory(starting, seconds=math.inf):
            if any(state.config.chains == 3 for state in starting.states):
                failing.append(starting)
                raise torch.OutOfMemoryError("injected")
            return advance_start(starting, seconds)

        monkeypatch.setattr(engine, "advance_start", out_of_memory)
        running = await service.submit(SEAConfig(chains=2, steps=6, max_tokens=6, seed=1), messages)
        while not [entry for entry in log if entry == "tick"]:
            await asyncio.sleep(0.01)
        bad = await service.submit(SEAConfig(chains=3, steps=2, max_tokens=6, seed=4), messages)
        with pytest.raises(ServiceUnavailable, match="out of memory"):
            await service.wait(bad)
        assert (await service.wait(running)).method == "sea" and service.worker.alive and failing

    _real_service_scenario(lm, monkeypatch, scenario)


def test_requests_started_together_whose_start_fails_start_again_alone_even_with_one_left(lm, monkeypatch):
    """A start of two requests, one of them cancelled, that ran out of memory failed the other as "started alone"
    (a cancelled request's rows are drawn until the draw ends: the survivor fits alone)."""
    messages = [{"role": "user", "content": "the dog"}]

    async def scenario(service, log):
        engine = service.runtime.engine
        advance_start, group_sizes, slices = engine.advance_start, [], []

        def one_token_then_out_of_memory(starting, seconds=math.inf):
            group_sizes.append(len(starting.states))
            slices.append(starting)
            if len(starting.states) == 2 and starting.states[0].cancelled:
                starting.run = out_of_memory(starting.run)  # the draw's next token fails
            return advance_start(starting, 0.0 if seconds < math.inf else seconds)

        def out_of_memory(drawing):
            drawing.close()
            raise torch.OutOfMemoryError("injected")
            yield

        monkeypatch.setattr(engine, "advance_start", one_token_then_out_of_memory)
        cancelled, kept = await asyncio.gather(*(service.submit(SEAConfig(chains=2, steps=1, max_tokens=6, seed=seed), messages)
                                                 for seed in (1, 2)))
        while not slices:
            await asyncio.sleep(0.01)
        service.cancel(cancelled)
        result = await service.wait(kept)
        alone = engine.run([service.runtime.job(messages, SEAConfig(chains=2, steps=1, max_tokens=6, seed=2), terms=[("principle", 1.0)])])[0]
        assert [c.tokens for c in result.chains] == [c.tokens for c in alone.chains]
        assert group_sizes[0] == 2 and all(state.starting is None for state in slices[0].states)  # no cycle through the start
        assert cancelled.status == JobStatus.cancelled

    _real_service_scenario(lm, monkeypatch, scenario)


def test_a_baseline_that_fails_in_a_slice_fails_alone(lm, monkeypatch):
    messages = [{"role": "user", "content": "the dog"}]

    async def scenario(service, log):
        engine = service.runtime.engine
        advance = engine.advance

        def out_of_memory(state, seconds=math.inf):
            advance(state, seconds)
            raise torch.OutOfMemoryError("injected")

        monkeypatch.setattr(engine, "advance", out_of_memory)
        sea_job = await service.submit(SEAConfig(chains=2, steps=3, max_tokens=6, seed=1), messages)
        bon_job = await service.submit(SEAConfig(method="bon", samples=64, max_tokens=6, seed=4), messages)
        with pytest.raises(ServiceUnavailable, match="out of memory"):
            await service.wait(bon_job)
        assert (await service.wait(sea_job)).method == "sea" and service.worker.alive
        assert bon_job.error_kind == "overloaded"

    _real_service_scenario(lm, monkeypatch, scenario)


def test_a_long_prompt_is_tokenized_off_the_event_loop(monkeypatch):
    """A prompt within the character pre-check can still hold half a million tokens (CJK): 0.23 s of tokenizing per
    request on the event loop, and a dozen such requests at once kept /health from answering its probes."""
    async def scenario():
        from tests.server import noting_the_event_loop

        service = await make_service(FakeEngine())
        on_loop = []
        monkeypatch.setattr(service.runtime, "job", noting_the_event_loop(service.runtime.job, on_loop))
        await submit(service, "the dog")
        with pytest.raises(Unprocessable):  # past the prompt's token limit, found by tokenizing
            await submit(service, "the dog " * 3000)
        await service.shutdown()
        return on_loop

    assert run(scenario()) == [True, False]
