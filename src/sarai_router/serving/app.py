"""The OpenAI-compatible HTTP server: ``create_app(config)`` is an ASGI app, ``serve`` runs it.

Starlette + uvicorn. Every generation runs as a task on the server's event loop
(``streaming.Generation`` over ``Engine.astream``): a remote model's with no thread at all,
a llama.cpp model's tokens computed on a thread of its own. The task hands its pieces to the
handler one by one, so a streamed answer goes out token by token and never blocks other
requests. A request is admitted (or refused with a status) before any byte of the answer is
sent: the first event from the generation decides. The request path itself (route,
capabilities, presence, pre-warm) is ``Engine.prepare``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import asynccontextmanager
from typing import Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..backend import GenerationParams
from ..config import Config
from ..engine import Engine, share_cores
from ..errors import Cancelled, not_configured
from ..streaming import Done, Failed, Generation, Piece
from ..types import ChatRequest, RouteDecision
from .audio import cancel_when_gone, transcriptions
from .guard import (OPEN_PATHS, ApiKeyMiddleware, HostGuard, RequestIdMiddleware,
                    cors_middleware, guarded_h11_protocol, limit_body)
from .metrics import CONTENT_TYPE, Metrics
from .openai import (AUTO_MODEL, REQUEST_ID, ApiError, Limits, ParsedChat, _Meta,
                     _shutting_down, error_for, finish_reason, header_value, internal_error,
                     parse_chat_body, parse_json, tool_calls_json)

log = logging.getLogger(__name__)

API_KEY_ENV = "SARAI_ROUTER_API_KEY"
__all__ = ["OPEN_PATHS", "SaraiServer", "create_app", "serve"]


class ClientGone(Exception):
    """The client hung up before its answer was complete."""


class ShuttingDown(Exception):
    """Shutdown began while the answer waited for its next piece."""


#: How often a handler waiting for tokens checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


async def _next_event(events: asyncio.Queue, request: Request,
                      stopping: Callable[[], bool] = lambda: False):
    """The worker's next event; ClientGone if the client has disconnected, ShuttingDown if
    ``stopping()`` says the server is going away (a generation still evaluating its prompt
    may not yield for seconds, longer than the shutdown grace).

    Tokens may arrive every few milliseconds, so the check runs on a clock, not only when
    the queue is quiet.
    """
    state = request.scope.setdefault("sarai.last_disconnect_check", [time.monotonic()])
    if not events.empty() and time.monotonic() - state[0] < DISCONNECT_POLL_SECONDS:
        return events.get_nowait()  # the common case mid-answer: no timer task per token
    while True:
        if stopping() and events.empty():
            raise ShuttingDown
        if time.monotonic() - state[0] >= DISCONNECT_POLL_SECONDS:
            state[0] = time.monotonic()
            if await request.is_disconnected():
                raise ClientGone
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            continue




class SaraiServer:
    """The state behind the routes: one engine, its metrics, the API key."""

    def __init__(self, engine: Engine, *, api_key: str = "", load_pinned: bool = True):
        self.engine = engine
        self.config = engine.config
        self.metrics = Metrics(self.engine.pool, self.engine.hooks)
        self.api_key = api_key
        self.load_pinned = load_pinned
        self.created = int(time.time())
        server = self.config.server
        self.limits = Limits(max_tokens_cap=server.max_tokens_cap,
                             max_prompt_chars=server.max_prompt_chars)
        self.shutting_down = False
        self.stop_deadline = float("inf")
        #: generations still running when the grace ran out (serve() then exits at once)
        self.unfinished = 0
        # Generations still running, stopped and joined at shutdown.
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()

    # -- lifecycle

    def startup(self) -> None:
        if self.load_pinned:
            self.engine.start()
        else:
            self.engine.pool.start_reaper()
        self.engine.hooks.startup(self.engine)

    def stop_generations(self) -> None:
        """Called as soon as shutdown starts (Ctrl-C, SIGTERM): answers in flight end now,
        with an error saying so, instead of being cut off by the grace timeout; requests
        still queued leave the queue at once (503) without reaching the model.

        A generation stops between tokens; one still before its first token when the grace
        timeout cancels its handler gets the same 503 from the handler (not uvicorn's
        plain-text 500)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.stop_deadline = time.monotonic() + self.config.server.shutdown_grace_seconds
        for generation in list(self._live):
            generation.cancel()

    def shutdown(self) -> None:
        # A process that exits with a generation inside llama.cpp crashes: stop them first,
        # waiting no longer than what is left of [server] shutdown_grace_seconds.
        self.stop_generations()
        live = list(self._live)
        for generation in live:
            generation.join(timeout=max(0.0, self.stop_deadline - time.monotonic()))
        self.unfinished = sum(1 for g in live if not g.finished)
        if self.unfinished:  # e.g. inside a long prompt's evaluation, which cannot be cut
            log.warning("%d generation(s) still running after [server] shutdown_grace_seconds "
                        "= %g; exiting anyway", self.unfinished,
                        self.config.server.shutdown_grace_seconds)
        self.engine.hooks.shutdown(self.engine)
        self.engine.close()
        self.metrics.close()

    # -- helpers

    async def prepare(self, request: Request, chat: ChatRequest,
                      model: str | None) -> RouteDecision:
        """``Engine.prepare`` on a worker thread, for every dialect. Audio it transcribes
        is a transcription like any other: it waits its turn on the speech model (at most
        ``[server] queue_size`` wait: 429 past that) and stops when the client leaves
        (:class:`Cancelled`: answer with :meth:`client_left`)."""
        cancel = threading.Event()
        watcher = asyncio.get_running_loop().create_task(cancel_when_gone(request, cancel))
        try:
            # A model that cannot honour tools, a JSON response_format or logprobs is
            # refused here (Router.ensure_capable: 400 unsupported_parameter naming it).
            return await anyio.to_thread.run_sync(lambda: self.engine.prepare(
                chat, model=model, cancel=cancel, queue_limit=self.config.server.queue_size))
        finally:
            cancel.set()  # a cancelled wait (shutdown) stops the thread's work too
            watcher.cancel()

    def client_left(self, what: str) -> Response:
        """The answer to a request whose client left while it was prepared."""
        log.info("client went away; stopped %s", what)
        self.refused(499, "client_closed_request", "the client went away")
        return Response(status_code=499)  # nginx's code; nobody reads it

    def _headers(self, decision: RouteDecision) -> dict[str, str]:
        return {"x-sarai-model": header_value(decision.model),
                "x-sarai-route-reason": header_value(decision.reason),
                "x-sarai-route-plugin": header_value(decision.plugin),
                **fallback_header(decision)}

    def _client_gone(self, generation: Generation,
                     decision: RouteDecision) -> Response:
        generation.cancel()
        log.info("client went away; stopped its answer from %s", decision.model)
        self.refused(499, "client_closed_request", "the client went away")
        return Response(status_code=499)  # nginx's code; nobody reads it

    def refused(self, status: int, code: str, message: str) -> None:
        """A request answered with an error status (or failed mid-stream): tell observers."""
        self.engine.hooks.emit("request_refused", status=status, code=code, message=message)

    def _fail(self, error: ApiError, exc: BaseException | None = None, *,
              decision: RouteDecision | None = None) -> JSONResponse:
        self.refused(error.status, error.code, error.message)
        if error.code == "internal_error":
            log.error("answered 500 (request id %s)", REQUEST_ID.get(), exc_info=exc)
        elif error.status >= 500:
            log.warning("answered %d (request id %s): %s", error.status, REQUEST_ID.get(),
                        exc if exc is not None else error.message)
        response = error.response()
        if decision is not None:  # the fallbacks tried before the error
            response.headers.update(fallback_header(decision))
        return response

    # -- routes

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._read_json(request)
            parsed = parse_chat_body(body, self.limits)
            if parsed.model != AUTO_MODEL and parsed.model not in self.config.models:
                raise ApiError(404, not_configured(parsed.model[:100],
                                                   [AUTO_MODEL, *self.config.models]),
                               code="model_not_found", param="model")
            decision = await self.prepare(
                request, parsed.request, None if parsed.model == AUTO_MODEL else parsed.model)
        except Cancelled:
            return self.client_left("its transcription")
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            return self._fail(error_for(exc), exc)

        begun = await self.begin_answer(request, parsed.request, decision, parsed.params)
        if isinstance(begun, Response):
            return begun
        generation, events, first, decision = begun
        meta = _Meta(decision, include_usage=parsed.include_usage,
                     logprobs=parsed.params.logprobs)
        if parsed.stream:
            return StreamingResponse(
                self._sse(first, events, generation, meta),
                media_type="text/event-stream",
                headers={**self._headers(decision), "cache-control": "no-cache",
                         "x-accel-buffering": "no"})
        collected = await self.collect(first, events, request, generation, decision)
        if isinstance(collected, Response):
            return collected
        text, _, completion = collected
        return JSONResponse({
            **meta.completion(completion, text),
            "sarai": {"route": decision.to_dict(), "timings": completion.to_dict()["timings"],
                      "stopped_by": completion.stopped_by,
                      "placement": completion.placement},
        }, headers=self._headers(decision))

    def start_generation(self, request: ChatRequest, decision: RouteDecision,
                         params: GenerationParams) -> tuple[Generation, asyncio.Queue] | Response:
        """Start ``request``'s generation as a task on this loop (its events go to the queue
        returned), or the 503 to answer when shutdown has begun."""
        events: asyncio.Queue = asyncio.Queue()
        generation = Generation(self.engine, request, decision, params, events.put_nowait,
                                queue_limit=self.config.server.queue_size)
        # Registered before the check: a stop that starts between the two still cancels it.
        self._live.add(generation)
        if self.shutting_down:
            return self._fail(_shutting_down())
        generation.start()
        return generation, events

    async def begin_answer(self, request: Request, chat: ChatRequest, decision: RouteDecision,
                           params: GenerationParams):
        """Start the generation and wait for its first event, what every dialect does before
        it sends a byte: the answer to give instead (shutdown, client gone, a failure before
        the first token), or ``(generation, events, first event, decision)``, where the
        decision is the model that answers (a fallback's when the routed model failed)."""
        started = self.start_generation(chat, decision, params)
        if isinstance(started, Response):
            return started
        generation, events = started
        first = await self.wait_event(events, request, generation, decision)
        if isinstance(first, Response):
            return first
        decision = generation.completion.decision
        if isinstance(first, Failed):
            log.debug("request failed before its first token", exc_info=first.error)
            return self._fail(error_for(first.error), first.error, decision=decision)
        if isinstance(first, Done) and first.cancelled:  # stopped before any byte went out
            return self._fail(_shutting_down())
        self.metrics.request_started(decision)
        return generation, events, first, decision

    async def collect(self, first: Any, events: asyncio.Queue, request: Request,
                      generation: Generation, decision: RouteDecision):
        """A whole answer for a client that asked for no stream: the answer to give instead
        (a failure, shutdown, the client gone), or ``(text, token logprobs, completion)``."""
        pieces: list[str] = []
        tokens: list = []
        event = first
        while not isinstance(event, (Done, Failed)):
            pieces.append(event.text)
            tokens.extend(event.logprobs)
            event = await self.wait_event(events, request, generation, decision)
            if isinstance(event, Response):
                return event
        if isinstance(event, Failed):
            return self._fail(error_for(event.error), event.error)
        if event.cancelled:  # only shutdown cancels a generation whose client is there
            return self._fail(_shutting_down())
        return "".join(pieces), tokens, event.completion

    async def wait_event(self, events: asyncio.Queue, request: Request,
                         generation: Generation, decision: RouteDecision):
        """The generation's next event, or the answer to give instead when nobody wants the
        rest: 499 when the client left, 503 when shutdown began (the generation stopped
        either way). A handler cancelled for another reason stops it and goes on failing."""
        try:
            return await _next_event(events, request, lambda: self.shutting_down)
        except asyncio.CancelledError:
            generation.cancel()
            if self.shutting_down:
                return self._fail(_shutting_down())
            raise
        except ClientGone:
            return self._client_gone(generation, decision)
        except ShuttingDown:
            generation.cancel()
            return self._fail(_shutting_down())

    async def _sse(self, first, events: asyncio.Queue,
                   generation: Generation, meta: "_Meta"):
        try:
            yield meta.chunk({"role": "assistant", "content": ""},
                             logprobs=[] if meta.logprobs else None)
            event = first
            while True:
                if isinstance(event, Piece):
                    yield meta.content(event.text, event.logprobs)
                elif isinstance(event, Done) and event.cancelled:
                    error = _shutting_down()
                    self.refused(error.status, error.code, error.message)
                    yield meta.sse({"error": {"message": error.message, "type": error.type,
                                              "param": None, "code": error.code}})
                    break
                elif isinstance(event, Done):
                    completion = event.completion
                    if completion.tool_calls:
                        yield meta.chunk({"tool_calls": tool_calls_json(completion.tool_calls,
                                                                        indexed=True)})
                    last = meta.chunk({}, finish_reason=finish_reason(completion))
                    # Why the answer ended when the model did not end it (runaway guard),
                    # and which replica answered (a model with several).
                    extra = {key: value for key, value in (
                        ("stopped_by", completion.stopped_by),
                        ("placement", completion.placement)) if value}
                    if extra:
                        data = json.loads(last.removeprefix("data: "))
                        last = meta.sse({**data, "sarai": extra})
                    yield last
                    if meta.include_usage:
                        yield meta.usage_chunk(completion)
                    break
                else:  # Failed mid-answer: the status is sent; say it in the stream
                    error = error_for(event.error)
                    self.refused(error.status, error.code, error.message)
                    log.warning("generation failed mid-stream (request id %s): %s",
                                REQUEST_ID.get(), event.error)
                    yield meta.sse({"error": {"message": error.message, "type": error.type,
                                              "param": None, "code": error.code}})
                    # A client that reads past the error event must not take what came
                    # as a finished answer: "length" is OpenAI's word for one cut short.
                    last = json.loads(meta.chunk({}, finish_reason="length")
                                      .removeprefix("data: "))
                    yield meta.sse({**last, "sarai": {"stopped_by": "error"}})
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()  # a client that went away stops the generation

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON: ``application/json`` only (a web page can send other types
        without the browser asking first), at most ``max_body_bytes`` (chunked too),
        within ``body_timeout_seconds``."""
        media, _, options = request.headers.get("content-type", "").partition(";")
        charset = dict(part.strip().partition("=")[::2] for part in options.split(";")
                       if "=" in part).get("charset", "utf-8").strip('"').lower()
        if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
            raise ApiError(415, "the body must be JSON: send 'Content-Type: application/json'",
                           code="unsupported_media_type")
        limit = self.config.server.max_body_bytes
        too_large = ApiError(413, f"the body is larger than [server] max_body_bytes = {limit}",
                             code="body_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        timeout = self.config.server.body_timeout_seconds
        with anyio.move_on_after(timeout) as scope:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        if scope.cancelled_caught:
            raise ApiError(408, f"the body did not arrive within [server] body_timeout_seconds "
                           f"= {timeout:g}", code="request_timeout")
        return parse_json(b"".join(chunks))

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_rows()})

    async def get_model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        for row in self._model_rows():
            if row["id"] == name:
                return JSONResponse(row)
        return self._fail(ApiError(404, not_configured(name, [AUTO_MODEL, *self.config.models]),
                                   code="model_not_found", param="model"))

    def _model_rows(self) -> list[dict[str, Any]]:
        health = self.engine.pool.health()
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
                "backend": spec.backend,
                "fallbacks": list(spec.fallbacks),
                # a remote model's endpoints as this router sees them (None until loaded)
                "health": health.get(name),
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


def fallback_header(decision: RouteDecision) -> dict[str, str]:
    """``x-sarai-fallback: from=a;to=b;reason=refused, from=b;...`` when fallbacks answered."""
    if not decision.fallbacks:
        return {}
    steps = ", ".join(f"from={s.from_model};to={s.to_model};reason={s.reason}"
                      for s in decision.fallbacks)
    return {"x-sarai-fallback": header_value(steps)}


def plugin_routes(engine: Engine, taken: set[str]) -> list[BaseRoute]:
    """The routes the ``register_routes`` plugins return, each under ``[server]
    max_body_bytes`` (the Host guard and the API key wrap the whole app). One whose path
    the server answers already is left out: the server's own route stays."""
    limit = engine.config.server.max_body_bytes
    mounted = []
    for plugin, route in engine.hooks.routes():
        path = getattr(route, "path", None)
        if path in taken:
            log.warning("plugin %r adds a route at %s, which the server answers already; "
                        "left it out", plugin, path)
            continue
        if hasattr(route, "app"):
            route.app = limit_body(route.app, limit)
        mounted.append(route)
    return mounted


