"""The OpenAI-compatible HTTP server: ``create_app(config)`` is an ASGI app, ``serve`` runs it.

Starlette + uvicorn. Each generation runs on its own worker thread (``streaming.Generation``)
and hands its pieces to the event loop one by one, so a streamed answer goes out token by
token and never blocks other requests. A request is admitted (or refused with a status)
before any byte of the answer is sent: the first event from the worker decides.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import signal
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .backend import BackendError, ContextLengthError, GenerationParams
from .config import Config
from .engine import CapabilityError, Engine
from .metrics import CONTENT_TYPE, Metrics
from .pool import PoolError, QueueFull
from .router import RoutingError
from .streaming import Done, Failed, Generation, Piece
from .types import AudioInput, ChatRequest, ImageInput, RouteDecision

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
API_KEY_ENV = "SARAI_ROUTER_API_KEY"
#: Paths that answer without the API key (load balancers and probes have none).
OPEN_PATHS = frozenset({"/health"})
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


class ClientGone(Exception):
    """The client hung up before its answer was complete."""


#: How often a handler waiting for tokens checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


async def _next_event(events: asyncio.Queue, request: Request):
    """The worker's next event; ClientGone if the client has disconnected.

    Tokens may arrive every few milliseconds, so the check runs on a clock, not only when
    the queue is quiet.
    """
    state = request.scope.setdefault("sarai.last_disconnect_check", [time.monotonic()])
    if not events.empty() and time.monotonic() - state[0] < DISCONNECT_POLL_SECONDS:
        return events.get_nowait()  # the common case mid-answer: no timer task per token
    while True:
        if time.monotonic() - state[0] >= DISCONNECT_POLL_SECONDS:
            state[0] = time.monotonic()
            if await request.is_disconnected():
                raise ClientGone
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            continue


def _shutting_down() -> "ApiError":
    return ApiError(503, "the server is shutting down; the answer was stopped",
                    code="server_shutting_down", headers={"retry-after": "5"})


def error_for(exc: BaseException) -> ApiError:
    """The status and code for an exception raised while routing, loading or generating."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", type="rate_limit_error",
                        headers={"retry-after": "1"})
    if isinstance(exc, PoolError):
        return ApiError(503, str(exc), code="model_unavailable", type="server_error",
                        headers={"retry-after": "5"})
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, BackendError):
        return ApiError(502, str(exc), code="backend_error")
    if isinstance(exc, CapabilityError):
        return ApiError(400, str(exc), code="unsupported_modality", param="messages")
    if isinstance(exc, RoutingError):
        return ApiError(500, str(exc), code="routing_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


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


# -- the app -------------------------------------------------------------------------------


def share_cores(config: Config) -> Config:
    """``n_threads = 0`` (all cores) becomes this server's share: cores / ``max_loaded``.

    A server runs models side by side; llama.cpp's threads spin-wait, so two generations
    that each take every core slow each other to a crawl (1 tok/s seen on 2 cores), and
    even alone all cores cost the server ~10 ms a request against ~2 ms with its share
    (docs/serving.md). A model that sets ``n_threads`` keeps it.
    """
    import attrs

    from .default_plugins.llama_cpp import default_threads

    side_by_side = max(1, min(config.cache.max_loaded, len(config.models)))
    share = max(1, default_threads() // side_by_side)
    models = {name: attrs.evolve(spec, n_threads=share) if spec.n_threads == 0 else spec
              for name, spec in config.models.items()}
    return attrs.evolve(config, models=models)


class SaraiServer:
    """The state behind the routes: one engine, its metrics, the API key."""

    def __init__(self, config: Config, *, engine: Engine | None = None, api_key: str = "",
                 ensure_file: Callable[[Config, str], None] | None = None,
                 load_pinned: bool = True):
        if engine is None:
            config = share_cores(config)
        self.config = config
        self.engine = engine or Engine(config)
        self.metrics = Metrics(self.engine.pool)
        self.api_key = api_key
        self.ensure_file = ensure_file or _ensure_file_or_fail
        self.load_pinned = load_pinned
        self.created = int(time.time())
        self._fetch_lock = threading.Lock()
        self.shutting_down = False
        # Generations still on their worker threads, stopped and joined at shutdown.
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()

    # -- lifecycle

    def startup(self) -> None:
        if self.load_pinned:
            for name, spec in self.config.models.items():
                if spec.pinned:
                    self.ensure_file(self.config, name)
            self.engine.pool.load_pinned()
        self.engine.pool.start_reaper()

    def stop_generations(self) -> None:
        """Called as soon as shutdown starts (Ctrl-C, SIGTERM): answers in flight end now,
        with an error saying so, instead of being cut off by the grace timeout.

        A generation stops between tokens; one still before its first token when the grace
        timeout cancels its handler gets the same 503 from the handler (not uvicorn's
        plain-text 500)."""
        self.shutting_down = True
        for generation in list(self._live):
            generation.cancel()

    def shutdown(self) -> None:
        # A process that exits with a generation inside llama.cpp crashes: stop them first.
        self.shutting_down = True
        live = list(self._live)
        for generation in live:
            generation.cancel()
        for generation in live:
            generation.join(timeout=30)
        self.engine.close()

    # -- helpers

    def _route(self, parsed: ParsedChat) -> RouteDecision:
        explicit = None if parsed.model == AUTO_MODEL else parsed.model
        decision = self.engine.route(parsed.request, model=explicit)
        self.engine.check_capabilities(decision, parsed.request)
        if not Path(self.config.models[decision.model].path).is_file():
            with self._fetch_lock:  # one pull at a time; the others find the file after it
                self.ensure_file(self.config, decision.model)
        try:
            self.engine.prewarm_for(parsed.request, decision)
        except Exception:  # a pre-warm is a guess: never fail the request for it
            log.exception("pre-warm failed")
        return decision

    def _headers(self, decision: RouteDecision) -> dict[str, str]:
        return {"x-sarai-model": header_value(decision.model),
                "x-sarai-route-reason": header_value(decision.reason),
                "x-sarai-route-plugin": header_value(decision.plugin)}

    def _client_gone(self, generation: Generation, decision: RouteDecision) -> Response:
        generation.cancel()
        log.info("client went away; stopped its answer from %s", decision.model)
        self.metrics.request_failed(499, "client_closed_request")
        return Response(status_code=499)  # nginx's code; nobody reads it

    def _fail(self, error: ApiError) -> JSONResponse:
        self.metrics.request_failed(error.status, error.code)
        if error.status >= 500:
            log.warning("answered %d: %s", error.status, error.message)
        return error.response()

    # -- routes

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._read_json(request)
            parsed = parse_chat_body(body)
            if parsed.model != AUTO_MODEL and parsed.model not in self.config.models:
                raise ApiError(404, f"model {parsed.model!r} is not configured (models: "
                               f"{', '.join([AUTO_MODEL, *self.config.models])})",
                               code="model_not_found", param="model")
            decision = await anyio.to_thread.run_sync(self._route, parsed)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            return self._fail(error_for(exc))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        generation = Generation(self.engine, parsed.request, decision, parsed.params, sink,
                                queue_limit=self.config.server.queue_size)
        self._live.add(generation)
        generation.start()
        try:
            first = await _next_event(events, request)
        except asyncio.CancelledError:
            generation.cancel()
            if self.shutting_down:
                return self._fail(_shutting_down())
            raise
        except ClientGone:
            return self._client_gone(generation, decision)
        if isinstance(first, Failed):
            log.debug("request failed before its first token", exc_info=first.error)
            return self._fail(error_for(first.error))
        self.metrics.request_started(decision)
        meta = _Meta(decision)
        if parsed.stream:
            return StreamingResponse(
                self._sse(first, events, generation, meta, parsed.include_usage),
                media_type="text/event-stream",
                headers={**self._headers(decision), "cache-control": "no-cache",
                         "x-accel-buffering": "no"})
        pieces: list[str] = []
        event = first
        try:
            while not isinstance(event, (Done, Failed)):
                pieces.append(event.text)
                event = await _next_event(events, request)
        except asyncio.CancelledError:  # nobody to answer: stop generating
            generation.cancel()
            if self.shutting_down:
                return self._fail(_shutting_down())
            raise
        except ClientGone:
            return self._client_gone(generation, decision)
        if isinstance(event, Failed):
            return self._fail(error_for(event.error))
        if event.cancelled:  # only shutdown cancels a generation whose client is there
            return self._fail(_shutting_down())
        completion = event.completion
        self.metrics.request_finished(completion)
        return JSONResponse({
            "id": meta.id, "object": "chat.completion", "created": meta.created,
            "model": decision.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": completion.finish_reason or "stop"}],
            "usage": _usage(completion),
            "sarai": {"route": decision.to_dict(), "timings": completion.to_dict()["timings"]},
        }, headers=self._headers(decision))

    async def _sse(self, first, events: asyncio.Queue, generation: Generation, meta: "_Meta",
                   include_usage: bool):
        try:
            yield meta.chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if isinstance(event, Piece):
                    yield meta.chunk({"content": event.text})
                elif isinstance(event, Done) and event.cancelled:
                    error = _shutting_down()
                    self.metrics.request_failed(error.status, error.code)
                    yield meta.sse({"error": {"message": error.message, "type": error.type,
                                              "param": None, "code": error.code}})
                    break
                elif isinstance(event, Done):
                    completion = event.completion
                    self.metrics.request_finished(completion)
                    yield meta.chunk({}, finish_reason=completion.finish_reason or "stop")
                    if include_usage:
                        yield meta.sse({**meta.base(), "choices": [], "usage": _usage(completion)})
                    break
                else:  # Failed mid-answer: the status is sent; say it in the stream
                    error = error_for(event.error)
                    self.metrics.request_failed(error.status, error.code)
                    log.warning("generation failed mid-stream: %s", error.message)
                    yield meta.sse({"error": {"message": error.message, "type": error.type,
                                              "param": None, "code": error.code}})
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()  # a client that went away stops the generation

    async def _read_json(self, request: Request) -> Any:
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body is larger than [server] max_body_bytes = {limit}",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is larger than [server] max_body_bytes = {limit}",
                               code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_rows()})

    async def get_model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        for row in self._model_rows():
            if row["id"] == name:
                return JSONResponse(row)
        return self._fail(ApiError(404, f"model {name!r} is not configured",
                                   code="model_not_found", param="model"))

    def _model_rows(self) -> list[dict[str, Any]]:
        residents = {r["name"]: r for r in self.engine.pool.residents()}
        rows = []
        for name, spec in self.config.models.items():
            resident = residents.get(name)
            rows.append({
                "id": name, "object": "model", "created": self.created, "owned_by": "sarai-router",
                "loaded": bool(resident and resident["state"] == "loaded"),
                "state": resident["state"] if resident else "unloaded",
                "pinned": spec.pinned,
                "ttl_seconds": None if spec.pinned else self.config.ttl_for(spec),
                "modalities": list(spec.modalities),
                "resident": resident,
            })
        auto = {"id": AUTO_MODEL, "object": "model", "created": self.created,
                "owned_by": "sarai-router",
                # "auto" can answer without a load when any model is resident.
                "loaded": any(r["loaded"] for r in rows), "state": "router",
                "routes_to": list(self.config.models)}
        return [auto, *rows]

    async def health(self, request: Request) -> JSONResponse:
        states = {r["name"]: r["state"] for r in self.engine.pool.residents()}
        return JSONResponse({"status": "ok",
                             "models": {n: states.get(n, "unloaded") for n in self.config.models}})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


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


