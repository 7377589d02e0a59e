"""The handlers that map every error to its status code and the OpenAI error body."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from app.errors import APIError, ClientClosed, NotFound

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def _invalid_status(request: Request) -> int:
    """OpenAI clients expect 400 for a bad request body or parameter (its SDK raises one error class for all of them,
    ``BadRequestError``); our own endpoints answer 422."""
    return 400 if request.url.path.startswith("/v1/") else 422


# A union member's tag in a pydantic error location ("str", "list[str]", "function-after[...]"), not a field name
_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict)$|\[")


def _is_branch(part, error: dict, index: int) -> bool:
    unknown_field = error.get("type") == "extra_forbidden" and index == len(error.get("loc", ())) - 1  # a name the client chose
    return isinstance(part, str) and not unknown_field and bool(_BRANCH.search(part))


def _reported_error(errors: list[dict]) -> dict:
    """The error to report: the first, except that of a union's branches pydantic lists each one's error, the first
    often only that the value is not of that branch's type ("Input should be a valid string" for a list of five stop
    strings): then the error of the branch whose type the value has ("at most 4 items")."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    tags = [i for i, part in enumerate(loc) if _is_branch(part, first, i)]
    if not tags or not str(first.get("type", "")).endswith("_type"):
        return first
    union = loc[: tags[0]]
    return next((e for e in errors if tuple(e.get("loc", ()))[: len(union)] == union and not str(e.get("type", "")).endswith("_type")), first)


def validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The first validation error, naming the field (``param``) as a dotted path."""
    errors = exc.errors()
    first = _reported_error(errors) if errors else {"loc": (), "msg": "invalid request"}
    loc = first.get("loc", ())
    param = ".".join(str(part) for i, part in enumerate(loc) if part != "body" and not _is_branch(part, first, i)) or None
    param = _shortened(param)  # a field name is the client's to choose: a megabyte of it is not echoed or logged
    if first.get("type") == "json_invalid":
        return _malformed_body(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if tuple(loc) == ("body",) and first.get("type") == "missing":
        message = "the request body is empty; send a JSON object"
        note_error(request.scope, message)
        return JSONResponse(error_body(message, "invalid_request_error", None, "missing"), status_code=_invalid_status(request))
    if tuple(loc) == ("body",) and not (media_type == "application/json" or media_type.endswith("+json")):
        # FastAPI reads a body it was not told is JSON (no Content-Type or another) as raw bytes and then calls it
        # "not a valid dictionary"
        message = f"the body must be JSON, sent with `Content-Type: application/json` (got {media_type or 'none'})"
        note_error(request.scope, message)
        return JSONResponse(error_body(message, "invalid_request_error", None, "unsupported_media_type"), status_code=415)
    reason = str(first.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for a ValueError raised by our validators
    message, code = (f"{param}: {reason}" if param else reason), first.get("type")
    if code == "extra_forbidden" and request.url.path.startswith("/v1/"):  # as /v1 answers the fields it knows but does not do
        message, code = f"`{param}` is not supported by this server", "unsupported_parameter"
    note_error(request.scope, message)
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=_invalid_status(request))


def _shortened(text: str | None, most: int = 200) -> str | None:
    return text if text is None or len(text) <= most else text[: most - 1] + "…"


def _malformed_body(request: Request, message: str = "the body is not valid JSON (UTF-8)") -> JSONResponse:
    note_error(request.scope, message)
    return JSONResponse(error_body(message, "invalid_request_error", None, "json_invalid"), status_code=_invalid_status(request))


def note_error(scope: dict, message: str) -> None:
    """Keep the reason of an error response for the one log line ``RequestContext`` writes with the request id."""
    scope.setdefault("state", {})["error_message"] = message


STORED_OBJECTS = ("/v1/responses/", "/v1/chat/completions/")  # OpenAI's paths of a stored response or chat completion
STORED_LIST = "/v1/chat/completions"  # GET: OpenAI's list of stored chat completions
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
        # FastAPI's "error parsing the body": the same answer as a JSON syntax error
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return _malformed_body(request)
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            return _malformed_body(request, "the body's JSON is nested too deeply")
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError) and "integer string conversion" in str(exc.__cause__):
            return _malformed_body(request, "the body's JSON holds an integer of more than 4300 digits")
        if exc.status_code == 400 and isinstance(exc.__cause__, ClientDisconnect):  # nobody reads this answer; the log and metrics do
            note_error(request.scope, "the client closed the connection while sending the body")
            return JSONResponse(error_body("the client closed the connection", ClientClosed.type), status_code=ClientClosed.status)
        status, path = exc.status_code, request.url.path
        listing = path.rstrip("/") == STORED_LIST
        if status == 405 and request.method == "GET" and listing:
            status = 404  # the client's chat.completions.list(): nothing is stored to list, as nothing is to retrieve
        message, code = str(exc.detail), NotFound.default_code if status == 404 else None
        if status == 404 and (path.startswith(STORED_OBJECTS) or listing):
            message = "this server stores no responses or completions: a request's answer is its response"
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405 and (allowed := _allowed_methods(request)):  # a mount (/static) names its own
            headers["Allow"] = allowed
        note_error(request.scope, message)
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", _request_id(request))
        return JSONResponse(
            error_body(f"internal error (request id {_request_id(request)})", "server_error"), status_code=500
        )
