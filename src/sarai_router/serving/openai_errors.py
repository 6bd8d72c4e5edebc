"""Errors in OpenAI's shape (or Ollama's, on ``/api/*``): ``ApiError`` and the mapping from
the router's exceptions to a status and code (``error_for``).

A client's mistake is a 4xx naming the field; nothing here puts a filesystem path or a
traceback in a message, and a 500 (our own bug) says only that it happened and under which
request id.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any, Mapping

from starlette.responses import JSONResponse

from ..errors import (AudioError, BackendError, CapabilityError, ContextLengthError, FetchError,
                      InvalidRequest, ModelLoadError, PoolError, QueueFull, TranscriptionTimeout,
                      UpstreamError, UpstreamUnavailable)
from ..events import REQUEST_ID
from ..types import NEED_FIELDS

#: The error shape of the request being answered: "openai" (``{"error": {...}}``) or
#: "ollama" (``{"error": "..."}``, on ``/api/*``); set by the server's outermost middleware.
DIALECT: contextvars.ContextVar[str] = contextvars.ContextVar("sarai_dialect",
                                                              default="openai")


class ApiError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        if DIALECT.get() == "ollama":
            # Ollama's shape has no code: it travels in a header of ours instead.
            return JSONResponse({"error": self.message}, status_code=self.status,
                                headers={**self.headers, "x-sarai-error-code": self.code})
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _shutting_down() -> "ApiError":
    return ApiError(503, "the server is shutting down; the answer was stopped",
                    code="server_shutting_down", headers={"retry-after": "5"})


def internal_error() -> ApiError:
    """A 500: our bug. The message is generic; the log has the details under the same id."""
    request_id = REQUEST_ID.get() or "-"
    return ApiError(500, f"internal error (request id {request_id}); the server log has the "
                    "details", code="internal_error")


# Absolute paths (POSIX or Windows) inside messages built from a backend's exceptions.
# Not a JSON pointer's tail ("#/$defs/a" names a place in the request's own schema).
_PATH = re.compile(r"(?<![\w:/.\\#-])(?:~|[A-Za-z]:)?[/\\](?:[^\s'\"()<>,;]+)")


def scrub_paths(message: str) -> str:
    """``message`` with every absolute filesystem path replaced by ``<path>``."""
    return _PATH.sub("<path>", message)


def error_for(exc: BaseException) -> ApiError:
    """The status and code for an exception raised while routing, loading or generating.

    A client's mistake is a 4xx; a model that can't be had, 503; a backend that failed,
    502; anything else is our bug: 500 with a generic message (the caller logs the
    details). Messages built from a backend's errors lose any filesystem path.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", type="rate_limit_error",
                        headers={"retry-after": "1"})
    if isinstance(exc, InvalidRequest):
        return ApiError(400, scrub_paths(str(exc)), code="invalid_value", param=exc.param)
    if isinstance(exc, AudioError):
        return ApiError(400, str(exc), code="invalid_audio", param="messages")
    if isinstance(exc, TranscriptionTimeout):
        return ApiError(504, str(exc), code="transcription_timeout", type="server_error")
    if isinstance(exc, CapabilityError):
        missing = [m for m in getattr(exc, "missing", ()) if m in NEED_FIELDS]
        if missing:
            field = NEED_FIELDS[missing[0]]
            return ApiError(400, f"{field} cannot be honoured: {exc}",
                            code="unsupported_parameter", param=field)
        return ApiError(400, str(exc), code="unsupported_modality", param="messages")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, scrub_paths(str(exc)), code="context_length_exceeded",
                        param="messages")
    if isinstance(exc, ModelLoadError):
        return ApiError(503, f"model {exc.model!r} could not be loaded (its file is missing, "
                        "unreadable or not a model, or its server did not start); the server "
                        "log says why",
                        code="model_unavailable", headers={"retry-after": "5"})
    if isinstance(exc, FetchError):
        model = getattr(exc, "model", None)
        return ApiError(503, "the model's files are missing and could not be fetched"
                        + (f" ({model!r})" if model else "") + "; see the server log",
                        code="model_unavailable", type="server_error")
    if isinstance(exc, UpstreamError):  # a remote endpoint's 4xx, passed through
        return ApiError(exc.status, scrub_paths(str(exc)), code=exc.code,
                        type="rate_limit_error" if exc.status == 429 else None)
    if isinstance(exc, UpstreamUnavailable):
        retry = {"retry-after": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
        return ApiError(exc.status, scrub_paths(str(exc)), headers=retry,
                        code="upstream_timeout" if exc.status == 504 else "upstream_unavailable")
    if isinstance(exc, PoolError):
        return ApiError(503, scrub_paths(str(exc)), code="model_unavailable",
                        type="server_error", headers={"retry-after": "5"})
    if isinstance(exc, BackendError):
        return ApiError(502, scrub_paths(str(exc)), code="backend_error")
    return internal_error()