def _ensure_file_or_fail(config: Config, name: str) -> None:
    """``cli.ensure_model_file`` (pulls known models), as an API error instead of an exit."""
    from .cli import ensure_model_file

    try:
        ensure_model_file(config, name)
    except SystemExit:
        raise PoolError(f"model {name!r}: its file is missing and could not be fetched: "
                        f"{config.models[name].path} (see the server log)") from None


class ApiKeyMiddleware:
    """Refuse requests without ``Authorization: Bearer <key>`` (except OPEN_PATHS)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", type="authentication_error",
                    headers={"www-authenticate": "Bearer"}).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: Config, *, api_key: str = "", engine: Engine | None = None,
               load_pinned: bool = True) -> Starlette:
    """The ASGI app. Pinned models load and the reaper starts in the app's lifespan."""
    state = SaraiServer(config, engine=engine, api_key=api_key, load_pinned=load_pinned)

    @asynccontextmanager
    async def lifespan(app):
        await anyio.to_thread.run_sync(state.startup)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.shutdown)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return state._fail(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                    f"{exc.detail}", code=code))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return state._fail(error_for(exc))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
            Route("/v1/models", state.list_models, methods=["GET"]),
            Route("/v1/models/{name:path}", state.get_model, methods=["GET"]),
            Route("/health", state.health, methods=["GET"]),
            Route("/metrics", state.metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.state.sarai = state
    return app


def serve(config: Config, *, host: str, port: int, api_key: str = "",
          log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
    import uvicorn

    app = create_app(config, api_key=api_key)
    state: SaraiServer = app.state.sarai

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Stop answers in flight at once (each ends with a 503 error or an error
            # event), rather than let the grace timeout cut them off mid-reply.
            state.stop_generations()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   access_log=False, timeout_graceful_shutdown=5))
    # After its graceful shutdown uvicorn restores the handlers it found and raises the
    # signal again; SIGTERM's default handler would then kill the cleanly stopped process
    # (exit -15). Handled like Ctrl-C, it ends as a KeyboardInterrupt, caught below: exit 0.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C (or SIGTERM) it already handled
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
