"""OpenAI-style error bodies, and the handlers that turn every failure into one.

Clients of the OpenAI API read ``{"error": {"message", "type", "param", "code"}}``; the official
client raises its typed exceptions from the status code and shows the message. FastAPI's own 422
validation bodies and HTML error pages never reach a client of this server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
# Seconds a client should wait before retrying (the Retry-After header): a full queue frees a slot within
# a few steps; a server that is shutting down answers nothing more, but its restart may soon.
RETRY_AFTER_S = {429: 1, 503: 5}


class APIError(Exception):
    """A failure the client should see: HTTP status, message, the request field at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """What the status asks of the client besides the body: how to authenticate, when to retry."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return retry_after(self.status)


def retry_after(status: int) -> dict[str, str]:
    """The ``Retry-After`` header for an overloaded (429) or unavailable (503) answer; none otherwise."""
    return {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else {}


def model_not_found(name: str, served: str) -> APIError:
    """A request for a model other than the one served (404, as the OpenAI API answers)."""
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model",
                    "model_not_found")


MAX_ERROR_TEXT = 300  # characters of an error's message or param: they may quote what the client sent


def printable(text: str | None) -> str | None:
    """``text`` bounded to ``MAX_ERROR_TEXT`` characters and encodable as UTF-8 (a lone surrogate
    written as its escape), so that an error body quoting a hostile request can always be sent."""
    if text is None:
        return None
    bounded = text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT - 3] + "..."
    return bounded.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable_string(value: Any, where: str = "") -> str | None:
    """Where in parsed JSON a key or string is not valid Unicode text (a lone surrogate such as
    ``"\\ud800"``, which JSON's escapes allow but no tokenizer or UTF-8 response can take), as a dotted
    path (``messages[0].content``; the key itself, escaped, when a key is at fault); None if nowhere."""
    if isinstance(value, str):
        return where if not _is_text(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
        if isinstance(key, str) and not _is_text(key):
            return printable(path)
        if (found := unencodable_string(item, path)) is not None:
            return found
    return None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object; ``type`` follows from the status so that clients classify it as OpenAI's.
    Message and param are bounded and made encodable (``printable``)."""
    message, param = printable(message), printable(param)
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                                  else "invalid_request_error"),
                      "param": param, "code": code}}


def install_error_handlers(app: FastAPI) -> None:
    """Every error path answers with an OpenAI-style body (and unexpected exceptions with a 500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(400, first.get("msg", "invalid request"), param, "invalid_value"),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(error_body(error.status_code, str(error.detail), None, code),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}", None, "internal_error"),
                            status_code=500)
