"""The FastAPI application: lifespan (model loading, worker, drain), middleware, routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

from fastapi import FastAPI

from app.api import openai as openai_routes
from app.api import responses as responses_routes
from app.api.docs import DOCS_ASSETS, assets_folder, install_docs
from app.api.errors import install_error_handlers
from app.api.middleware import ApiKeyAuth, BodySizeLimit, JsonCORSMiddleware, RequestContext, ServerErrors
from app.api.playground import install_playground
from app.api.routes import install_routes, public_paths
from app.api.schemas import document_limits
from app.runtime import Runtime
from app.service.metrics import Metrics
from app.service.service import LOAD_FAILED, START_FAILED, AlignService
from app.settings import Settings

log = logging.getLogger("app")

# Pages that hold no data (the interactive docs, the OpenAPI document, the playground, the assets of both) load
# without an API key, so that a browser can open them; every API operation behind them still needs the key.
PUBLIC_PAGES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/", "/playground"})


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
            await service.attach(runtime, loop)
        else:
            loader = asyncio.create_task(_load_models(service, loop, app.state.api_keys))
        reaper = asyncio.create_task(_expire_jobs(service))
        try:
            yield
        finally:
            reaper.cancel()
            if loader is not None and not loader.done():
                loader.cancel()
            await service.shutdown()

    docs_assets = assets_folder()
    if docs_assets is None:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their scripts from a CDN")
    offline_docs = {"docs_url": None, "redoc_url": None} if docs_assets else {}
    app = FastAPI(
        title="sea-serve",
        version="0.1.0",
        summary="Inference-time alignment with Simple Energy Adaptation (Langevin sampling over token logits).",
        lifespan=lifespan,
        **offline_docs,
    )
    app.state.service = service
    _document_limits(app, settings)
    app.state.api_keys = settings.load_api_keys()
    install_error_handlers(app)

    # add_middleware wraps what was added before: BodySizeLimit is innermost, RequestContext outermost (middleware.py).
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=app.state.api_keys, public=public_paths(settings) | PUBLIC_PAGES,
                       public_prefixes=("/static/", f"{DOCS_ASSETS}/"))
    app.add_middleware(ServerErrors)
    if settings.cors_origins:
        app.add_middleware(JsonCORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContext, metrics=metrics)
    install_routes(app, settings)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    install_playground(app)
    if docs_assets:
        install_docs(app, docs_assets)
    return app


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Build the OpenAPI document once, with this server's limits in it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = document_limits(build(), settings)
            # FastAPI declares a 422 of its own shape on every route with parameters; ours answer with the error body
            # (declared where a route can answer 422), and /v1 answers 400 instead.
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    schema_ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
                    if schema_ref.endswith("/HTTPValidationError"):
                        del responses["422"]
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _load_models(service: AlignService, loop: asyncio.AbstractEventLoop, api_keys) -> None:
    """Load the configured models off the event loop and start serving them; a failure is logged and leaves
    /health and /ready answering 503."""
    settings = service.settings
    started = time.perf_counter()
    log.info("loading models (%s)", settings.model or "embedded SmolLM2-135M-Instruct")
    try:
        loaded = await asyncio.to_thread(Runtime.load, settings)
    except Exception:
        log.exception("model loading failed; /health and /ready answer 503 until a restart")
        service.load_error = LOAD_FAILED
        return
    try:
        await service.attach(loaded, loop)
    except Exception:
        log.exception("could not start serving; /health and /ready answer 503 until a restart")
        service.load_error = START_FAILED
        return
    # The models and libraries are millions of long-lived objects: move them out of the collector's sight, so that
    # full collections (which hold the GIL) stay short while serving and at exit.
    gc.collect()
    gc.freeze()
    log.info("models ready in %.1f s; serving (%s)", time.perf_counter() - started,
             f"API keys: {len(api_keys)}" if api_keys else "API keys: none, the API is open")


async def _expire_jobs(service: AlignService) -> None:
    while True:
        await asyncio.sleep(min(30.0, service.settings.job_ttl_seconds / 2))
        service.store.expire()
