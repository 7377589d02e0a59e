"""Several replicas sharing one Redis job store: a real redis-server, two real `sea serve` processes on the tiny model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from httpx_sse import connect_sse

from app.engine.types import SEAConfig
from app.service.jobs import JobStatus
from tests.server import ServerProcess, free_port, wait_for
from tests.test_e2e import assert_light
from tests.tiny import save_tiny_lm, tiny_lm

redis = pytest.importorskip("redis", reason="the `redis` client is not installed (pip install -e '.[redis]')")

LONG = {"prompt": "tell me about the sun", "update": "logits", "steps": 200, "max_tokens": 8, "chains": 2, "seed": 3}
SHORT = {"prompt": "a story about the moon", "steps": 4, "max_tokens": 6, "chains": 2, "seed": 1}


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False, capture_output=True, timeout=600)
        found = shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not installed and could not be installed (apt-get install redis-server)")
    return found


def start_redis(port: int, folder, password: str | None = None) -> subprocess.Popen:
    process = subprocess.Popen([_redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(folder), *(["--requirepass", password] if password else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, password=password)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


def stop_redis(port: int, process: subprocess.Popen, password: str | None = None) -> None:
    redis.Redis(port=port, password=password).shutdown(nosave=True)
    process.wait(10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(port, process)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return str(save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama"))


def start_replicas(model_folder, redis_url, tmp_path, count=2, **settings) -> tuple[list[ServerProcess], str]:
    prefix = "test-" + uuid.uuid4().hex[:8]
    replicas = [ServerProcess(model_folder, tmp_path / f"replica{i}.log", redis_url=redis_url, redis_prefix=prefix,
                              replica_lease_seconds=8, max_batch_chains=2, default_chains=2, **settings) for i in range(count)]
    try:
        for replica in replicas:
            replica.wait_ready(timeout=600)
    except BaseException:
        for replica in replicas:
            replica.stop(signal.SIGKILL)
        raise
    return replicas, prefix


def job_hash(redis_url, prefix, job_id) -> dict[str, str]:
    return redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"{prefix}:job:{job_id}")


def finished(url, job_id):
    body = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
    return body if body["status"] in ("succeeded", "failed", "cancelled") else None


def test_any_replica_answers_for_any_job_and_both_take_from_one_queue(model_folder, redis_url, tmp_path):
    (a, b), prefix = start_replicas(model_folder, redis_url, tmp_path)
    try:
        created = httpx.post(f"{a.url}/jobs", json={**SHORT, "return_trace": True}, timeout=30)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        on_b = wait_for(lambda: finished(b.url, job_id))
        assert on_b["status"] == "succeeded" and on_b["result"]["text"]
        assert on_b["result"]["chains"][0]["trace"], "the result crosses replicas whole"
        on_a = wait_for(lambda: finished(a.url, job_id))
        assert on_a["result"] == on_b["result"]

        # B streams the events of a job A accepted: step events, then the result.
        job_id = httpx.post(f"{a.url}/jobs", json=SHORT, timeout=30).json()["id"]
        with httpx.Client(timeout=60) as client, connect_sse(client, "GET", f"{b.url}/jobs/{job_id}/events") as source:
            events = [(event.event, event.json()) for event in source.iter_sse()]
        assert events[-1][0] == "result" and events[-1][1]["status"] == "succeeded"
        assert [e for e, _ in events[:-1]] and all(e == "step" for e, _ in events[:-1])
        def stored_when_ended():  # the runner writes the end to Redis after its own readers saw it (B may be the runner)
            stored = [json.loads(raw) for raw in redis.Redis.from_url(redis_url, decode_responses=True).lrange(f"{prefix}:events:{job_id}", 0, -1)]
            return stored if stored[-1]["event"] == "end" else None

        stored = wait_for(stored_when_ended)
        assert stored[-1] == {"event": "end", "status": "succeeded"}
        assert_light(stored[:-1], [chain["best_step"] for chain in events[-1][1]["result"]["chains"]])

        # Four 2-chain jobs posted to A alone, each replica with room for one: B takes some of them.
        ids = [httpx.post(f"{a.url}/jobs", json={**LONG, "steps": 40}, timeout=30).json()["id"] for _ in range(4)]
        results = [wait_for(lambda i=i: finished(a.url, i)) for i in ids]
        assert all(r["status"] == "succeeded" for r in results)
        owners = {job_hash(redis_url, prefix, i)["owner"] for i in ids}
        assert len(owners) == 2, "both replicas ran jobs from the shared queue"

        # A blocking /align on B, and a cancel through the replica that does not run the job.
        assert httpx.post(f"{b.url}/align", json=SHORT, timeout=60).status_code == 200
        job_id = httpx.post(f"{a.url}/jobs", json=LONG, timeout=30).json()["id"]
        wait_for(lambda: job_hash(redis_url, prefix, job_id).get("status") == "running")
        owner = job_hash(redis_url, prefix, job_id)["owner"]
        other = a if str(b.process.pid) in owner.split("-") else b
        cancelled = httpx.delete(f"{other.url}/jobs/{job_id}", timeout=30).json()
        assert cancelled["status"] == "cancelled", cancelled
        assert wait_for(lambda: finished(a.url, job_id))["status"] == "cancelled"
        assert wait_for(lambda: finished(b.url, job_id))["status"] == "cancelled"
    finally:
        codes = [replica.stop() for replica in (a, b)]
        assert codes == [0, 0], a.log_path.read_text()[-3000:] + b.log_path.read_text()[-3000:]


def test_a_job_whose_replica_dies_is_retried_elsewhere_and_no_other_job_is_lost(model_folder, redis_url, tmp_path):
    (a, b), prefix = start_replicas(model_folder, redis_url, tmp_path, job_max_attempts=2)
    try:
        # First, the state a pause longer than the lease leaves behind (seen under load at start-up): the lease gone
        # and the replica reaped out of the set. Each must rejoin, or its death below would go unnoticed.
        store = redis.Redis.from_url(redis_url, decode_responses=True)
        names = sorted(store.smembers(f"{prefix}:replicas"))
        assert len(names) == 2
        for name in names:
            store.delete(f"{prefix}:alive:{name}")
            store.srem(f"{prefix}:replicas", name)
        wait_for(lambda: sorted(store.smembers(f"{prefix}:replicas")) == names, 60)
        for replica in (a, b):
            wait_for(lambda r=replica: "lease lapsed" in r.log_path.read_text(), 60)

        victim = httpx.post(f"{a.url}/jobs", json=LONG, timeout=30).json()["id"]
        wait_for(lambda: job_hash(redis_url, prefix, victim).get("status") == "running")
        owner = job_hash(redis_url, prefix, victim)["owner"]
        dying, survivor = (a, b) if str(a.process.pid) in owner.split("-") else (b, a)
        others = [httpx.post(f"{survivor.url}/jobs", json=SHORT, timeout=30).json()["id"] for _ in range(3)]
        dying.process.send_signal(signal.SIGKILL)
        dying.process.wait(30)

        retried = wait_for(lambda: finished(survivor.url, victim), timeout=300)
        assert retried["status"] == "succeeded", retried
        assert job_hash(redis_url, prefix, victim)["attempts"] == "2"
        assert job_hash(redis_url, prefix, victim)["owner"] != owner
        for job_id in others:
            assert wait_for(lambda j=job_id: finished(survivor.url, j), timeout=300)["status"] == "succeeded"
        log = survivor.log_path.read_text()
        assert "stopped renewing its lease" in log
    finally:
        dying.stop()
        assert survivor.stop() == 0, survivor.log_path.read_text()[-3000:]


def _scripts_alone(redis_url: str, name: str, max_attempts: int):
    """A client, a fresh prefix, and a store with no runtime, and no worker but its metrics: for running its Redis
    scripts alone."""
    from redis.asyncio import Redis

    from app.service.metrics import Metrics
    from app.service.shared import SharedJobs

    client = Redis.from_url(redis_url, decode_responses=True)
    prefix = name + uuid.uuid4().hex[:8]
    worker = SimpleNamespace(metrics=Metrics())
    return client, prefix, SharedJobs(client, client, runtime=None, worker=worker, prefix=prefix, ttl=60, lease=1.0,
                                      max_attempts=max_attempts, max_queue=8, jobs={}, is_draining=lambda: False)


def _jobs_counted(shared) -> dict[str, float]:
    """The outcomes counted (each is exported at 0 from the start)."""
    return {sample.labels["outcome"]: sample.value for metric in shared.worker.metrics.jobs.collect() for sample in metric.samples if sample.value}


def _reply_lost_once(call, answers: list):
    """``call``, whose first answer (not None) Redis gives and the client never gets: the connection drops."""
    async def lost(*args, **kwargs):
        answer = await call(*args, **kwargs)
        if answer is not None:
            answers.append(answer)
            if len(answers) == 1:
                raise redis.ConnectionError("Connection reset by peer")
        return answer
    return lost


async def _running_on_a_dead_replica(client, prefix: str, job_id: str, **fields) -> None:
    await client.sadd(f"{prefix}:replicas", "dead-1")
    await client.hset(f"{prefix}:job:{job_id}", mapping={"status": "running", "owner": "dead-1", "spec": "{}", **fields})
    await client.lpush(f"{prefix}:claimed:dead-1", job_id)


async def _runner_and_asker(redis_url: str, name: str, engine) -> tuple:
    """Two replicas on a fresh prefix: one runs jobs on ``engine``, the other (an asker) takes none."""
    from tests.test_service import FakeEngine, make_service

    prefix = name + "-" + uuid.uuid4().hex[:8]
    runner = await make_service(engine, redis_url=redis_url, redis_prefix=prefix)
    asker = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
    asker.shared.stop_claiming()
    return runner, asker


def test_after_the_last_attempt_a_dead_replicas_job_is_failed_not_lost(redis_url):
    """The reaping script alone: a job whose runner died on its last attempt ends failed, with its end event."""
    async def scenario():
        client, prefix, shared = _scripts_alone(redis_url, "reap-", max_attempts=2)
        for job_id, attempts in (("last", 2), ("again", 1)):
            await _running_on_a_dead_replica(client, prefix, job_id, attempts=attempts)
        await shared._reap()
        last, again = [await client.hgetall(f"{prefix}:job:{i}") for i in ("last", "again")]
        queue = await client.lrange(f"{prefix}:queue", 0, -1)
        events = await client.lrange(f"{prefix}:events:last", 0, -1)
        members = await client.smembers(f"{prefix}:replicas")
        await client.aclose()

        return last, again, queue, events, members, _jobs_counted(shared)

    last, again, queue, events, members, counted = asyncio.run(scenario())
    assert last["status"] == "failed" and "replica running the job stopped" in last["error"]
    assert counted == {"engine": 1}, "the job it ended is counted by the reaping replica (the requeued one is not)"
    assert events == ['{"event": "end", "status": "failed"}']
    assert again["status"] == "queued" and queue == ["again"]
    assert members == set(), "a reaped replica leaves the replica set"


def test_a_job_claimed_as_its_replica_begins_to_drain_goes_back_to_the_queue(redis_url):
    """The claimer waits in BLMOVE up to a second; a job it takes after the drain began is handed back (attempt
    not counted) and another replica runs it, instead of it waiting out a lease on a replica that is leaving."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        prefix = "drain-" + uuid.uuid4().hex[:8]
        leaving = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        other = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        other.shared.stop_claiming()
        blmove = leaving.shared._claim_redis.blmove

        async def drain_begins_while_waiting(*args):
            job_id = await blmove(*args)
            if job_id is not None:
                leaving.shared.stop_claiming()
            return job_id

        leaving.shared._claim_redis.blmove = drain_begins_while_waiting
        await asyncio.sleep(1.2)  # a BLMOVE that started before the patch has timed out (1 s)
        job = await submit(other, "hello", timeout=30)
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        claimed_by = time.monotonic() + 10
        while leaving.shared._claiming and time.monotonic() < claimed_by:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the hand-back runs right after the claim
        handed_back = await client.hgetall(f"{prefix}:job:{job.id}")
        other.shared._claiming = True
        result = await other.wait(job)
        attempts = await client.hget(f"{prefix}:job:{job.id}", "attempts")
        await client.aclose()
        for service in (leaving, other):
            await service.shutdown()
        return handed_back, result, attempts

    handed_back, result, attempts = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert handed_back["status"] == "queued" and handed_back["attempts"] == "0" and handed_back["owner"] == ""
    assert result.text == "text" and attempts == "1"


