"""The service's own errors: each carries its HTTP status and OpenAI error type (mapped in ``app.api.errors``)."""

from __future__ import annotations

# The official OpenAI clients retry a 5xx unless it carries this header: for failures that a retry would only repeat.
NO_RETRY = {"x-should-retry": "false"}


class APIError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"  # as OpenAI's
    default_code = "not_found"


class Unprocessable(APIError):
    status = 422
    type = "invalid_request_error"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"  # as OpenAI's


class ServiceUnavailable(APIError):
    status = 503
    type = "overloaded_error"


class ServiceBroken(ServiceUnavailable):
    """The service cannot serve until it is restarted (its models failed to load, its worker or accelerator failed):
    a server error, not an overload that waiting would end."""

    type = "server_error"


class GatewayTimeout(APIError):
    status = 504
    type = "timeout_error"


class ClientClosed(APIError):
    status = 499
    type = "cancelled"