def create_app(config: Config | None = None, *, api_key: str = "", engine: Engine | None = None,
               load_pinned: bool = True) -> Starlette:
    """The ASGI app for ``engine`` (or a new one for ``config``, its cores shared out between
    its models). Pinned models load and the reaper starts in the app's lifespan."""
    if engine is None:
        if config is None:
            raise TypeError("create_app needs a config or an engine")
        engine = Engine(share_cores(config))
    state = SaraiServer(engine, api_key=api_key, load_pinned=load_pinned)

    @asynccontextmanager
    async def lifespan(app):
        await anyio.to_thread.run_sync(state.startup)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.shutdown)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(exc.status_code, "http_error")
        path = request.url.path[:200]
        error = ApiError(exc.status_code, f"{request.method} {path}: {exc.detail}", code=code,
                         headers=exc.headers)
        return state._fail(error)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer: RequestIdMiddleware logs it.
        state.refused(500, "internal_error", "internal error")
        return internal_error().response()

    routes = [
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
        Route("/v1/audio/transcriptions", functools.partial(transcriptions, state),
              methods=["POST"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", state.get_model, methods=["GET"]),
        Route("/health", state.health, methods=["GET"]),
        Route("/metrics", state.metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes + plugin_routes(engine, {route.path for route in routes}),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    # The last added runs first: request id, Host, CORS (preflights need no key), key.
    server = engine.config.server
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if server.cors_origins:
        app.add_middleware(cors_middleware, origins=server.cors_origins)
    app.add_middleware(HostGuard, allowed_hosts=server.allowed_hosts)
    app.add_middleware(RequestIdMiddleware)
    app.state.sarai = state
    return app


def serve(engine: Engine, *, host: str, port: int, api_key: str = "",
          log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
    import uvicorn

    app = create_app(engine=engine, api_key=api_key)
    state: SaraiServer = app.state.sarai

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Stop answers in flight at once (each ends with a 503 error or an error
            # event), rather than let the grace timeout cut them off mid-reply.
            state.stop_generations()
            super().handle_exit(sig, frame)

    settings = engine.config.server
    server = Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        # uvloop when it is installed (a dependency on Linux and macOS): the relay's
        # per-token work is mostly the event loop's (docs/BENCHMARKS.md).
        loop="auto",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        http=guarded_h11_protocol(settings.header_timeout_seconds,
                                  settings.body_timeout_seconds),
        h11_max_incomplete_event_size=settings.max_header_bytes))
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
    if state.unfinished:
        # A thread is still inside llama.cpp: the interpreter's normal exit would tear the
        # model down under it (a crash). Leave now, without finalisers, saying it failed.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)