def test_a_replica_started_before_redis_waits_for_it_and_then_serves(tmp_path):
    """It logged the failure and stayed unready for good (a compose file starts both at once; Kubernetes restarted it
    only after its start-up probe's five minutes)."""
    from tests.test_service import FakeEngine, make_service, submit

    port = free_port()

    async def scenario():
        starting = asyncio.create_task(make_service(FakeEngine(), redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="late-redis"))
        await asyncio.sleep(1.5)
        assert not starting.done()
        redis_server = await asyncio.to_thread(start_redis, port, tmp_path)
        try:
            service = await asyncio.wait_for(starting, 30)
            assert service.ready
            result = await service.wait(await submit(service, "hello"))
            await service.shutdown()
        finally:
            await asyncio.to_thread(stop_redis, port, redis_server)
        return result

    result = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert result.text


def test_a_sigterm_while_redis_is_unreachable_at_start_leaves_nothing_running(tmp_path):
    """Redis answering right after the signal started the engine and the store's tasks after the drain had passed,
    so the replica stayed registered and its store was never closed."""
    from tests.test_service import FakeEngine, unattached_service

    port = free_port()

    async def scenario():
        service, runtime = unattached_service(FakeEngine(), redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="sigterm")
        service._loop = asyncio.get_running_loop()
        starting = asyncio.create_task(service.attach(runtime, service._loop))
        await asyncio.sleep(1.5)  # retrying
        service.request_drain()
        redis_server = await asyncio.to_thread(start_redis, port, tmp_path)  # answers before the next attempt
        try:
            await asyncio.wait_for(starting, 30)
            await service.shutdown()
            replicas = await asyncio.to_thread(redis.Redis(port=port).smembers, "sigterm:replicas")
        finally:
            await asyncio.to_thread(stop_redis, port, redis_server)
        return service, replicas

    service, replicas = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert service.worker is None and service.shared._tasks == [] and replicas == set()


