"""Thin routes: /align, the job API with Server-Sent Events, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from app.api.errors import error_body
from app.api.middleware import bearer_key_valid
from app.api.outputs import AlignResponse, ErrorResponse, JobCreated, JobOut
from app.api.schemas import AlignRequest, LimitError, SEAParams
from app.engine.types import SEAConfig
from app.errors import ServiceBroken, ServiceUnavailable, TooManyRequests, Unauthorized, Unprocessable
from app.service.jobs import Job
from app.service.service import AlignService

ERROR_MEANINGS = {
    400: "A malformed body, or an invalid, unsupported or over-the-limit parameter (named in `param`).",
    401: "Missing or invalid API key (only when the server has keys).",
    404: "No such job: unknown, or expired after SEA_JOB_TTL_SECONDS.",
    413: "The body is over SEA_MAX_BODY_BYTES.",
    415: "The body is not sent as JSON (`Content-Type: application/json`), or is compressed (`Content-Encoding`).",
    422: "A malformed body, or an invalid or over-the-limit parameter (named in `param`).",
    429: "The queue is full.",
    499: "The client closed the connection before the job finished; the job was cancelled.",
    500: "An internal error (the message carries the request id).",
    503: "The models are still loading, the server is draining, or the shared job store is unreachable (with "
         "Retry-After); or the service cannot serve until a restart: its models failed to load or its engine stopped.",
    504: "The request's `timeout` passed before its job finished.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds until a queue slot is likely free, from the recent job rate.", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict:
    """The OpenAPI ``responses`` of the error statuses a route can answer, each with the error body."""
    return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code], **({"headers": RETRY_AFTER} if code == 429 else {})}
            for code in codes}


UNAUTHORIZED = error_responses(401)
SUBMIT_ERRORS = error_responses(401, 413, 415, 422, 429, 500, 503)  # taking a job
WAIT_ERRORS = error_responses(499, 504)  # waiting for its result in the request
JOB_ERRORS = error_responses(401, 404, 500, 503)  # reading or cancelling a job by id
MAX_STREAMS_PER_JOB = 8  # event streams one job serves at once (per replica): each serialises every step event on the loop
TOO_MANY_STREAMS = {429: {"model": ErrorResponse, "description": f"The job already has {MAX_STREAMS_PER_JOB} event streams open.",
                          "headers": {"Retry-After": {"description": "5 seconds.", "schema": {"type": "integer"}}}}}

# Declares the bearer scheme in the OpenAPI document (the docs page's "Authorize" button); the check is ours.
bearer = HTTPBearer(auto_error=False, description="An API key from SEA_API_KEYS or SEA_API_KEYS_FILE (needed only when the server sets keys).")


# Dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in a worker
# thread, and each such hop costs the event loop a thread hand-off (worse while the engine thread holds the GIL).
async def get_service(request: Request) -> AlignService:
    return request.app.state.service


async def require_api_key(request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """When API keys are configured, require ``Authorization: Bearer <key>`` (compared in constant time).

    ``ApiKeyAuth`` (app.api.middleware) already guards every path but ``public_paths``; this dependency repeats
    the check on the routers so that a route stays guarded even if it is mounted without that middleware.
    """
    keys = request.app.state.api_keys
    if keys and not bearer_key_valid(request.headers.get("authorization"), keys):
        raise Unauthorized("missing or invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def public_paths(settings) -> frozenset[str]:
    """The API paths that answer without a key: liveness, readiness and (unless SEA_METRICS_REQUIRE_KEY) metrics."""
    return frozenset({"/health", "/ready"} | (set() if settings.metrics_require_key else {"/metrics"}))


def engine_config(params: SEAParams, service: AlignService, **log_probs) -> SEAConfig:
    try:
        return params.to_config(service.settings, **log_probs)
    except LimitError as exc:
        raise Unprocessable(str(exc), param=exc.field) from None


def client_gone(request: Request):
    """A coroutine function that returns once the client has closed the connection.

    The body has been read, so the next ASGI message is the disconnect: one pending ``receive`` replaces polling
    ``request.is_disconnected()`` (each poll cancels a scope, which costs milliseconds of the event loop).
    """
    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait_for_disconnect


def client(request: Request) -> str | None:
    """The API key's holder (``ApiKeyAuth``), None without API keys: a job is readable and cancellable by its owner only."""
    return request.scope.get("state", {}).get("client")


async def submit(body: AlignRequest, request: Request, service: AlignService, **options) -> Job:
    config = engine_config(body, service)
    return await service.submit(config, body.chat(), body.reward_options(), body.timeout,
                                prompt_param="prompt" if body.messages is None else "messages", owner=client(request), **options)


def align_response(job: Job, result, with_trace: bool, service: AlignService) -> AlignResponse:
    text_of = service.runtime.text  # a job exists only once the models are loaded
    return AlignResponse.build(job.id, job.model, result, job.queue_seconds, with_trace, piece=lambda token: text_of.piece(token)[0])


T = TypeVar("T")


async def build_answer(job: Job, build: Callable[[], T], with_trace: bool = False) -> T:
    """``build()`` (``job``'s answer), in a thread when it lists token log-probs or every chain's trace (a Best-of-256's
    token log-probs make 18 MB of JSON, 16 chat choices' a second of building: time that would hold the event loop,
    which serves every other request)."""
    if with_trace or job.work.config.logprobs is not None:
        return await asyncio.to_thread(build)
    return build()


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


@public.get("/health", responses={503: {"model": ErrorResponse}},
            summary="Liveness: 200 while the process serves or loads its models; 503 if they failed to load or its engine worker stopped.")
