"""The OpenAI chat-completions dialect: request parsing, response and chunk shapes, errors.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. A client's
mistake is a 4xx naming the field; nothing here puts a filesystem path or a traceback in
a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any, Mapping
from urllib.parse import quote

from starlette.responses import JSONResponse

from ..backend import GenerationParams
from ..errors import (BackendError, CapabilityError, ContextLengthError, FetchError, PoolError,
                      QueueFull, RoutingError, UpstreamError, UpstreamUnavailable)
from ..types import AudioInput, ChatRequest, ImageInput, RouteDecision

AUTO_MODEL = "auto"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param,
                       "code": self.code}},
            status_code=self.status, headers=self.headers)


def _shutting_down() -> "ApiError":
    return ApiError(503, "the server is shutting down; the answer was stopped",
                    code="server_shutting_down", headers={"retry-after": "5"})


def error_for(exc: BaseException) -> ApiError:
    """The status and code for an exception raised while routing, loading or generating.

    Messages of errors about files (fetching, presence) name the model, never its path.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", type="rate_limit_error",
                        headers={"retry-after": "1"})
    if isinstance(exc, PoolError):
        return ApiError(503, str(exc), code="model_unavailable", type="server_error",
                        headers={"retry-after": "5"})
    if isinstance(exc, FetchError):
        model = getattr(exc, "model", None)
        return ApiError(503, "the model's files are missing and could not be fetched"
                        + (f" ({model!r})" if model else "") + "; see the server log",
                        code="model_unavailable", type="server_error")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, UpstreamError):  # a remote endpoint's 4xx, passed through
        return ApiError(exc.status, str(exc), code=exc.code,
                        type="rate_limit_error" if exc.status == 429 else None)
    if isinstance(exc, UpstreamUnavailable):
        retry = {"retry-after": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
        return ApiError(exc.status, str(exc), headers=retry,
                        code="upstream_timeout" if exc.status == 504 else "upstream_unavailable")
    if isinstance(exc, BackendError):
        return ApiError(502, str(exc), code="backend_error")
    if isinstance(exc, CapabilityError):
        return ApiError(400, str(exc), code="unsupported_modality", param="messages")
    if isinstance(exc, RoutingError):
        return ApiError(500, str(exc), code="routing_error")
    return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error")


# -- request parsing ---------------------------------------------------------------------


class ParsedChat:
    """A checked chat-completions body."""

    __slots__ = ("model", "request", "params", "stream", "include_usage")

    def __init__(self, model: str, request: ChatRequest, params: GenerationParams,
                 stream: bool, include_usage: bool):
        self.model = model
        self.request = request
        self.params = params
        self.stream = stream
        self.include_usage = include_usage


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, code="invalid_value", param=param)


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _invalid(f"{key} must be a number between {low:g} and {high:g}, got {value!r}", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise _invalid(f"{key} must be an integer{bound}, got {value!r}", key)
    return value


def decode_data_uri(url: str, param: str) -> tuple[bytes, str]:
    """``data:image/png;base64,...`` -> (bytes, mime). Anything else is refused."""
    if not url.startswith("data:"):
        raise ApiError(400, f"{param}: only data: URIs are accepted over HTTP (got "
                       f"{url[:40]!r}); local paths and remote URLs are refused",
                       code="invalid_image_url", param=param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: the data: URI must be base64 "
                       "(data:<mime>;base64,<data>)", code="invalid_image_url", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the data: URI is not valid base64",
                       code="invalid_image_url", param=param) from None
    return data, header.removesuffix(";base64") or "application/octet-stream"


def _message(raw: Any, index: int, images: list[ImageInput],
             audio: list[AudioInput]) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise _invalid(f"{param} must be an object with role and content", param)
    role = raw.get("role")
    if role not in ROLES:
        raise _invalid(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}",
                       f"{param}.role")
    content = raw.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content}
    if not isinstance(content, list):
        raise _invalid(f"{param}.content must be a string or a list of content parts",
                       f"{param}.content")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            if not isinstance(url, str):
                raise _invalid(f"{where}.image_url.url must be a string", where)
            data, mime = decode_data_uri(url, f"{where}.image_url.url")
            images.append(ImageInput(data=data, mime=mime, source=f"{where} (data: URI)"))
        elif kind == "input_audio":
            spec = part.get("input_audio")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
                raise _invalid(f"{where}.input_audio must have base64 data", where)
            try:
                data = base64.b64decode(spec["data"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{where}.input_audio.data is not valid base64",
                               code="invalid_audio", param=where) from None
            audio.append(AudioInput(data=data, mime=f"audio/{spec.get('format') or 'wav'}",
                                    source=f"{where} (input_audio)"))
        else:
            raise _invalid(f"{where}: unsupported content part {kind!r} (text, image_url "
                           "with a data: URI, input_audio)", where)
    return {"role": ROLES[role], "content": "\n".join(texts)}


def parse_chat_body(body: Any) -> ParsedChat:
    """Check an OpenAI chat-completions body; raise ApiError 422 naming the bad field."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the body must be a JSON object", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model is required: a configured model name or \"auto\"", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("messages must be a non-empty list", "messages")
    images: list[ImageInput] = []
    audio: list[AudioInput] = []
    messages = tuple(_message(m, i, images, audio) for i, m in enumerate(raw_messages))
    if len(audio) > 1:
        raise _invalid("at most one input_audio part per request", "messages")
    if _integer(body, "n", low=1) not in (None, 1):
        raise _invalid("n must be 1: one choice per request", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _invalid("stream_options must be an object", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif stop == "" or (isinstance(stop, list) and "" in stop):
        raise _invalid("stop strings must not be empty", "stop")
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _invalid("stop must be a string or a list of up to 4 strings", "stop")
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=0.7 if temperature is None else temperature,
        seed=_integer(body, "seed"),
        stop=stops,
        top_p=0.95 if top_p is None else top_p,
    )
    request = ChatRequest(messages=messages, images=tuple(images),
                          audio=audio[0] if audio else None)
    return ParsedChat(model, request, params, stream, bool(options.get("include_usage")))


def header_value(text: str) -> str:
    """HTTP headers are latin-1: keep printable ASCII, percent-encode the rest (UTF-8)."""
    return quote(text, safe="".join(chr(c) for c in range(32, 127) if chr(c) != "%"))


class _Meta:
    """What every chunk of one answer shares."""

    def __init__(self, decision: RouteDecision):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = decision.model

    def base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None}

    def sse(self, data: Mapping[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(self, delta: Mapping[str, Any], finish_reason: str | None = None) -> str:
        return self.sse({**self.base(), "choices": [
            {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}]})


def _usage(completion) -> dict[str, int]:
    usage = completion.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