def test_a_wrong_redis_password_fails_the_start_instead_of_retrying(tmp_path):
    """Retried like an unreachable Redis, a wrong password kept the replica unready for good, saying Redis was down."""
    from tests.test_service import FakeEngine, make_service

    port = free_port()
    process = start_redis(port, tmp_path, password="right")
    try:
        async def scenario():
            with pytest.raises(redis.AuthenticationError):
                await asyncio.wait_for(make_service(FakeEngine(), redis_url=f"redis://default:wrong@127.0.0.1:{port}/0", redis_prefix="auth"), 10)

        asyncio.run(scenario())
    finally:
        stop_redis(port, process, password="right")


def test_a_job_redis_did_not_take_is_not_kept_waiting_forever(redis_url):
    from app.errors import ServiceUnavailable
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="fail-" + uuid.uuid4().hex[:8])

        async def redis_down(**_):
            raise redis.ConnectionError("Connection refused")

        service.shared._scripts["enqueue"] = redis_down
        with pytest.raises(ServiceUnavailable):
            await submit(service, "hello")
        left = dict(service.store.jobs), dict(service.shared._mirrored)
        await service.shutdown()
        return left

    jobs, mirrored = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert jobs == {} and mirrored == {}


def test_a_cancel_whose_message_is_lost_still_stops_the_job_where_it_runs(redis_url):
    """Pub/sub drops a message sent while the runner resubscribes: the runner reads the job's ``cancel`` flag on
    its next poll, so the job ends cancelled within a poll instead of running to its last step."""
    from tests.test_service import FakeEngine

    async def scenario():
        engine = FakeEngine(tick_seconds=0.01)
        runner, asker = await _runner_and_asker(redis_url, "lost", engine)
        job = await runner.submit(SEAConfig(chains=2, steps=3000), [{"role": "user", "content": "long"}])  # 30 s of ticks
        while job.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        watcher = next(task for task in runner.shared._tasks if task.get_name() == "sea-watcher")
        watcher.cancel()  # the runner hears no pub/sub message from now on
        mirror = await asker.shared.lookup(job.id)
        asked = time.monotonic()
        asker.cancel(mirror)
        await asyncio.wait_for(mirror.wait(), 10)
        took = time.monotonic() - asked
        steps = len(engine.batches)
        flag = await asker.shared.redis.hget(asker.shared.key("job", job.id), "cancel")
        for service in (runner, asker):
            await service.shutdown()
        return job, mirror, took, steps, flag

    job, mirror, took, steps, flag = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.status == JobStatus.cancelled and mirror.status == JobStatus.cancelled
    assert mirror.error_kind == "cancelled" and json.loads(flag) == {"kind": "cancelled", "reason": "cancelled by the client"}
    assert steps < 3000 and took < 5


def test_a_job_cancelled_while_its_runner_died_ends_as_asked_not_rerun(redis_url):
    """The reaping and claiming scripts alone: a running job with a ``cancel`` flag whose replica died ends as its
    cancel asked (cancelled, or failed for a timeout) instead of going back to the queue; one handed back with the
    flag (a drain) is ended by the claim, not started."""
    async def scenario():
        client, prefix, shared = _scripts_alone(redis_url, "reap-cancel-", max_attempts=3)
        for job_id, kind in (("by-client", "cancelled"), ("timed-out", "timeout")):
            await _running_on_a_dead_replica(client, prefix, job_id, attempts=1, cancel=json.dumps({"kind": kind, "reason": f"{kind}!"}))
        await shared._reap()
        reaped = {i: await client.hgetall(f"{prefix}:job:{i}") for i in ("by-client", "timed-out")}
        events = await client.lrange(f"{prefix}:events:by-client", 0, -1)
        queue_after_reap = await client.lrange(f"{prefix}:queue", 0, -1)

        await client.hset(f"{prefix}:job:handed-back", mapping={"status": "queued", "attempts": 0, "spec": "{}",
                                                                "cancel": json.dumps({"kind": "cancelled", "reason": "stop"})})
        await client.lpush(f"{prefix}:claimed:me", "handed-back")
        shared.replica = "me"
        claim = await shared._claim("handed-back", f"{prefix}:claimed:me")
        handed_back = await client.hgetall(f"{prefix}:job:handed-back")
        claimed = await client.lrange(f"{prefix}:claimed:me", 0, -1)
        await client.aclose()
        return reaped, events, queue_after_reap, claim, handed_back, claimed, _jobs_counted(shared)

    reaped, events, queue, claim, handed_back, claimed, counted = asyncio.run(scenario())
    assert counted == {"cancelled": 2, "timeout": 1}, "each job ended by a script is counted by the replica that ran it"
    assert reaped["by-client"]["status"] == "cancelled" and reaped["by-client"]["error"] == "cancelled!"
    assert reaped["timed-out"]["status"] == "failed" and reaped["timed-out"]["error_kind"] == "timeout"
    assert events == ['{"event": "end", "status": "cancelled"}'] and queue == []
    assert claim is None and handed_back["status"] == "cancelled" and handed_back["attempts"] == "0" and claimed == []


