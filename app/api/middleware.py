"""Pure ASGI middleware at the edge: request ids, metrics and last-resort errors; API keys; the body size limit.

Order, outermost first: ``RequestContext`` → CORS (when configured) → ``ServerErrors`` → ``ApiKeyAuth`` →
``BodySizeLimit`` → routes. ``RequestContext`` is outermost so that every response, a 401, a 413 or a 500 included,
carries ``X-Request-ID`` and is counted; a 500 is made inside CORS, so a browser can read it; authentication runs
before the body is read, so an unauthenticated client learns nothing about body limits or JSON syntax.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import compile_path

from app.api.errors import error_body, note_error
from app.service.metrics import Metrics

log = logging.getLogger("app.requests")

# A client's X-Request-ID is kept only when it is short and plain, so that it cannot forge log lines.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _printable(text: str) -> str:
    """``text`` with control characters escaped (messages may quote client input, e.g. a job id or a field name)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _logged_path(scope, most: int = 500) -> str:
    """The path as sent (percent-encoded): a client cannot put a line break or a terminal escape into the log, nor
    more than ``most`` characters of it."""
    path = scope.get("raw_path", b"").decode("ascii", "backslashreplace") or _printable(scope["path"])
    return path if len(path) <= most else path[:most] + f"… ({len(path)} characters)"


def bearer_key_valid(authorization: str | None, keys: list[bytes]) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <one of keys>``.

    Keys are compared as SHA-256 digests with ``hmac.compare_digest``, against every key, so the time taken
    depends neither on where a guess differs nor on which key matched nor on the key lengths.
    """
    scheme, _, token = (authorization or "").partition(" ")
    # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent (UTF-8 keys match).
    digest = hashlib.sha256(token.strip().encode("latin-1", "replace")).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key).digest())
    return scheme.lower() == "bearer" and matched


def client_of(authorization: str) -> str:
    """Who holds the key of a valid ``Authorization`` header, for the jobs they own: a digest, never the key."""
    token = authorization.partition(" ")[2].strip().encode("latin-1", "replace")
    return hashlib.sha256(b"sea-serve client\0" + token).hexdigest()[:32]


async def _send_error(scope, send, status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> None:
    note_error(scope, message)
    response = JSONResponse(error_body(message, type_, code=code), status_code=status, headers=headers)
    await response({"type": "http"}, None, send)


QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})


class RequestContext:
    """Request id (``X-Request-ID`` in and out), request metrics and one log line per request (outermost): uvicorn's
    access log is off (``sea serve``), so each request is logged once, with its id, and an error with its reason."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        self._paths: list[tuple[re.Pattern, str]] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        path = _logged_path(scope)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = self._route(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"  # any token is a method: bound the label
            self.metrics.requests.labels(method, route, str(status)).inc()
            seconds = time.perf_counter() - started
            self.metrics.request_seconds.labels(route, str(status)).observe(seconds)
            milliseconds = 1000 * seconds
            if status >= 400:
                reason = _printable(state.get("error_message", ""))[:1000]
                log.log(logging.WARNING if status >= 500 else logging.INFO, "request %s %s %s -> %d %s (%.0f ms)",
                        request_id, scope["method"], path, status, reason, milliseconds)
            else:  # probes and scrapes come every few seconds: at debug level
                log.log(logging.DEBUG if route in QUIET_ROUTES else logging.INFO, "request %s %s %s -> %d (%.0f ms)",
                        request_id, scope["method"], path, status, milliseconds)

    def _route(self, scope) -> str:
        """The route's path template as the metrics label (``/v1/models/{model}``, however the route spells its
        parameters). A request the router did not label (a 401 or a 413 from the middleware below, the OpenAPI
        document, a static file) is matched against the documented paths and the app's own routes; anything else is
        ``other`` (bounded labels)."""
        route = scope.get("route")  # FastAPI's routes put themselves here
        if route is not None:
            return getattr(route, "path_format", None) or getattr(route, "path", "other")
        if self._paths is None:
            app = scope.get("app")
            documented = [compile_path(path)[:2] for path in app.openapi()["paths"]] if app is not None else []
            own = [(route.path_regex, route.path_format) for route in getattr(app, "routes", []) if hasattr(route, "path_regex")]
            self._paths = documented + own
        return next((path for pattern, path in self._paths if pattern.match(scope["path"])), "other")


class ServerErrors:
    """A 500 with the error body for any uncaught exception, inside CORS so that a browser client can read it too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response_started = False

        async def tracked(message):
            nonlocal response_started
            response_started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            # Never the exception text: the client gets the request id, the log gets the traceback.
            request_id = scope.get("state", {}).get("request_id", "-")
            log.exception("request %s %s %s raised", request_id, scope["method"], _logged_path(scope))
            if not response_started:
                await _send_error(scope, send, 500, f"internal error (request id {request_id})", "server_error")


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the error body every other error has (not plain text)."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return _RefusedPreflight(bytes(response.body).decode(), headers)


class _RefusedPreflight(JSONResponse):
    """A refused preflight that leaves its reason for the request's log line (``RequestContext``)."""

    def __init__(self, message: str, headers: dict[str, str]):
        super().__init__(error_body(message, "invalid_request_error"), status_code=400, headers=headers)
        self.message = message

    async def __call__(self, scope, receive, send) -> None:
        note_error(scope, self.message)
        await super().__call__(scope, receive, send)


class ApiKeyAuth:
    """401 with the OpenAI error body unless ``Authorization: Bearer <key>`` names a configured key.

    Deny by default: only the exact paths in ``public`` and those under ``public_prefixes`` (a mount, so routing
    sends them nowhere else) are let through without a key, so a route added later is guarded from the start.
    """

    def __init__(self, app, keys: list[bytes], public: frozenset[str], public_prefixes: tuple[str, ...] = ()):
        self.app = app
        self.keys = keys
        self.public = public
        self.public_prefixes = public_prefixes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or path in self.public or path.startswith(self.public_prefixes):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        authorization = header.decode("latin-1") if header else None
        if not bearer_key_valid(authorization, self.keys):
            return await _send_error(scope, send, 401, "missing or invalid API key", "authentication_error", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
        scope.setdefault("state", {})["client"] = client_of(authorization)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for bodies over ``limit`` bytes, whether declared (Content-Length) or streamed (chunked); 415 for a
    compressed body (its JSON would be read from the compressed bytes: "not valid JSON")."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, send)
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        has_body = (declared is not None and declared != b"0") or b"transfer-encoding" in headers
        if has_body and encoding not in ("identity", ""):
            return await _send_error(scope, send, 415, f"compressed bodies are not accepted (Content-Encoding: {_printable(encoding)[:40]})",
                                     "invalid_request_error", code="unsupported_media_type")
        seen = 0
        too_large = False
        started = False

        async def counted_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            # Once the body is known to be too large, whatever the app answers (FastAPI turns the
            # exception into a 400) is dropped in favour of the 413.
            nonlocal started
            if too_large and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        if too_large and not started:
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        await _send_error(scope, send, 413, f"the request body is over {self.limit} bytes", "invalid_request_error", code="payload_too_large")


class _TooLarge(Exception):
    pass