async def health(service: AlignService = Depends(get_service)) -> dict:
    if service.broken is not None:
        raise ServiceBroken(service.broken)
    return {"status": "ok"}


@public.get("/ready", summary="Readiness: 503 while models load, while draining, while the shared job store is unreachable, or for good "
            "when the service needs a restart.", responses={503: {"model": ErrorResponse}})
async def ready(service: AlignService = Depends(get_service)) -> dict:
    if not service.ready:
        if service.broken is not None:
            raise ServiceBroken(service.broken)
        raise ServiceUnavailable(service.waiting_for, headers={"Retry-After": "5"})
    return {"status": "ready", "model": service.model_name}


# Load balancers that probe with HEAD get the same status (uvicorn sends no body); one operation each in OpenAPI.
for probe in (health, ready):
    public.add_api_route(f"/{probe.__name__}", probe, methods=["HEAD"], include_in_schema=False)


async def metrics(service: AlignService = Depends(get_service)) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@protected.post("/align", response_model=AlignResponse, responses={**SUBMIT_ERRORS, **WAIT_ERRORS}, summary="Align one prompt and wait for the result.")
async def align(body: AlignRequest, request: Request, service: AlignService = Depends(get_service)) -> Response:
    job = await submit(body, request, service)
    result = await service.wait(job, client_gone(request))
    # Serialised here (pydantic's own JSON): the response model is built and checked once, not re-validated by FastAPI.
    return Response(await build_answer(job, lambda: align_response(job, result, body.return_trace, service).model_dump_json(), body.return_trace),
                    media_type="application/json")


@protected.post("/jobs", status_code=202, response_model=JobCreated, responses=SUBMIT_ERRORS, summary="Queue an alignment job.")
async def create_job(body: AlignRequest, request: Request, response: Response, service: AlignService = Depends(get_service)) -> JobCreated:
    job = await submit(body, request, service, stream_events=True, return_trace=body.return_trace)
    location = f"/jobs/{job.id}"
    response.headers["Location"] = location
    return JobCreated(id=job.id, status=job.status.value, location=location)


async def job_json(job: Job, service: AlignService) -> str:
    """The job as ``JobOut``'s JSON (built once here: FastAPI would validate a returned model again)."""
    position = await service.position(job)

    def build() -> str:
        result = align_response(job, job.result, job.return_trace, service) if job.result is not None else None
        return JobOut(id=job.id, status=job.status.value, position=position, created=job.created, error=job.error, result=result).model_dump_json()

    return await build_answer(job, build, job.return_trace) if job.result is not None else build()


@protected.get("/jobs/{job_id}", response_model=JobOut, responses=JOB_ERRORS, summary="A job's status, queue position and result.")
async def get_job(job_id: str, request: Request, service: AlignService = Depends(get_service)) -> Response:
    return Response(await job_json(await service.get(job_id, client(request)), service), media_type="application/json")


@protected.delete("/jobs/{job_id}", response_model=JobOut, responses=JOB_ERRORS, summary="Cancel a job (its chains leave the batch at the next step).")
async def cancel_job(job_id: str, request: Request, service: AlignService = Depends(get_service)) -> Response:
    job = await service.get(job_id, client(request))
    service.cancel(job)
    await job.wait(5.0)
    return Response(await job_json(job, service), media_type="application/json")


@protected.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "`step` events (a `requeued` event when the replica running the job stopped and the job went back to the shared queue), then one `result` event (an `error` event instead, when more streams than the limit started together)."}, **JOB_ERRORS, **TOO_MANY_STREAMS},
    summary="Server-Sent Events: one `step` event per Langevin step, then a `result` event.",
)
async def job_events(job_id: str, request: Request, service: AlignService = Depends(get_service)):
    job = await service.get(job_id, client(request))
    too_many = f"job {job.id} has {MAX_STREAMS_PER_JOB} event streams open: close one, or poll GET /jobs/{job.id}"
    if job.subscribers >= MAX_STREAMS_PER_JOB:
        raise TooManyRequests(too_many, headers={"Retry-After": "5"})

    async def stream():
        past, queue = job.subscribe()
        if job.subscribers > MAX_STREAMS_PER_JOB:  # streams that passed the check together, before any subscribed
            job.unsubscribe(queue)
            yield {"event": "error", "data": json.dumps(error_body(too_many, TooManyRequests.type, code=TooManyRequests.default_code))}
            return
        try:
            pending = list(past)
            while True:
                event = pending.pop(0) if pending else await queue.get()
                if event["event"] == "end":
                    break
                yield {"event": event["event"], "data": json.dumps(event)}
            yield {"event": "result", "data": await job_json(job, service)}
        finally:
            job.unsubscribe(queue)

    # sse-starlette closes every stream at SIGTERM unless given a grace period: the streams of jobs that end during the
    # drain must carry their result (a job the drain fails ends its stream too, within the grace period).
    return EventSourceResponse(stream(), ping=15, shutdown_grace_period=service.settings.drain_seconds + 2)


def install_routes(app, settings) -> None:
    app.include_router(public)
    app.include_router(protected)
    guard = [Depends(require_api_key)] if settings.metrics_require_key else []
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=guard, summary="Prometheus metrics (text format).",
                      response_class=Response, responses={200: {"content": {"text/plain": {}}}, **(UNAUTHORIZED if guard else {})})
    app.add_api_route("/metrics", metrics, methods=["HEAD"], dependencies=guard, include_in_schema=False)  # as the probes