def test_a_job_claimed_again_while_its_first_run_goes_on_here_runs_once(redis_url):
    """A pause past the lease: another replica requeues this replica's running job, and this replica claims it again
    while the first run still goes on. The run carries on as the new attempt: the job runs once and its result is
    written (under the second attempt), instead of the job entering the batch twice."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        prefix = "reclaim-" + uuid.uuid4().hex[:8]
        engine = FakeEngine(tick_seconds=0.01)
        service = await make_service(engine, redis_url=redis_url, redis_prefix=prefix)
        job = await service.submit(SEAConfig(chains=2, steps=150), [{"role": "user", "content": "paused"}])
        while job.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        client = service.shared.redis
        # What a reaping replica does to a lapsed replica's running job (the _REAP script's requeue).
        await client.hset(service.shared.key("job", job.id), mapping={"status": "queued", "owner": ""})
        await client.lrem(service.shared.key("claimed", service.shared.replica), 0, job.id)
        await client.rpush(service.shared.key("queue"), job.id)
        await service.wait(job)
        await service.shared._writes.join()
        fields = await client.hgetall(service.shared.key("job", job.id))
        await service.shutdown()
        return engine, fields

    engine, fields = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert fields["status"] == "succeeded" and fields["attempts"] == "2" and fields["result"]
    assert max(batch.count("paused") for batch in engine.batches) == 1, "the job ran twice in one batch"
    assert sum(batch.count("paused") for batch in engine.batches) == 151


def test_each_job_is_counted_once_where_it_ended_queued_cancelled_handed_back_or_run(redis_url):
    """sea_jobs_total with a shared store: a job cancelled or timed out in the Redis queue is counted (with its queue
    wait) by the replica that ended it (it was counted nowhere); a job handed back at a drain counts as `requeued`
    where it left and `succeeded` where it ran (it counted `shutdown` and `succeeded`, for one request)."""
    from tests.test_service import FakeEngine, make_service, submit

    def counts(service):
        sample = service.metrics.registry.get_sample_value
        outcomes = ("succeeded", "cancelled", "timeout", "shutdown", "requeued")
        return ({outcome: sample("sea_jobs_total", {"outcome": outcome}) for outcome in outcomes if sample("sea_jobs_total", {"outcome": outcome})},
                sample("sea_queue_wait_seconds_count"))

    async def scenario():
        prefix = "count-" + uuid.uuid4().hex[:8]
        leaving = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix=prefix, drain_seconds=0)
        front = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix=prefix)
        assert front.metrics.registry.get_sample_value("sea_shared_queue_depth") is not None  # exported with a shared store
        front.shared.stop_claiming()
        leaving.shared.stop_claiming()
        await asyncio.sleep(1.2)  # BLMOVEs that started before have timed out (1 s)
        timed_out = await submit(front, "times out", timeout=0.3)
        cancelled = await submit(front, "cancelled")
        front.cancel(cancelled)
        with pytest.raises(Exception, match="timed out while queued"):
            await front.wait(timed_out)
        await asyncio.sleep(0.3)  # the cancel script runs in the background
        in_queue = counts(front)
        long = await submit(front, "long", steps=100, timeout=60)
        leaving.shared._claiming = True
        while not leaving.shared._running:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        await leaving.shutdown()  # hands the running job back
        front.shared._claiming = True
        await front.wait(long)
        await front.shared._writes.join()
        ran = counts(front)
        await front.shutdown()
        return in_queue, counts(leaving), ran

    in_queue, leaving, ran = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert in_queue == ({"cancelled": 1, "timeout": 1}, 2)
    assert leaving[0] == {"requeued": 1}
    assert ran[0] == {"cancelled": 1, "timeout": 1, "succeeded": 1}


def test_with_a_shared_store_a_deadline_ends_queued_and_running_jobs_while_the_worker_is_busy(redis_url):
    """The timer that fails a job at its deadline was armed only without a shared store: with one, a queued or running
    job still waited for the next step boundary (minutes on a CPU) or a replica with room."""
    from tests.test_service import _stuck_engine, _until, make_service, submit

    async def scenario():
        engine, release, stepping = _stuck_engine()
        service = await make_service(engine, max_batch_chains=2, redis_url=redis_url, redis_prefix="deadline-" + uuid.uuid4().hex[:8])
        running = await submit(service, "long", steps=3, timeout=0.3)
        await _until(stepping.is_set)
        queued = await submit(service, "waiting", steps=1, timeout=0.3)
        await _until(lambda: running.status.finished and queued.status.finished)
        still_stuck = not release.is_set()
        release.set()
        await service.shutdown()
        return running, queued, still_stuck

    running, queued, still_stuck = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert still_stuck and (running.error_kind, queued.error_kind) == ("timeout", "timeout")


def test_another_replica_shows_a_job_to_the_key_that_submitted_it_only(redis_url):
    from app.errors import NotFound
    from tests.test_service import FakeEngine

    async def scenario():
        runner, asker = await _runner_and_asker(redis_url, "owner", FakeEngine(tick_seconds=0.01))
        job = await runner.submit(SEAConfig(chains=1, steps=3), [{"role": "user", "content": "hi"}], owner="client-a")
        seen = await asker.get(job.id, "client-a")
        with pytest.raises(NotFound):
            await asker.get(job.id, "client-b")
        with pytest.raises(NotFound):
            await asker.get(job.id)  # a replica without keys' view: no owner
        for service in (runner, asker):
            await service.shutdown()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 60)).owner == "client-a"


def test_a_long_prompt_claimed_or_read_on_another_replica_is_tokenized_off_the_event_loop(redis_url):
    """The replica that claims a queued job and one that reads it both build it from its spec; a long prompt was
    tokenized there on the event loop (48 reads of long jobs stalled a replica's /health for 2.2 s: security review),
    as a submission's never is."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        prefix = "long-" + uuid.uuid4().hex[:8]
        submitter = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        submitter.shared.stop_claiming()
        reader = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        reader.shared.stop_claiming()
        runner = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix=prefix)
        on_the_loop = {}
        for name, service in (("reader", reader), ("runner", runner)):
            def job(*args, _real=service.runtime.job, _name=name, **kwargs):
                on_the_loop.setdefault(_name, []).append(threading.current_thread() is threading.main_thread())
                return _real(*args, **kwargs)

            service.runtime.job = job
        long = [{"role": "user", "content": "lighthouse " * 1000}]  # past LONG_PROMPT_CHARACTERS
        job = await submitter.submit(SEAConfig(chains=1, steps=3), long)
        mirror = await reader.shared.lookup(job.id)
        await asyncio.wait_for(job.wait(), 30)
        short = await submitter.submit(SEAConfig(chains=1, steps=1), [{"role": "user", "content": "hi"}])
        await asyncio.wait_for(short.wait(), 30)
        for service in (submitter, reader, runner):
            await service.shutdown()
        return on_the_loop, job, mirror

    on_the_loop, job, mirror = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.status == JobStatus.succeeded and mirror.id == job.id
    assert on_the_loop == {"reader": [False], "runner": [False, True]}  # the short prompt's on the loop: not worth a thread


