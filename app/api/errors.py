"""The handlers that map every error to its status code and the OpenAI error body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import APIError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def validation_response(exc: RequestValidationError, status: int = 422) -> JSONResponse:
    """The first validation error, naming the field (``param``) as a dotted path."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    if first.get("type") == "json_invalid":
        message = "the body is not valid JSON"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", _request_id(request))
        return JSONResponse(
            error_body(f"internal error (request id {_request_id(request)})", "server_error"), status_code=500
        )
