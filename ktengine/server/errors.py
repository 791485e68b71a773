"""OpenAI-shaped error answers: `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

import orjson
from aiohttp import web

# HTTP status -> the OpenAI error type a client library maps it to.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client; raised anywhere inside a handler."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(error_body(status, message, param, code)),
                        content_type="application/json")