def test_a_replica_checks_a_queued_job_against_its_own_limits_before_running_it(redis_url):
    """Whoever writes to Redis must not decide what runs: a job past the claiming replica's limits (queued by a
    replica with other settings, or written straight into Redis) fails with the reason instead of running."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        prefix = "limits-" + uuid.uuid4().hex[:8]
        engine = FakeEngine(tick_seconds=0.01)
        runner = await make_service(engine, redis_url=redis_url, redis_prefix=prefix, max_chains=4, max_prompt_tokens=64)
        asker = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix, max_chains=16)
        asker.shared.stop_claiming()
        job = await asker.submit(SEAConfig(chains=8, steps=2), [{"role": "user", "content": "too big"}])
        await asyncio.wait_for(job.wait(), 20)
        fits = await asker.submit(SEAConfig(chains=2, steps=2), [{"role": "user", "content": "fits"}])
        await asyncio.wait_for(fits.wait(), 20)
        long = await asker.submit(SEAConfig(chains=2, steps=2), [{"role": "user", "content": "too big " * 100}])
        await asyncio.wait_for(long.wait(), 20)
        # The runner read the job (a GET: its mirror) before it took it: the mirror is checked as well.
        runner.shared._claiming = False
        read_first = await asker.submit(SEAConfig(chains=8, steps=2), [{"role": "user", "content": "too big, read first"}])
        await runner.get(read_first.id)
        runner.shared._claiming = True
        await asyncio.wait_for(read_first.wait(), 20)
        no_deadline = dataclasses.replace(await runner.get(fits.id), deadline=math.nan)
        with pytest.raises(ValueError, match="no deadline"):
            runner.shared._check_runnable(no_deadline)  # NaN (JSON as Python reads it) is no deadline either
        for service in (runner, asker):
            await service.shutdown()
        return job, fits, read_first, long, engine

    job, fits, read_first, long, engine = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert long.status == JobStatus.failed and "the limit is 64" in long.error
    assert job.status == JobStatus.failed and "chains must be at most 4" in job.error
    assert read_first.status == JobStatus.failed and "chains must be at most 4" in read_first.error
    assert fits.status == JobStatus.succeeded
    assert engine.batches and not any("too big" in batch for batches in engine.batches for batch in batches)


def test_with_a_shared_store_a_replica_keeps_at_most_its_bound_of_jobs(redis_url):
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="kept-" + uuid.uuid4().hex[:8])
        service.shared.stop_claiming()
        service.store.most_kept = 3
        for _ in range(8):  # submitted and cancelled at once
            job = await service.submit(SEAConfig(chains=1, steps=1), [{"role": "user", "content": "hi"}])
            service.cancel(job)
            await asyncio.wait_for(job.wait(), 10)
        kept = len(service.store)
        await service.shutdown()
        return kept

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) <= 3


def test_a_job_s_end_that_redis_could_not_take_is_written_once_it_answers(redis_url):
    """Redis unreachable as a job ended here: its end was logged and dropped, so the job stayed `running` in Redis
    for good (and ran again once this replica's lease lapsed). It is retried until Redis takes it."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="end-" + uuid.uuid4().hex[:8])
        finish = service.shared._scripts["finish"]
        calls = []

        async def down_twice(**kwargs):
            calls.append(time.monotonic())
            if len(calls) <= 2:
                raise redis.ConnectionError("Connection refused")
            return await finish(**kwargs)

        service.shared._scripts["finish"] = down_twice
        job = await submit(service, "hello")
        result = await service.wait(job)
        await asyncio.wait_for(service.shared._writes.join(), 20)
        fields = await service.shared.redis.hgetall(service.shared.key("job", job.id))
        running = dict(service.shared._running)
        await service.shutdown()
        return job, result, fields, calls, running

    job, result, fields, calls, running = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert result is not None and job.status == JobStatus.succeeded
    assert len(calls) == 3 and fields["status"] == "succeeded" and fields["result"] and running == {}


def test_a_job_s_end_written_but_whose_reply_was_lost_counts_once_and_stays_readable_here(redis_url, caplog):
    """Redis ran the script that writes a job's end, but its reply was lost (the connection dropped): the retry found
    the job no longer running, took it for another replica's, logged "result dropped", forgot the job here and counted
    nothing. The retry now sees that the end it writes is there already."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="reply-" + uuid.uuid4().hex[:8])
        calls = []
        service.shared._scripts["finish"] = _reply_lost_once(service.shared._scripts["finish"], calls)
        job = await submit(service, "hello")
        result = await service.wait(job)
        await asyncio.wait_for(service.shared._writes.join(), 20)
        fields = await service.shared.redis.hgetall(service.shared.key("job", job.id))
        ends = [json.loads(raw)["event"] for raw in await service.shared.redis.lrange(service.shared.key("events", job.id), 0, -1)]
        kept_here = job.id in service.store.jobs
        counted = _jobs_counted(service.shared)
        await service.shutdown()
        return result, fields, calls, ends, kept_here, counted

    with caplog.at_level("WARNING", logger="app.service.shared"):
        result, fields, calls, ends, kept_here, counted = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert result is not None and calls == [1, 2] and fields["status"] == "succeeded" and ends.count("end") == 1
    assert kept_here and counted == {"succeeded": 1.0}
    assert not [r for r in caplog.records if "result dropped" in r.getMessage()]


@pytest.mark.parametrize("lost", ["blmove", "claim"])
def test_a_claim_whose_reply_was_lost_goes_back_to_the_queue_and_runs(redis_url, caplog, lost):
    """The connection dropped after BLMOVE moved a job to this replica's claimed list, or after the claim script marked
    it running here: the reply never came, the job stayed in the claimed list of a live replica, and nobody ran it
    (the reaper takes only dead replicas' jobs): its client waited until the deadline."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="claim-" + uuid.uuid4().hex[:8])
        shared = service.shared
        failures = []
        if lost == "blmove":
            shared._claim_redis.blmove = _reply_lost_once(shared._claim_redis.blmove, failures)
        else:
            shared._scripts["claim"] = _reply_lost_once(shared._scripts["claim"], failures)
        job = await submit(service, "hello")
        result = await asyncio.wait_for(service.wait(job), 20)
        await asyncio.wait_for(shared._writes.join(), 20)
        fields = await shared.redis.hgetall(shared.key("job", job.id))
        claimed = await shared.redis.lrange(shared.key("claimed", shared.replica), 0, -1)
        await service.shutdown()
        return result, fields, claimed, failures

    with caplog.at_level("WARNING", logger="app.service.shared"):
        result, fields, claimed, failures = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert failures and result is not None and fields["status"] == "succeeded" and fields["attempts"] == "1" and claimed == []
    assert [r for r in caplog.records if "the reply to its claim was lost" in r.getMessage()]


def test_a_job_whose_record_no_replica_wrote_fails_once(redis_url):
    """A spec that is not a JSON object made the claim loop fail after the claim: the job stayed in the claimed list
    (and, once lost claims were put back, went round the queue for good, a traceback and a `requeued` event a second)."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="poison-" + uuid.uuid4().hex[:8])
        shared, job_id = service.shared, "job-" + uuid.uuid4().hex
        await shared.redis.hset(shared.key("job", job_id), mapping={"spec": "[]", "status": "queued", "attempts": 0, "created": time.time()})
        await shared.redis.lpush(shared.key("queue"), job_id)
        for _ in range(100):
            fields = await shared.redis.hgetall(shared.key("job", job_id))
            if fields["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # a loop would have claimed it again by now
        fields = await shared.redis.hgetall(shared.key("job", job_id))
        events = [json.loads(raw)["event"] for raw in await shared.redis.lrange(shared.key("events", job_id), 0, -1)]
        lists = [await shared.redis.lrange(shared.key(*name), 0, -1) for name in (("queue",), ("claimed", shared.replica))]
        await service.shutdown()
        return fields, events, lists

    fields, events, lists = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert fields["status"] == "failed" and fields["attempts"] == "1" and "not a JSON object" in fields["error"]
    assert events == ["end"] and lists == [[], []]


@pytest.mark.parametrize(("lost", "ends_soon"), [("blmove", False), ("claim", False), ("blmove", True)])
def test_a_job_claimed_again_here_whose_claim_reply_was_lost_ends_under_the_new_attempt(redis_url, lost, ends_soon):
    """Another replica requeued a job running here (this replica's lease lapsed) and this one took it again, but the
    reply to BLMOVE or to the claim was lost: the run's end went under the old attempt and was dropped, and the job
    stayed `running` or `queued` in no list at all, where nothing would ever end or run it. `ends_soon`: the run ends
    before the claim loop settles the lost claim (the end was dropped, the job left `queued` in no list)."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        engine = FakeEngine(tick_seconds=0.01)
        service = await make_service(engine, redis_url=redis_url, redis_prefix="again-" + uuid.uuid4().hex[:8])
        shared = service.shared
        job = await service.submit(SEAConfig(chains=2, steps=150), [{"role": "user", "content": "paused"}])
        while job.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        failures = []
        if lost == "blmove":
            shared._claim_redis.blmove = _reply_lost_once(shared._claim_redis.blmove, failures)
        else:
            shared._scripts["claim"] = _reply_lost_once(shared._scripts["claim"], failures)
        client = shared.redis
        while ends_soon and len(engine.batches) < 140:  # requeued 0.1 s before the run ends
            await asyncio.sleep(0.005)
        # What a reaping replica does to a lapsed replica's running job (the _REAP script's requeue).
        await client.hset(shared.key("job", job.id), mapping={"status": "queued", "owner": ""})
        await client.lrem(shared.key("claimed", shared.replica), 0, job.id)
        await client.rpush(shared.key("queue"), job.id)
        await service.wait(job)
        await asyncio.wait_for(shared._writes.join(), 20)
        await asyncio.sleep(1.5)  # the claim loop settles its lost claims a second after the failure
        fields = await client.hgetall(shared.key("job", job.id))
        lists = [await client.lrange(shared.key(*name), 0, -1) for name in (("queue",), ("claimed", shared.replica))]
        await service.shutdown()
        return engine, fields, lists, failures

    engine, fields, lists, failures = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert failures and fields["status"] == "succeeded" and fields["attempts"] == "2" and fields["result"] and lists == [[], []]
    assert sum(batch.count("paused") for batch in engine.batches) == 151  # it ran once


def test_a_job_claimed_again_while_its_end_waits_is_not_run_again_when_the_writer_adopts_the_claim(redis_url):
    """The run had ended and its end waited to be written when another replica requeued the job (this one's lease
    lapsed) and this one claimed it again; the writer saw the new claim in Redis and wrote the end under it, and the
    claim loop, back from building the job, ran it a second time (its end counted twice)."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        engine = FakeEngine(tick_seconds=0.005)
        service = await make_service(engine, redis_url=redis_url, redis_prefix="adopt-" + uuid.uuid4().hex[:8])
        shared, client = service.shared, service.shared.redis
        finish, work = shared._scripts["finish"], shared._work
        attempts = []

        async def slow_work(spec):  # the claim loop builds the job from its spec, slowly
            await asyncio.sleep(0.5)
            return await work(spec)

        async def requeued_first(**kwargs):
            if not attempts:  # what a reaping replica does, then this replica's claim of it again
                await client.hset(shared.key("job", kwargs["args"][0]), mapping={"status": "queued", "owner": ""})
                await client.lrem(shared.key("claimed", shared.replica), 0, kwargs["args"][0])
                await client.rpush(shared.key("queue"), kwargs["args"][0])
                while await client.hget(shared.key("job", kwargs["args"][0]), "attempts") != "2":
                    await asyncio.sleep(0.01)
            attempts.append(kwargs["args"][2])
            return await finish(**kwargs)

        shared._work, shared._scripts["finish"] = slow_work, requeued_first
        job = await service.submit(SEAConfig(chains=2, steps=5), [{"role": "user", "content": "paused"}])
        await service.wait(job)
        await asyncio.sleep(1.5)
        await asyncio.wait_for(shared._writes.join(), 20)
        fields = await client.hgetall(shared.key("job", job.id))
        counted = _jobs_counted(shared)
        await service.shutdown()
        return engine, fields, attempts, counted

    engine, fields, attempts, counted = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert attempts == [1, 2] and fields["status"] == "succeeded" and fields["attempts"] == "2"
    assert sum(batch.count("paused") for batch in engine.batches) == 6 and counted == {"succeeded": 1.0}


def test_jobs_redis_lost_end_where_they_are_waited_for_and_a_result_made_here_stays_readable(redis_url):
    """Redis restarted without its data (the deployment runs it without persistence): a blocking request whose job
    waited in the shared queue, or ran on another replica, waited until its deadline and a stream for good, since
    nothing would end the job's mirror; and a job that finished here was forgotten here (404). Now a mirror whose
    record is gone ends within a poll as `lost` (503, send it again), and a result made here stays readable here."""
    from app.errors import ServiceUnavailable
    from tests.test_service import FakeEngine, submit

    async def forget(client, prefix: str, job_id: str) -> None:  # what a Redis restarted empty holds of a job: nothing
        await client.delete(f"{prefix}:job:{job_id}", f"{prefix}:events:{job_id}")
        await client.lrem(f"{prefix}:queue", 0, job_id)
        for claimed in await client.keys(f"{prefix}:claimed:*"):
            await client.lrem(claimed, 0, job_id)

    async def scenario():
        runner, asker = await _runner_and_asker(redis_url, "lost", FakeEngine(tick_seconds=0.01))
        ran_here = await submit(runner, "runs here", steps=150, timeout=300)
        while ran_here.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        runner.shared.stop_claiming()
        queued = await submit(asker, "waits in the shared queue", timeout=300)  # nobody takes it
        elsewhere = await asker.shared.lookup(ran_here.id)  # a stream or a poll on the other replica
        client = runner.shared.redis
        for job in (queued, ran_here):
            await forget(client, runner.shared.prefix, job.id)
        asked = time.monotonic()
        await asyncio.wait_for(asyncio.gather(queued.wait(), elsewhere.wait()), 10)
        took = time.monotonic() - asked
        try:
            asker.outcome(queued)
            error = None
        except ServiceUnavailable as exc:
            error = exc
        await runner.wait(ran_here)
        await asyncio.wait_for(runner.shared._writes.join(), 20)
        read_here = await runner.get(ran_here.id)
        counted = [_jobs_counted(service.shared) for service in (runner, asker)]
        for service in (runner, asker):
            await service.shutdown()
        return queued, elsewhere, took, error, ran_here, read_here, counted

    queued, elsewhere, took, error, ran_here, read_here, counted = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert counted == [{"succeeded": 1}, {"lost": 1}], "each job counted once: where it ran, or where it was submitted and lost"
    assert queued.status == JobStatus.failed and queued.error_kind == "lost" and took < 5
    assert elsewhere.status == JobStatus.failed and elsewhere.error_kind == "lost"
    assert error is not None and error.status == 503 and "send it again" in str(error)
    assert ran_here.status == JobStatus.succeeded and read_here is ran_here and read_here.result is not None


def test_a_submission_redis_took_but_did_not_answer_is_withdrawn_not_run(redis_url):
    """A Redis that stalls past the client's socket timeout runs the enqueue script once it wakes: the client got
    503 (and sends the request again) while its first copy ran all the same, for nobody. The job is withdrawn."""
    from app.errors import ServiceUnavailable
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        engine = FakeEngine()
        service = await make_service(engine, redis_url=redis_url, redis_prefix="stall-" + uuid.uuid4().hex[:8])
        service.shared.stop_claiming()
        enqueue = service.shared._scripts["enqueue"]

        async def ran_then_timed_out(**kwargs):
            await enqueue(**kwargs)
            raise redis.TimeoutError("Timeout reading from socket")

        service.shared._scripts["enqueue"] = ran_then_timed_out
        with pytest.raises(ServiceUnavailable):
            await submit(service, "stalled")
        job_id = next(iter(await service.shared.redis.lrange(service.shared.key("queue"), 0, -1)), None)  # it did queue
        deadline = time.monotonic() + 10
        fields = {}
        while time.monotonic() < deadline:
            fields = await service.shared.redis.hgetall(service.shared.key("job", job_id))
            if fields.get("status") != "queued":
                break
            await asyncio.sleep(0.05)
        queue = await service.shared.redis.lrange(service.shared.key("queue"), 0, -1)
        await service.shutdown()
        return job_id, fields, queue, engine

    job_id, fields, queue, engine = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job_id is not None
    assert fields["status"] == "cancelled" and "send it again" in fields["error"] and queue == []
    assert engine.batches == []


def test_a_draining_replica_waits_within_its_grace_period_for_its_clients_jobs_that_run_elsewhere(redis_url):
    """At a SIGTERM the drain waited only for the jobs this replica ran: a blocking request whose job another
    replica ran (or that waited in the shared queue) got 503 "this replica shut down" at once, while its job went
    on to succeed elsewhere, for nobody."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        prefix = "drain-" + uuid.uuid4().hex[:8]
        submitter = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix, drain_seconds=30)
        submitter.shared.stop_claiming()
        runner = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix=prefix)
        job = await submit(submitter, "runs elsewhere", steps=100, timeout=300)  # about a second of ticks on the runner
        while job.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        await submitter.shutdown()
        await runner.shutdown()
        return job

    job = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.status == JobStatus.succeeded and job.result is not None


def test_a_drain_hands_back_a_job_others_may_read_not_one_whose_only_reader_was_answered_503(redis_url):
    """A job a drain could not finish went back to the front of the shared queue even when its only reader was a
    blocking request on the draining replica, answered 503 (it sends the request again): another replica ran it
    for nobody, ahead of the queue. A job of the job API (read by its id from any replica) is still handed back."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        leaving = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix="back-" + uuid.uuid4().hex[:8],
                                     drain_seconds=0)
        blocking = await submit(leaving, "blocking", steps=3000, timeout=60)
        polled = await leaving.submit(SEAConfig(chains=2, steps=3000), [{"role": "user", "content": "polled"}], timeout=60,
                                      stream_events=True)
        while any(job.status == JobStatus.queued for job in (blocking, polled)):
            await asyncio.sleep(0.02)
        await leaving.shutdown()
        fields = {job.id: job_hash(redis_url, leaving.shared.prefix, job.id) for job in (blocking, polled)}
        queue = redis.Redis.from_url(redis_url, decode_responses=True).lrange(f"{leaving.shared.prefix}:queue", 0, -1)
        return blocking, polled, fields, queue

    blocking, polled, fields, queue = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert blocking.error_kind == "shutdown" and fields[blocking.id]["status"] == "failed"
    assert fields[polled.id]["status"] == "queued" and queue == [polled.id]


def test_a_hand_back_whose_reply_was_lost_is_counted_once(redis_url, caplog):
    """A drain's hand-back ran in Redis but its reply was lost: the retry found the job no longer this replica's, logged
    "no longer ours; not handed back" and counted no `requeued`."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        leaving = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix="rel-" + uuid.uuid4().hex[:8],
                                     drain_seconds=0)
        answers = []
        leaving.shared._scripts["release"] = _reply_lost_once(leaving.shared._scripts["release"], answers)
        polled = await leaving.submit(SEAConfig(chains=2, steps=3000), [{"role": "user", "content": "polled"}], timeout=60,
                                      stream_events=True)
        while polled.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        with caplog.at_level("INFO", logger="app.service.shared"):
            await leaving.shutdown()
        queue = redis.Redis.from_url(redis_url, decode_responses=True).lrange(f"{leaving.shared.prefix}:queue", 0, -1)
        return polled, answers, queue, _jobs_counted(leaving.shared)

    polled, answers, queue, counted = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert answers == [1, 2] and queue == [polled.id] and counted.get("requeued") == 1.0
    assert not [r for r in caplog.records if "not handed back" in r.getMessage()]


