"""Reliability and security guarantees (docs/reliability.md lists each one with the test that checks it).

Three kinds of test: unit tests on the settings, the middleware (in-process ASGI, no model) and the worker (fake
engine); end-to-end tests through the real `sea serve` on a tiny random model (tests/server.py); and, where a fault
has to be injected into the engine, the same app under a real uvicorn in a thread of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from app.api.middleware import bearer_key_valid
from app.api.routes import health, ready
from app.engine.types import SEAConfig
from app.errors import ServiceUnavailable
from app.main import PUBLIC_PAGES, create_app
from app.runtime import Runtime
from app.service.jobs import JobStatus
from app.service.metrics import Metrics
from app.service.service import AlignService
from app.settings import Settings
from tests.server import ServerProcess, free_port, wait_for
from tests.test_service import FakeEngine, make_service, submit
from tests.tiny import save_tiny_lm, tiny_lm

KEYS = ("key-one", "key-two")
FILE_KEY = "key-three"
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
LIMITS = {"max_body_bytes": 4096, "max_prompt_tokens": 16, "max_tokens_limit": 64, "max_chains": 8, "max_steps": 2000, "max_samples": 8}
# At least 10 s on the tiny model whichever update rule the engine uses (the discrete one stops early once no edit is
# left to try; the logit one runs every step): long enough to be cancelled, to time out or to outlast a drain.
LONG = {"prompt": "write a story", "chains": 8, "max_tokens": 64, "steps": 2000, "seed": 1}
SHORT = {"prompt": "hi", "chains": 1, "max_tokens": 3, "steps": 1, "seed": 1}


def test_the_reliability_doc_names_only_tests_that_exist():
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    here = Path(__file__).parent
    source = "".join(path.read_text() for path in here.glob("test_*.py"))
    names = set(re.findall(r"`(?:\w+\.py::)?(test_\w+)(?![\w.])", doc))  # `test_x` or `file.py::test_x`; `test_drain_*` a prefix
    missing = sorted(name for name in names if f"def {name}" not in source)
    assert len(names) > 20 and missing == [], missing


# ----- helpers ------------------------------------------------------------------------------------


def gauges(url: str) -> dict[str, float]:
    """The unlabelled gauges of /metrics (queue depth, jobs running, chains in flight)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def idle(url: str) -> bool:
    g = gauges(url)
    return g["sea_queue_depth"] == 0 and g["sea_jobs_running"] == 0 and g["sea_chains_in_flight"] == 0


def raw_post(url: str, path: str, body: dict, headers: dict[str, str]) -> socket.socket:
    """Send a POST over a plain socket and return it unread, so that the test decides when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return sock


def assert_error(response: httpx.Response, status: int, type_: str | None = None) -> dict:
    """An OpenAI error body with the status, and the request id header that every response carries."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if type_:
        assert body["error"]["type"] == type_
    assert response.headers.get("x-request-id"), response.headers
    return body["error"]


# ----- settings and the auth middleware (no model) ------------------------------------------------


def test_settings_hide_api_keys_in_repr_and_dumps(tmp_path):
    settings = Settings(api_keys="s3cret-key,other-key")
    for shown in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert "s3cret-key" not in shown and "other-key" not in shown
    assert settings.load_api_keys() == [b"s3cret-key", b"other-key"]


