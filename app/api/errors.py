"""The handlers that map every error to its status code and the OpenAI error body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.errors import APIError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def _invalid_status(request: Request) -> int:
    """OpenAI clients expect 400 for a bad request body or parameter (its SDK raises one error class for all of them,
    ``BadRequestError``); our own endpoints answer 422."""
    return 400 if request.url.path.startswith("/v1/") else 422


def validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The first validation error, naming the field (``param``) as a dotted path."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    if first.get("type") == "json_invalid":
        return _malformed_body(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if tuple(first.get("loc", ())) == ("body",) and media_type and not (media_type == "application/json" or media_type.endswith("+json")):
        # FastAPI reads a body it was not told is JSON as raw bytes and then calls it "not a valid dictionary"
        message = f"the body must be JSON, sent with `Content-Type: application/json` (got {media_type})"
        note_error(request.scope, message)
        return JSONResponse(error_body(message, "invalid_request_error", None, "unsupported_media_type"), status_code=415)
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    note_error(request.scope, message)
    return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), status_code=_invalid_status(request))


def _malformed_body(request: Request) -> JSONResponse:
    message = "the body is not valid JSON (UTF-8)"
    note_error(request.scope, message)
    return JSONResponse(error_body(message, "invalid_request_error", None, "json_invalid"), status_code=_invalid_status(request))


def note_error(scope: dict, message: str) -> None:
    """Keep the reason of an error response for the one log line ``RequestContext`` writes with the request id."""
    scope.setdefault("state", {})["error_message"] = message


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves on this path (Starlette's own 405 names only the first route's: GET, not DELETE)."""
    methods = [method for method in HTTP_METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes)]
    return ", ".join(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        note_error(request.scope, exc.message)
        status = _invalid_status(request) if exc.status == 422 else exc.status  # a limit is a bad parameter to OpenAI clients
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return _malformed_body(request)  # FastAPI's "error parsing the body": the same answer as a JSON syntax error
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        note_error(request.scope, str(exc.detail))
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", _request_id(request))
        return JSONResponse(
            error_body(f"internal error (request id {_request_id(request)})", "server_error"), status_code=500
        )