def test_an_outage_is_logged_when_it_begins_and_ends_not_with_a_traceback_a_second(redis_url, caplog):
    """Each loop that talks to Redis logged a traceback every second of an outage (2 900 tracebacks, with the
    writer's, in a 15 s outage of two replicas). Here the lease loop's outage: one line when it begins, one when it
    ends."""
    from tests.test_service import FakeEngine, make_service

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="outage-" + uuid.uuid4().hex[:8])
        heartbeat = service.shared._heartbeat

        async def unreachable():
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

        with caplog.at_level("INFO", logger="app.service.shared"):
            service.shared._heartbeat = unreachable
            await asyncio.sleep(3.5)
            unready = service.shared.healthy
            service.shared._heartbeat = heartbeat
            await asyncio.sleep(1.5)
        await service.shutdown()
        return unready, service.shared.healthy

    unready, healthy = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert unready is False and healthy is True
    lease = [r for r in caplog.records if r.name.startswith("app.service.shared") and "the lease" in r.getMessage()]
    assert [r.getMessage().split(": ", 1)[1].split(" (")[0].split(" after")[0] for r in lease] == ["Redis cannot be reached", "Redis answers again"]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("app.service.shared"))


def test_after_a_redis_outage_longer_than_the_lease_no_replica_takes_another_s_running_job(redis_url):
    """An outage of Redis longer than the lease lapses every lease: the first replica back reaped the others at once
    and requeued their running jobs, which then ran twice (and a job that had ended in the outage lost its result
    to the rerun). A replica back from an outage waits a lease before it reaps: the others renew meanwhile."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        prefix = "lapse-" + uuid.uuid4().hex[:8]
        runner = await make_service(FakeEngine(tick_seconds=0.01), redis_url=redis_url, redis_prefix=prefix, replica_lease_seconds=1)
        other = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix, replica_lease_seconds=1)
        other.shared.stop_claiming()
        job = await submit(runner, "long", steps=400, timeout=60)
        while job.status == JobStatus.queued:
            await asyncio.sleep(0.02)
        renew = {service: service.shared._heartbeat for service in (runner, other)}

        async def unreachable():
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

        for service in (runner, other):
            service.shared._heartbeat = unreachable
        await asyncio.sleep(2.5)  # both leases lapse
        other.shared._heartbeat = renew[other]  # the other replica reaches Redis first
        await asyncio.sleep(0.6)
        runner.shared._heartbeat = renew[runner]
        await runner.wait(job)
        await asyncio.wait_for(runner.shared._writes.join(), 20)
        fields = await runner.shared.redis.hgetall(runner.shared.key("job", job.id))
        for service in (runner, other):
            await service.shutdown()
        return job, fields

    job, fields = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.status == JobStatus.succeeded and fields["status"] == "succeeded" and fields["attempts"] == "1"


def test_a_job_redis_lost_stops_where_it_runs_for_another_replica_s_client(redis_url):
    """The submitting replica ends a lost job (its client sends it again); the replica running it ran on for nobody."""
    from tests.test_service import FakeEngine, submit

    async def scenario():
        engine = FakeEngine(tick_seconds=0.1)
        runner, asker = await _runner_and_asker(redis_url, "lostrun", engine)
        job = await submit(asker, "runs elsewhere", steps=190, timeout=120)  # 19 s of ticks (200 steps at most from elsewhere)
        while not runner.shared._running:
            await asyncio.sleep(0.02)
        run = next(iter(runner.shared._running.values())).job
        await runner.shared.redis.delete(runner.shared.key("job", job.id), runner.shared.key("events", job.id))
        await asyncio.wait_for(asyncio.gather(job.wait(), run.wait()), 10)
        for service in (runner, asker):
            await service.shutdown()
        return job, run, engine

    job, run, engine = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.error_kind == "lost" and run.error_kind == "lost" and len(engine.batches) < 100


def test_a_blocking_request_s_job_still_queued_when_its_replica_shuts_down_is_withdrawn(redis_url):
    """Its client is answered 503 (and sends the request again); the job stayed in the shared queue and another
    replica ran it for nobody. The 503 said "read the job from another replica", which a blocking client cannot."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        prefix = "withdraw-" + uuid.uuid4().hex[:8]
        leaving = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix, drain_seconds=0.5)
        leaving.shared.stop_claiming()
        blocking = await submit(leaving, "queued", timeout=60)
        polled = await leaving.submit(SEAConfig(chains=2, steps=2), [{"role": "user", "content": "polled"}], timeout=60, stream_events=True)
        await leaving.shutdown()
        fields = {job.id: job_hash(redis_url, prefix, job.id) for job in (blocking, polled)}
        queue = redis.Redis.from_url(redis_url, decode_responses=True).lrange(f"{prefix}:queue", 0, -1)
        return blocking, polled, fields, queue

    blocking, polled, fields, queue = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert blocking.error == "the service shut down before the job could finish" and fields[blocking.id]["status"] == "cancelled"
    assert "read the job from another replica" in polled.error and fields[polled.id]["status"] == "queued" and queue == [polled.id]