def test_api_keys_file_adds_keys_and_an_empty_one_fails_closed(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11\nfrom-file\n\n  spaced  \n")
    assert Settings(api_keys="env", api_keys_file=str(keys)).load_api_keys() == [b"env", b"from-file", b"spaced"]
    keys.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no keys"):
        Settings(api_keys_file=str(keys)).load_api_keys()
    with pytest.raises(FileNotFoundError):
        Settings(api_keys_file=str(tmp_path / "missing")).load_api_keys()


def test_keys_and_cors_origins_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SEA_API_KEYS", "a, b")
    monkeypatch.setenv("SEA_CORS_ORIGINS", "https://one.example,https://two.example")
    settings = Settings()
    assert settings.load_api_keys() == [b"a", b"b"]
    assert settings.cors_origins == ["https://one.example", "https://two.example"]
    monkeypatch.delenv("SEA_CORS_ORIGINS")
    assert Settings().cors_origins == []  # CORS off by default
    for blank in (" , ", " ", "\t"):  # meant to guard the service, holds no key: fails closed
        monkeypatch.setenv("SEA_API_KEYS", blank)
        with pytest.raises(ValueError, match="holds no key"):
            Settings()


def test_bearer_check():
    keys = [b"key-one", b"key-two"]
    assert bearer_key_valid("Bearer key-two", keys) and bearer_key_valid("bearer key-one", keys)
    for header in (None, "", "Bearer", "Bearer ", "Bearer key", "Bearer key-one-and-more", "Basic key-one", "key-one", "Bearer KEY-ONE"):
        assert not bearer_key_valid(header, keys), header


def _route_paths(app) -> list[tuple[str, str]]:
    """(method, path) of every operation in the OpenAPI document and of the pages outside it, path parameters filled in."""
    pairs = [(method.upper(), path.replace("{job_id}", "job-x"))
             for path, operations in app.openapi()["paths"].items() for method in operations]
    pages = [("GET", path) for path in PUBLIC_PAGES] + [("GET", "/static/playground.js")]
    return pairs + pages + [("GET", "/no-such-path"), ("POST", "/align/")]


@pytest.mark.parametrize("metrics_require_key", [False, True])
def test_every_route_needs_the_key_except_health_ready_metrics_and_pages(metrics_require_key):
    """Deny by default: a route added later is guarded unless it is deliberately made public."""
    app = create_app(Settings(api_keys=",".join(KEYS), metrics_require_key=metrics_require_key))
    public = {"/health", "/ready"} | (set() if metrics_require_key else {"/metrics"}) | PUBLIC_PAGES

    async def check():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for method, path in _route_paths(app):
                anonymous = await client.request(method, path, content=b"{not json", headers={"content-type": "application/json"})
                wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"})
                keyed = await client.request(method, path, headers=AUTH)
                if path in public or path.startswith("/static/"):
                    assert anonymous.status_code != 401, (method, path)
                else:
                    for response in (anonymous, wrong):
                        error = assert_error(response, 401, "authentication_error")
                        assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
                    assert keyed.status_code != 401, (method, path)

    asyncio.run(check())


def test_cors_is_off_by_default_and_on_for_configured_origins():
    async def preflight(app, origin: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
            return await client.options("/align", headers=headers)

    closed = asyncio.run(preflight(create_app(Settings()), "https://app.example"))
    assert "access-control-allow-origin" not in closed.headers
    app = create_app(Settings(cors_origins="https://app.example"))
    allowed = asyncio.run(preflight(app, "https://app.example"))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = asyncio.run(preflight(app, "https://evil.example"))
    assert "access-control-allow-origin" not in other.headers


# ----- the worker with a fake engine --------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_queued_job_past_its_deadline_fails_even_if_nobody_waits_for_it():
    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.02), max_batch_chains=2)
        blocker = await submit(service, "long", steps=10_000)
        queued = await submit(service, "queued", timeout=0.2)
        await queued.wait(10.0)  # only watches the job: nobody calls service.wait(queued), which enforces deadlines itself
        status, error = queued.status, queued.error
        service.cancel(blocker)
        await service.shutdown()
        return status, error

    status, error = run(scenario())
    assert status == JobStatus.failed and error == "the request timed out while queued"


def test_an_error_outside_the_engine_step_fails_that_batch_and_the_worker_goes_on():
    class BrokenEvents(FakeEngine):
        def start(self, job):
            state = super().start(job)
            if job.prompt.messages[0]["content"] == "poison":
                state.initial = None  # _step_event (worker code, not the engine's tick) fails on it
            return state

    async def scenario():
        service = await make_service(BrokenEvents())
        bad = await submit(service, "poison")
        with pytest.raises(RuntimeError):
            await service.wait(bad)
        good = await service.wait(await submit(service, "fine"))
        alive = service.ready
        await service.shutdown()
        return bad, good, alive

    bad, good, alive = run(scenario())
    assert bad.status == JobStatus.failed and bad.error == "internal engine error"
    assert good.text == "text" and alive


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("fake"), RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED")])
def test_out_of_memory_when_starting_fails_only_that_request(error):
    class StartOOM(FakeEngine):
        def start(self, job):
            if job.config.chains > 2:
                raise error
            return super().start(job)

    async def scenario():
        service = await make_service(StartOOM(), max_batch_chains=4)
        big, small = await submit(service, "big", chains=4), await submit(service, "small", chains=1)
        result = await service.wait(small)
        await big.wait(5)
        await service.shutdown()
        return big, result

    big, result = run(scenario())
    assert big.status == JobStatus.failed and big.error_kind == "overloaded" and "fewer chains" in big.error
    assert result.text == "text"


def test_while_the_models_load_the_service_is_alive_but_not_ready():
    """A liveness check that failed during a slow load would restart the pod forever."""
    async def scenario():
        service = AlignService(Settings(), Metrics())  # nothing attached yet: the models are loading
        alive = await health(service)
        with pytest.raises(ServiceUnavailable, match="still loading") as not_ready:
            await ready(service)
        with pytest.raises(ServiceUnavailable, match="still loading") as refused:
            await service.submit(SEAConfig(chains=1, steps=1), [{"role": "user", "content": "hi"}])
        return alive, not_ready.value.headers, refused.value.headers

    alive, not_ready, refused = run(scenario())
    assert alive == {"status": "ok"} and not_ready["Retry-After"] == refused["Retry-After"] == "5"


