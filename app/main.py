"""The FastAPI application: lifespan (model loading, worker, drain), middleware, routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from app.api import openai as openai_routes
from app.api.errors import error_body, install_error_handlers, validation_response
from app.api.routes import install_routes
from app.runtime import Runtime
from app.service.metrics import Metrics
from app.service.service import AlignService
from app.settings import Settings

log = logging.getLogger("app")


class BodySizeLimit:
    """Pure ASGI middleware: 413 for bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        response = JSONResponse(error_body(f"the request body is over {self.limit} bytes", "invalid_request_error", code="payload_too_large"),
                                status_code=413)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. Without ``runtime`` the configured models load in the background after start-up."""
    settings = settings or Settings()
    metrics = Metrics()
    service = AlignService(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        loader = None
        if runtime is not None:
            service.attach(runtime, loop)
        else:
            async def load() -> None:
                started = time.perf_counter()
                log.info("loading models (%s)", settings.model or "embedded SmolLM2-135M-Instruct")
                try:
                    loaded = await asyncio.to_thread(Runtime.load, settings)
                except Exception:
                    log.exception("model loading failed; /ready stays 503")
                    return
                service.attach(loaded, loop)
                log.info("models ready in %.1f s; serving", time.perf_counter() - started)

            loader = asyncio.create_task(load())
        reaper = asyncio.create_task(_expire_jobs(service))
        try:
            yield
        finally:
            reaper.cancel()
            if loader is not None and not loader.done():
                loader.cancel()
            await service.shutdown()

    app = FastAPI(
        title="sea-serve",
        version="0.1.0",
        summary="Inference-time alignment with Simple Energy Adaptation (Langevin sampling over token logits).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # OpenAI clients expect 400 for bad parameters; our own endpoints answer 422.
        return validation_response(exc, 400 if request.url.path.startswith("/v1/") else 422)

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        response.headers["X-Request-ID"] = request_id
        return response

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    install_routes(app, settings)
    app.include_router(openai_routes.router)
    return app


async def _expire_jobs(service: AlignService) -> None:
    while True:
        await asyncio.sleep(min(30.0, service.settings.job_ttl_seconds / 2))
        service.store.expire()