def test_a_job_requeued_while_its_end_waits_to_be_written_runs_once_and_the_backlog_stays_small(redis_url):
    """A lease lapsing while Redis was unreachable: another replica requeues the running job, and this one claims it
    again before its end is written. The claim built a second run (the job ran twice, the second run's end was never
    written); and the step events of the other jobs queued up behind the end being retried, without bound."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        engine = FakeEngine(tick_seconds=0.01)
        service = await make_service(engine, redis_url=redis_url, redis_prefix="requeue-" + uuid.uuid4().hex[:8])
        shared = service.shared
        finish = shared._scripts["finish"]
        reachable = asyncio.Event()

        async def unreachable_until_set(**kwargs):
            if not reachable.is_set():
                raise redis.ConnectionError("Connection closed by server.")
            return await finish(**kwargs)

        shared._scripts["finish"] = unreachable_until_set
        busy = await service.submit(SEAConfig(chains=2, steps=150), [{"role": "user", "content": "busy"}],
                                    stream_events=True)
        job = await submit(service, "ends in the outage", steps=20)
        await service.wait(job)
        backlog = []
        for _ in range(20):
            backlog.append(shared._writes.qsize())
            await asyncio.sleep(0.05)
        # What a reaping replica does to a lapsed replica's running job (the _REAP script's requeue).
        await shared.redis.hset(shared.key("job", job.id), mapping={"status": "queued", "owner": ""})
        await shared.redis.lrem(shared.key("claimed", shared.replica), 0, job.id)
        await shared.redis.rpush(shared.key("queue"), job.id)
        while await shared.redis.llen(shared.key("queue")):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        reachable.set()
        await service.wait(busy)
        await asyncio.wait_for(shared._writes.join(), 20)
        fields = await shared.redis.hgetall(shared.key("job", job.id))
        running = dict(shared._running)
        await service.shutdown()
        return engine, fields, running, backlog

    engine, fields, running, backlog = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert sum(batch.count("ends in the outage") for batch in engine.batches) == 21, "the job ran again"
    assert fields["status"] == "succeeded" and fields["attempts"] == "2" and fields["result"] and running == {}
    assert max(backlog) <= 2, backlog


def test_an_end_redis_refuses_and_mirrors_ended_here_leave_nothing_behind(redis_url):
    """An end Redis refused (out of memory, say) left the job in the running set for good; mirrors ended here (their
    deadline) stayed in the mirrored and watched sets for good."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        prefix = "leak-" + uuid.uuid4().hex[:8]
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        finish = service.shared._scripts["finish"]

        async def refused_once(**kwargs):
            service.shared._scripts["finish"] = finish
            raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

        service.shared._scripts["finish"] = refused_once
        job = await submit(service, "refused")
        await service.wait(job)
        await asyncio.wait_for(service.shared._writes.join(), 20)
        running = dict(service.shared._running)
        asker = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix=prefix)
        asker.shared.stop_claiming()
        service.shared.stop_claiming()
        timed_out = [await submit(asker, f"times out {i}", timeout=1) for i in range(3)]
        for one in timed_out:
            await one.wait()
        await asyncio.sleep(1.5)  # a poll
        left = dict(asker.shared._mirrored), set(asker.shared._seen)
        for one in (service, asker):
            await one.shutdown()
        return job, running, left, timed_out

    job, running, (mirrored, seen), timed_out = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert job.status == JobStatus.succeeded and running == {}
    assert all(one.error_kind == "timeout" for one in timed_out) and mirrored == {} and seen == set()