def test_a_service_whose_worker_thread_is_gone_refuses_work_and_fails_its_probes():
    """Nothing queued would ever run: new work gets a 503 at once (not a 504 at its deadline), and /ready and the
    liveness check /health answer 503 so that an orchestrator takes the pod out and restarts it."""
    async def scenario():
        service = await make_service(FakeEngine())
        before = service.ready, await health(service)
        await asyncio.to_thread(service.worker.stop)  # the thread ends without a drain: what an uncaught bug would do
        with pytest.raises(ServiceUnavailable, match="worker stopped"):
            await service.submit(SEAConfig(chains=1, steps=1), [{"role": "user", "content": "hi"}])
        with pytest.raises(ServiceUnavailable, match="worker stopped"):
            await health(service)
        with pytest.raises(ServiceUnavailable, match="worker stopped"):
            await ready(service)
        after = service.ready
        await service.shutdown()
        return before, after

    assert run(scenario()) == ((True, {"status": "ok"}), False)


def test_drain_logs_the_final_status_of_every_accepted_job(caplog):
    async def scenario():
        # The endless job holds the drain for the whole grace period, so a long one costs nothing when the machine is
        # fast and lets the quick job finish when it is slow.
        service = await make_service(FakeEngine(tick_seconds=0.01), max_batch_chains=2, drain_seconds=5.0)
        jobs = [await submit(service, "quick", steps=2), await submit(service, "endless", steps=100_000)]
        await service.shutdown()
        return jobs

    with caplog.at_level(logging.INFO, logger="app.service.service"):
        quick, endless = run(scenario())
    assert f"drained job {quick.id}: succeeded" in caplog.text
    assert f"drained job {endless.id}: failed (the service shut down before the job could finish)" in caplog.text


def test_drain_waits_for_a_job_drawing_its_start(caplog):
    """A job whose start (its initial samples) is being drawn when the drain begins is work in flight: the drain waits
    for it (it was taken for idle, and the job failed at once with `shutdown`)."""
    async def scenario():
        service = await make_service(FakeEngine(start_seconds=0.5), drain_seconds=10.0)
        job = await submit(service, "starting", steps=2)
        while not service.worker._starting:
            await asyncio.sleep(0.01)
        await service.shutdown()
        return job

    with caplog.at_level(logging.INFO, logger="app.service.service"):
        job = run(scenario())
    assert job.status is JobStatus.succeeded, job.error
    assert "draining: 0 queued, 2 chains running" in caplog.text


# ----- end to end: the real server with API keys and small limits ---------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("secrets") / "keys"
    keys_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    proc = ServerProcess(str(model_folder), tmp_path_factory.mktemp("logs") / "server.log", api_keys=",".join(KEYS),
                         api_keys_file=str(keys_file), max_queue=2, max_batch_chains=8, default_steps=2, default_max_tokens=4,
                         default_chains=2, request_timeout_seconds=30, **LIMITS)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0
    log = proc.log_path.read_text()
    for secret in (*KEYS, FILE_KEY, "wrong-key"):  # keys never reach the log, right or wrong
        assert secret not in log


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client
    wait_for(lambda: idle(server.url), 30)  # each test leaves the engine idle


def test_keys_from_the_environment_and_the_file_work_with_the_openai_client(server):
    for key in (*KEYS, FILE_KEY):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        completion = client.completions.create(model="sea", prompt="the dog", max_tokens=3, extra_body={"sea": {"steps": 1}})
        assert completion.choices[0].text is not None
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hi"}])
    assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"


def test_a_job_is_read_and_cancelled_by_the_key_that_submitted_it_only(server, http):
    """API keys are tenants: another key's job is unknown (404, as an id never issued), whether read, streamed or
    cancelled; its owner still reads it."""
    other = {"Authorization": f"Bearer {KEYS[1]}"}
    created = http.post("/jobs", json={**SHORT, "steps": 3})
    assert created.status_code == 202
    location = created.headers["location"]
    for method, path in (("GET", location), ("GET", location + "/events"), ("DELETE", location)):
        assert_error(httpx.request(method, server.url + path, headers=other, timeout=30), 404)
    wait_for(lambda: http.get(location).json()["status"] == "succeeded", 60)  # the other key's DELETE cancelled nothing
    assert http.get(location + "/events").status_code == 200


def test_missing_or_wrong_key_is_401_before_the_body_is_read(server):
    url = server.url
    cases = [
        httpx.post(url + "/align", json=SHORT),
        httpx.post(url + "/align", json=SHORT, headers={"Authorization": "Bearer wrong-key"}),
        httpx.post(url + "/align", json=SHORT, headers={"Authorization": f"Basic {KEYS[0]}"}),
        httpx.post(url + "/align", content=b"{not json", headers={"content-type": "application/json"}),
        httpx.post(url + "/align", content=b"x" * 10_000, headers={"content-type": "application/json"}),
        httpx.get(url + "/jobs/job-unknown"),
        httpx.get(url + "/v1/models"),
        httpx.get(url + "/openapi-but-not-quite"),
    ]
    for response in cases:
        assert_error(response, 401, "authentication_error")
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path).status_code == 200


def test_limits_answer_422_naming_the_field_and_the_limit(http):
    for field, value, limit in (("chains", 9, 8), ("steps", 2001, 2000), ("max_tokens", 65, 64), ("samples", 9, 8)):
        body = {**SHORT, field: value, **({"method": "bon"} if field == "samples" else {})}
        error = assert_error(http.post("/align", json=body), 422, "invalid_request_error")
        assert error["param"] == field and f"at most {limit}" in error["message"], error
    long_prompt = assert_error(http.post("/align", json={**SHORT, "prompt": "the dog " * 20}), 422)
    assert long_prompt["param"] == "prompt" and "the limit is 16" in long_prompt["message"]
    unknown = assert_error(http.post("/align", json={**SHORT, "chainz": 2}), 422)
    assert unknown["param"] == "chainz"
    unspellable = assert_error(http.post("/align", json={**SHORT, "reward": {"keywords": ["zzzq"], "keywords_only": True}}), 422)
    assert unspellable["param"] == "reward.keywords"
    # The OpenAI endpoints: the same limits, for the OpenAI fields and for the `sea` extra, as 400 (what OpenAI answers).
    for body, param in (({"max_tokens": 65}, "max_tokens"), ({"n": 9}, "n"), ({"sea": {"steps": 2001}}, "sea.steps"),
                        ({"max_tokens": 3, "sea": {"max_tokens": 65}}, "sea.max_tokens")):
        error = assert_error(http.post("/v1/completions", json={"model": "sea", "prompt": "hi", **body}), 400)
        assert error["param"] == param, error
    long_chat = assert_error(http.post("/v1/chat/completions", json={"model": "sea", "messages": [{"role": "user", "content": "the dog " * 20}]}),
                             400)
    assert "the limit is 16" in long_chat["message"]
    # A prompt too long for any tokenizing is refused by its characters, before it is tokenized (on the event loop).
    huge = assert_error(http.post("/align", json={**SHORT, "prompt": "the dog " * 400}), 422)
    assert huge["param"] == "prompt" and huge["code"] == "context_length_exceeded" and "3200 characters" in huge["message"]