def test_an_end_written_as_its_job_is_claimed_again_is_written_under_the_new_attempt(redis_url):
    """Redis back after an outage: the end being written carried the attempt read before its awaits, while the claim
    loop took the job again (requeued by another replica) and this run adopted the next attempt. The stale finish
    was refused, the run's entry removed: the job stayed `running` in Redis, in no claimed list, with nobody to end it."""
    from tests.test_service import FakeEngine, make_service, submit

    async def scenario():
        service = await make_service(FakeEngine(), redis_url=redis_url, redis_prefix="stale-" + uuid.uuid4().hex[:8])
        shared = service.shared
        lighter = shared._lighter_events
        claimed = []

        async def claimed_meanwhile(job):  # as _start adopts a claim of the job while this write awaits
            if not claimed:
                claimed.append(job.id)
                shared._running[job.id].attempt += 1
                await shared.redis.hset(shared.key("job", job.id), "attempts", shared._running[job.id].attempt)
            return await lighter(job)

        shared._lighter_events = claimed_meanwhile
        job = await submit(service, "claimed again")
        await service.wait(job)
        await asyncio.wait_for(shared._writes.join(), 20)
        fields = await shared.redis.hgetall(shared.key("job", job.id))
        running = dict(shared._running)
        await service.shutdown()
        return fields, running, claimed

    fields, running, claimed = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert claimed and fields["status"] == "succeeded" and fields["attempts"] == "2" and fields["result"] and running == {}