def test_text_that_is_not_unicode_or_a_huge_field_name_is_a_clear_error(http):
    """JSON can spell a lone UTF-16 surrogate, which no tokenizer takes (it was a 500 on /v1); a field name is echoed
    back and logged only in part."""
    for path, body, param in (
        ("/v1/completions", '{"model": "sea", "prompt": "the dog \\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "sea", "prompt": ["the dog \\udc00"]}', "prompt"),
        ("/v1/chat/completions", '{"model": "sea", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
        ("/align", '{"prompt": "hi", "reward": {"keywords": ["dog \\ud800"]}}', "reward.keywords"),
        ("/v1/responses", '{"model": "sea", "input": "hi", "metadata": {"k": "\\ud800"}}', "metadata"),  # echoed in the answer: a 500
        ("/v1/chat/completions", '{"model": "sea", "messages": [{"role": "user", "content": "hi"}], "metadata": {"\\udfff": "v"}}', "metadata"),
    ):
        error = assert_error(http.post(path, content=body.encode(), headers={"content-type": "application/json"}),
                             400 if path.startswith("/v1") else 422)
        assert error["param"] == param and "surrogate" in error["message"], error
    error = assert_error(http.post("/align", json={**SHORT, "x" * 3000: 1}), 422)
    assert error["param"].startswith("xxx") and len(error["param"]) <= 200 and len(error["message"]) < 1000


def test_bodies_over_the_limit_answer_413_declared_or_streamed(http):
    declared = http.post("/align", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert assert_error(declared, 413)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(10):
            yield b"x" * 1000

    streamed = http.post("/align", content=chunks(), headers={"content-type": "application/json"})
    assert assert_error(streamed, 413)["code"] == "payload_too_large"


def test_error_responses_carry_the_request_id_and_no_internals(http, server):
    supplied = http.post("/align", json={**SHORT, "chains": 99}, headers={"X-Request-ID": "trace-1234"})
    assert supplied.headers["x-request-id"] == "trace-1234"
    forged = http.post("/align", json={**SHORT, "chains": 99}, headers={"X-Request-ID": "x" * 500})
    assert forged.headers["x-request-id"] != "x" * 500 and len(forged.headers["x-request-id"]) == 32
    responses = [
        httpx.post(server.url + "/align", json=SHORT),  # 401
        http.post("/align", content=b"x" * 5000),  # 413
        http.post("/align", json={**SHORT, "steps": "2"}),  # 422
        http.get("/jobs/job-nope"),  # 404
        http.delete("/metrics"),  # 405
    ]
    unauthorized = httpx.get(server.url + "/v1/models/sea")  # answered before routing: labelled by the route's template
    assert unauthorized.status_code == 401
    assert 'sea_requests_total{method="GET",route="/v1/models/{model}",status="401"}' in http.get("/metrics").text
    for response in responses:
        error = assert_error(response, response.status_code)
        assert "Traceback" not in response.text and 'File "' not in response.text
        assert error["message"]
    assert responses[-1].headers["allow"] == "GET, HEAD"
    assert http.request("OPTIONS", "/jobs/job-nope").headers["allow"] == "DELETE, GET"
    assert http.post("/static/playground.js").headers["allow"] == "GET, HEAD"  # the mount's own (it was empty)
    served = http.get("/v1/models", headers={"X-Request-ID": "trace-5678"})
    probe = http.get("/health", headers={"X-Request-ID": "probe-5678"})
    log = server.log_path.read_text()
    assert f"request {supplied.headers['x-request-id']} POST /align -> 422 chains must be at most 8" in log
    # One line per request, with its id (uvicorn's access log, which had none, is off); probes only at debug level.
    assert served.status_code == probe.status_code == 200 and log.count("trace-5678") == 1
    assert re.search(r"request trace-5678 GET /v1/models -> 200 \(\d+ ms\)", log) and "probe-5678" not in log
    assert "HTTP/1.1\" 4" not in log  # no access-log line ("GET /jobs/job-nope HTTP/1.1" 404)


def test_a_client_that_leaves_while_sending_its_body_counts_as_499_not_400(http, server):
    """It was logged and counted as the client's bad request (400 "There was an error parsing the body")."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("POST /align HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                      f"Authorization: {AUTH['Authorization']}\r\n\r\n").encode() + b'{"prompt": "hi')
    wait_for(lambda: "-> 499 the client closed the connection while sending the body" in server.log_path.read_text(), 30)
    text = http.get("/metrics").text
    assert 'sea_requests_total{method="POST",route="/align",status="499"}' in text
    assert 'sea_requests_total{method="POST",route="/align",status="400"}' not in text


def test_a_full_queue_answers_429_with_retry_after(http):
    running = http.post("/jobs", json=LONG).json()["id"]
    wait_for(lambda: http.get(f"/jobs/{running}").json()["status"] == "running", 60)
    queued = [http.post("/jobs", json=LONG).json()["id"] for _ in range(2)]  # max_queue=2: both wait
    assert [http.get(f"/jobs/{job}").json()["position"] for job in queued] == [0, 1]
    for response in (http.post("/align", json=SHORT), http.post("/jobs", json=SHORT),
                     http.post("/v1/completions", json={"model": "sea", "prompt": "hi", "max_tokens": 2})):
        assert assert_error(response, 429, "rate_limit_error")["code"] == "rate_limit_exceeded"  # as OpenAI's
        assert int(response.headers["retry-after"]) >= 1
    for job in (*queued, running):
        assert http.delete(f"/jobs/{job}").json()["status"] == "cancelled"


def test_past_the_deadline_the_client_gets_504_and_a_job_fails_with_the_reason(http):
    started = time.monotonic()
    error = assert_error(http.post("/align", json={**LONG, "timeout": 1}), 504, "timeout_error")
    assert error["message"] == "the request ran past its deadline" and time.monotonic() - started < 30  # deadline 1 s, plus slack for a loaded machine
    assert_error(http.post("/v1/chat/completions", json={"model": "sea", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
                                                         "sea": {"steps": 2000, "chains": 8, "timeout": 1}}), 504, "timeout_error")
    job = http.post("/jobs", json={**LONG, "timeout": 1}).json()["id"]
    final = wait_for(lambda: (j := http.get(f"/jobs/{job}").json())["status"] in ("failed", "succeeded") and j, 60)
    assert final["status"] == "failed" and final["error"] == "the request ran past its deadline" and final["result"] is None


def test_the_openai_client_does_not_run_a_request_past_its_deadline_again(http):
    """The official clients retry a 5xx twice by default, unless it says not to: a 504 at the request's own deadline
    ran the work three times."""
    def timeouts() -> float:
        return sum(s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples
                   if s.name == "sea_jobs_total" and s.labels["outcome"] == "timeout")

    client = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key=KEYS[0])  # max_retries: its default (2)
    before = timeouts()
    with pytest.raises(openai.InternalServerError) as late:
        client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hi"}], max_tokens=64,
                                       extra_body={"sea": {"steps": 2000, "chains": 8, "timeout": 1}})
    assert late.value.status_code == 504 and late.value.response.headers["x-should-retry"] == "false"
    assert timeouts() - before == 1


CHAT = {"model": "sea", "messages": [{"role": "user", "content": "write a story"}], "max_tokens": 64, "seed": 1,
        "sea": {"steps": 2000, "chains": 8}}


@pytest.mark.parametrize("path, body", [
    ("/align", LONG),
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"model": "sea", "prompt": "write a story", "max_tokens": 64, "stream": True, "sea": {"steps": 2000, "chains": 8}}),
], ids=["align", "chat", "chat-stream", "completions-stream"])
def test_a_client_disconnect_cancels_its_chains_and_blocks_nobody(http, server, path, body):
    sock = raw_post(server.url, path, body, AUTH)
    wait_for(lambda: gauges(server.url)["sea_chains_in_flight"] == 8, 60)
    if body.get("stream"):
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has begun
    sock.close()
    closed = time.monotonic()
    wait_for(lambda: idle(server.url), 60)  # the run had far longer to go (2000 steps)
    assert time.monotonic() - closed < 30
    quick = http.post("/align", json=SHORT, timeout=60)
    assert quick.status_code == 200


# ----- a fault inside the engine: the app under a real uvicorn in this process -------------------


class InProcessServer:
    """``create_app`` with an already built runtime, served by uvicorn in a thread (the engine can be patched)."""

    def __init__(self, app):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Prompts containing "poison" make the engine's batched step raise; "poison-start" makes ``start`` raise; "slow"
    makes each step take 0.2 s longer."""
    settings = Settings(cors_origins="https://app.example", default_steps=2, default_max_tokens=4, max_batch_chains=8)
    runtime = Runtime.from_lm(tiny_lm(), settings)
    engine = runtime.engine
    tick, start_many = engine.tick, engine.start_many

    def poisoned_tick(states):
        if any("poison" in s.job.prompt.messages[-1]["content"] for s in states):
            raise RuntimeError("secret internal detail: CUDA kernel exploded at 0xdeadbeef")
        if any("slow" in s.job.prompt.messages[-1]["content"] for s in states):
            time.sleep(0.2)  # a run that lasts while a test watches it
        return tick(states)

    def poisoned_start_many(jobs, **kwargs):  # Engine.start goes through start_many too
        if any("poison-start" in job.prompt.messages[-1]["content"] for job in jobs):
            raise ValueError("secret internal detail: bad tensor")
        return start_many(jobs, **kwargs)

    engine.tick, engine.start_many = poisoned_tick, poisoned_start_many
    server = InProcessServer(create_app(settings, runtime=runtime))
    yield server
    server.stop()


def test_an_engine_exception_fails_the_batch_with_500_and_the_service_keeps_serving(faulty, caplog):
    with caplog.at_level(logging.INFO, logger="app"), httpx.Client(base_url=faulty.url, timeout=60) as client:
        for prompt in ("poison", "poison-start"):
            response = client.post("/align", json={"prompt": prompt, "steps": 2})
            error = assert_error(response, 500, "server_error")
            request_id = response.headers["x-request-id"]
            assert error["message"] == f"internal error (request id {request_id})"
            assert "secret" not in response.text and "Traceback" not in response.text
            assert f"request {request_id} POST /align raised" in caplog.text  # the log has the id and the traceback
        assert "secret internal detail" in caplog.text
        # A job: reported failed with a generic reason.
        job = client.post("/jobs", json={"prompt": "poison", "steps": 2}).json()["id"]
        final = wait_for(lambda: (j := client.get(f"/jobs/{job}").json())["status"] != "queued" and j["status"] != "running" and j, 60)
        assert final["status"] == "failed" and final["error"] == "internal engine error"
        # The OpenAI endpoints, streaming or not.
        chat = {"model": "sea", "messages": [{"role": "user", "content": "poison"}], "max_tokens": 3}
        assert_error(client.post("/v1/chat/completions", json=chat), 500, "server_error")
        streamed = client.post("/v1/chat/completions", json={**chat, "stream": True}).text
        assert '"type": "server_error"' in streamed and "secret" not in streamed and streamed.endswith("data: [DONE]\n\n")
        # The worker is alive: readiness holds and the next requests succeed.
        assert client.get("/ready").status_code == 200
        for _ in range(3):
            assert client.post("/align", json={"prompt": "fine", "steps": 2}).status_code == 200


def test_responses_listing_log_probs_or_traces_are_built_off_the_event_loop(faulty, monkeypatch):
    """A Best-of-256's token log-probs make 18 MB of JSON, 16 chat choices' a second of building: on the event loop
    that held every other request (health checks, streams) for as long."""
    from app.api import openai, routes
    from tests.server import noting_the_event_loop

    on_loop = []
    monkeypatch.setattr(openai, "build_choices", noting_the_event_loop(openai.build_choices, on_loop))
    monkeypatch.setattr(routes, "align_response", noting_the_event_loop(routes.align_response, on_loop))
    with httpx.Client(base_url=faulty.url, timeout=60) as client:
        chat = {"model": "sea", "messages": [{"role": "user", "content": "fine"}], "max_tokens": 3, "logprobs": True}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert "top_logprobs" in client.post("/v1/chat/completions", json={**chat, "stream": True}).text
        for asked in ({"logprobs": 1}, {"return_trace": True}):
            assert client.post("/align", json={"prompt": "fine", "steps": 2, **asked}).status_code == 200
        job = client.post("/jobs", json={"prompt": "fine", "steps": 2, "logprobs": 1}).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "succeeded", 60)
        assert on_loop and not any(on_loop)
        plain = client.post("/v1/chat/completions", json={**chat, "logprobs": False})
        assert plain.status_code == 200 and plain.json()["choices"][0]["logprobs"] is None
        assert on_loop[-1]  # a small answer is built where it is served


def test_cors_on_a_real_server_for_configured_origins(faulty, caplog):
    allowed = httpx.get(faulty.url + "/health", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in httpx.get(faulty.url + "/health", headers={"Origin": "https://evil.example"}).headers
    # A 500 carries the CORS headers too (it was made outside CORS, so a browser client could not read it)
    failed = httpx.post(faulty.url + "/align", json={"prompt": "poison", "steps": 2}, headers={"Origin": "https://app.example"}, timeout=60)
    assert_error(failed, 500, "server_error")
    assert failed.headers["access-control-allow-origin"] == "https://app.example"
    # A refused preflight answers in the error body (it was plain text)
    with caplog.at_level(logging.INFO, logger="app"):
        refused = httpx.options(faulty.url + "/align", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert assert_error(refused, 400, "invalid_request_error")["message"] == "Disallowed CORS origin"
        logged = f"request {refused.headers['x-request-id']} OPTIONS /align -> 400 Disallowed CORS origin"  # it had no reason
        wait_for(lambda: logged in caplog.text, 10)  # written once the response is sent


# ----- graceful shutdown on SIGTERM ---------------------------------------------------------------


def test_sigterm_drains_accepted_work_within_the_grace_period_and_exits_zero(model_folder, tmp_path):
    """Work that fits the grace period finishes, work that cannot is reported failed, and the exit status is 0.

    uvicorn closes the listening socket at once, so jobs cannot be polled afterwards: every job's final status is
    in the log (the drain also lists the jobs it waited for), and the blocking requests get their answers over
    their still-open connections.
    """
    drain = 6.0
    proc = ServerProcess(str(model_folder), tmp_path / "server.log", drain_seconds=drain, max_batch_chains=32, max_steps=5000)
    proc.wait_ready()
    answers = {}

    def blocking(name: str, body: dict) -> None:
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            answers[name] = client.post("/align", json=body)

    # Work that cannot finish in the grace period: a job and a blocking request, both running. Small rows keep each
    # batched step short, so that the work that fits does fit on a slow machine too.
    endless_body = {**LONG, "chains": 2, "max_tokens": 8, "steps": 5000, "update": "logits"}  # runs every step
    endless = httpx.post(proc.url + "/jobs", json=endless_body).json()["id"]
    too_long = threading.Thread(target=blocking, args=("too-long", {**endless_body, "seed": 2}))
    too_long.start()
    wait_for(lambda: gauges(proc.url)["sea_chains_in_flight"] == 4, 60)
    # Work that fits: short jobs and a short blocking request, queued or running when the signal comes.
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        quick = [client.post("/jobs", json={**SHORT, "steps": 10, "seed": i}).json()["id"] for i in range(3)]
    fits = threading.Thread(target=blocking, args=("fits", {**SHORT, "steps": 10}))
    fits.start()
    streamed, listening = {}, threading.Event()

    def listen(job: str) -> None:  # a job's event stream, open across the signal, ends with the job's result
        streamed[job] = []
        with httpx.Client(base_url=proc.url, timeout=60) as client, connect_sse(client, "GET", f"/jobs/{job}/events") as source:
            for event in source.iter_sse():
                listening.set()
                if event.event == "result":
                    streamed[job].append(json.loads(event.data)["status"])

    listener = threading.Thread(target=listen, args=(endless,))
    listener.start()
    assert listening.wait(30)
    # The signal must come after the server accepted that request: the engine has then taken all six requests.
    wait_for(lambda: gauges(proc.url)["sea_queue_wait_seconds_count"] >= 6, 30)
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    try:
        ready = httpx.get(proc.url + "/ready", timeout=2).status_code
    except httpx.TransportError:
        ready = "closed"
    assert ready in (503, "closed")
    assert proc.process.wait(drain + 60) == 0
    elapsed = time.monotonic() - signalled
    for thread in (too_long, fits, listener):
        thread.join(60)
    assert streamed == {endless: ["failed"]}  # the drain's end, not the signal, closed its stream (sse-starlette did)
    assert answers["fits"].status_code == 200
    assert_error(answers["too-long"], 503, "overloaded_error")
    assert answers["too-long"].json()["error"]["message"] == "the service shut down before the job could finish"
    # It waited for the grace period; that it did not wait for the endless work is the 503 above (how long the process
    # then takes to stop is the machine's business, so there is no upper bound on the clock).
    assert elapsed > drain - 0.5
    log = proc.log_path.read_text()
    for job in quick:
        assert f"job {job} succeeded" in log
    assert f"job {endless} failed: the service shut down before the job could finish" in log
    assert f"drained job {endless}: failed (the service shut down before the job could finish)" in log
    assert "drained job" in log and ": succeeded" in log.split("draining:", 1)[1]  # some work finished during the drain
    assert proc.stop() == 0


def test_one_job_serves_at_most_eight_event_streams_at_once(faulty):
    """Every open `/jobs/{id}/events` stream serialises each step event on the event loop, and nothing bounded how
    many one job served: a ninth answers 429 with Retry-After (and the next); closing one frees its place."""
    from app.api.routes import MAX_STREAMS_PER_JOB

    with httpx.Client(base_url=faulty.url, timeout=60) as client:
        job_id = client.post("/jobs", json={"prompt": "slow", "steps": 200}).json()["id"]
        job = faulty.server.config.app.state.service.store.get(job_id)
        with contextlib.ExitStack() as streams:
            opened = [streams.enter_context(client.stream("GET", f"/jobs/{job_id}/events")) for _ in range(MAX_STREAMS_PER_JOB)]
            assert all(stream.status_code == 200 for stream in opened)
            wait_for(lambda: job.subscribers == MAX_STREAMS_PER_JOB, 30)
            for _ in range(2):
                refused = client.get(f"/jobs/{job_id}/events")
                assert_error(refused, 429, "rate_limit_error")
                assert refused.headers["retry-after"] == "5" and "8 event streams open" in refused.json()["error"]["message"]
            opened[0].close()
            wait_for(lambda: job.subscribers == MAX_STREAMS_PER_JOB - 1, 30)
            with client.stream("GET", f"/jobs/{job_id}/events") as again:
                assert again.status_code == 200
                assert next(again.iter_lines()).startswith("event: step")
        assert client.delete(f"/jobs/{job_id}").status_code == 200


def test_event_streams_that_pass_the_limit_together_are_held_to_it_when_they_subscribe():
    """The check runs when a request arrives, the subscription when its stream starts: streams that all arrived before
    any started passed the check together. The ones past the limit end with an `error` event naming it."""
    from starlette.requests import Request

    from app.api.routes import MAX_STREAMS_PER_JOB, job_events

    async def scenario():
        service = await make_service(FakeEngine(tick_seconds=0.05))
        job = await submit(service, "hi", steps=200)
        request = Request({"type": "http", "method": "GET", "path": f"/jobs/{job.id}/events", "headers": [], "state": {}})
        responses = [await job_events(job.id, request, service) for _ in range(MAX_STREAMS_PER_JOB + 2)]  # none started
        firsts = [await anext(response.body_iterator) for response in responses]
        subscribed = job.subscribers
        for response in responses:
            await response.body_iterator.aclose()
        service.cancel(job)
        await service.shutdown()
        return firsts, subscribed

    firsts, subscribed = asyncio.run(scenario())
    assert subscribed == MAX_STREAMS_PER_JOB
    assert [first["event"] for first in firsts] == ["step"] * MAX_STREAMS_PER_JOB + ["error"] * 2
    error = json.loads(firsts[-1]["data"])["error"]
    assert error["type"] == "rate_limit_error" and "8 event streams open" in error["message"]
