"""The ``admin`` plugin's routes: the admin API under ``/admin`` and the page at ``/ui``.

Everything here answers through the server's own guards: the API key, the Host allowlist
and the body limits apply as on every route. The page's three static files are the only
exception to the key (``OPEN_PATHS``): a browser must load the page before it can ask for
the key, and they hold no data.

- ``GET /admin/models``: every configured model's residency (:meth:`ModelPool.status`),
  the RAM budget and what is held against it;
- ``POST /admin/models/load`` ``{"model": NAME}``: load it now (fetching its files if the
  config says where from), evicting idle models by the cache policy if needed;
- ``POST /admin/models/unload`` ``{"model": NAME, "timeout_seconds": 120}``: unload it once
  its in-flight and queued requests have ended; a pinned model is refused (409);
- ``POST /admin/route``: a chat-completions body (text and images); answers the routing
  decision and each routing plugin's answer, without loading or generating anything;
- ``GET /admin/events``: Server-Sent Events: the recent events, then each one as it
  happens, and the models' status whenever it may have changed (every 2 s at least).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from importlib import resources
from typing import Any, Mapping

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ModelBusy, ModelPinned, PluginError, RoutingError, not_configured
from ..serving.openai import AUTO_MODEL, ApiError, error_for, parse_chat_body
from .admin_events import HUB

log = logging.getLogger(__name__)

#: The page's files, shipped in the package (no build step, nothing from a CDN).
UI_FILES = {"/ui": ("index.html", "text/html; charset=utf-8"),
            "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
            "/ui/app.css": ("app.css", "text/css; charset=utf-8")}
#: The page runs only its own script and talks only to this server.
UI_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
#: The longest an unload may be told to wait for the model's requests.
MAX_UNLOAD_WAIT_SECONDS = 3600.0
DEFAULT_UNLOAD_WAIT_SECONDS = 120.0
#: The models' status goes out at least this often on an event stream (TTL countdowns,
#: idle times), and at most every STATUS_MIN_SECONDS however busy the server is.
STATUS_EVERY_SECONDS = 2.0
STATUS_MIN_SECONDS = 0.25


def _server(request: Request):
    return request.app.state.sarai


def status(server) -> dict[str, Any]:
    """The models panel: each model's residency and the budget they share."""
    pool = server.engine.pool
    models = pool.status()
    cache = server.config.cache
    return {"models": models, "ram_budget_mb": cache.ram_budget_mb,
            "resident_mb": round(sum(m["rss_mb"] or 0.0 for m in models), 1),
            "max_loaded": cache.max_loaded, "time": time.time()}


def _model_field(body: Any, server, allowed: tuple[str, ...]) -> str:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the body must be a JSON object like {\"model\": \"NAME\"}",
                       code="invalid_body")
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unknown field {str(key)[:100]!r} (allowed: "
                           f"{', '.join(allowed)})", code="unknown_parameter",
                           param=str(key)[:100])
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model is required: a configured model name", code="invalid_value",
                       param="model")
    pool = server.engine.pool
    if pool.spec_of(name) is None:  # a configured model, or one a plugin added (whisper)
        raise ApiError(404, not_configured(name[:100], pool.names()),
                       code="model_not_found", param="model")
    return name


async def models(request: Request) -> Response:
    return JSONResponse(status(_server(request)))


async def load(request: Request) -> Response:
    server = _server(request)
    try:
        name = _model_field(await server._read_json(request), server, ("model",))
        pool = server.engine.pool
        was_loaded = pool.is_loaded(name)

        def work() -> None:
            server.engine.ensure_present(name)
            pool.ensure_loaded(name)

        started = time.perf_counter()
        await anyio.to_thread.run_sync(work)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return server._fail(error_for(exc), exc)
    seconds = round(time.perf_counter() - started, 3)
    log.info("model %s %s (asked through the admin API)", name,
             "was already loaded" if was_loaded else f"loaded in {seconds:g}s")
    return JSONResponse({"model": name, "loaded": True, "already_loaded": was_loaded,
                         "seconds": seconds, **status(server)})


async def unload(request: Request) -> Response:
    server = _server(request)
    try:
        body = await server._read_json(request)
        name = _model_field(body, server, ("model", "timeout_seconds"))
        wait = body.get("timeout_seconds", DEFAULT_UNLOAD_WAIT_SECONDS)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) \
                or not 0 <= wait <= MAX_UNLOAD_WAIT_SECONDS:
            raise ApiError(400, "timeout_seconds must be a number of seconds from 0 to "
                           f"{MAX_UNLOAD_WAIT_SECONDS:g}", code="invalid_value",
                           param="timeout_seconds")
        started = time.perf_counter()
        unloaded = await _unload_while_asked(request, server, name, float(wait))
    except ModelPinned as exc:
        return server._fail(ApiError(409, str(exc), code="model_pinned", param="model"), exc)
    except ModelBusy as exc:
        return server._fail(ApiError(409, str(exc), code="model_busy", param="model",
                                     headers={"retry-after": "5"}), exc)
    except Exception as exc:  # noqa: BLE001
        return server._fail(error_for(exc), exc)
    return JSONResponse({"model": name, "unloaded": unloaded,
                         "waited_seconds": round(time.perf_counter() - started, 3),
                         **({} if unloaded else {"detail": f"model {name!r} was not loaded"}),
                         **status(server)})


async def _unload_while_asked(request: Request, server, name: str, wait: float) -> bool:
    """``unload_when_idle`` on a worker thread, given up when the client leaves or the
    server stops: a wait of up to an hour must not hold a thread nobody listens to."""
    pool = server.engine.pool
    cancel = threading.Event()

    async def watch() -> None:
        while not (getattr(server, "shutting_down", False) or await request.is_disconnected()):
            await anyio.sleep(0.5)
        cancel.set()
        pool.wake()

    # A plain task, not a task group: the pool's errors must come out as themselves.
    watcher = asyncio.ensure_future(watch())
    try:
        return await anyio.to_thread.run_sync(
            lambda: pool.unload_when_idle(name, timeout=wait, cancel=cancel))
    finally:
        watcher.cancel()


def route_trace(engine, request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each ``select_route`` implementation's answer, in the order the router asks them
    (the first that answers decides): ``(signals with their plugins, trace)``."""
    hooks = engine.hooks
    signals = engine.router.signals(request)
    origin = {name: plugin for name, (plugin, _) in hooks.signal_functions().items()}
    kwargs = {"request": request, "signals": signals, "models": engine.config.models,
              "config": engine.config, "residency": engine.router.residency()}
    trace, decided = [], False
    # pluggy's own list, in its call order (last registered, non-trylast first).
    for impl in reversed(hooks.pm.hook.select_route.get_hookimpls()):
        step: dict[str, Any] = {"plugin": impl.plugin_name, "model": None, "reason": None,
                                "error": None, "decided": False}
        try:
            value = impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception as exc:  # noqa: BLE001 - the router skips it too; say so
            step["error"] = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(value, str):
                step["model"] = value
            elif value is not None:
                step["model"] = getattr(value, "model", None)
                step["reason"] = getattr(value, "reason", None)
            if value is not None and not decided:
                step["decided"] = decided = True
            elif value is not None:
                step["skipped"] = "an earlier plugin decided"
        trace.append(step)
    shown = {name: {"value": value, "plugin": origin.get(name)}
             for name, value in signals.items()}
    return shown, trace


async def route(request: Request) -> Response:
    """The routing playground: the decision and the trace; no model loads, nothing is
    generated or transcribed (audio is refused)."""
    server = _server(request)
    try:
        parsed = parse_chat_body(await server._read_json(request), server.limits)
        explicit = None if parsed.model == AUTO_MODEL else parsed.model
        if explicit is not None and explicit not in server.config.models:
            raise ApiError(404, not_configured(explicit[:100],
                                               [AUTO_MODEL, *server.config.models]),
                           code="model_not_found", param="model")
        if parsed.request.audio is not None:
            raise ApiError(400, "the routing playground takes text and images, not audio: it "
                           "transcribes nothing (send the words as text)",
                           code="unsupported_value", param="messages")
        engine = server.engine

        def decide():
            signals, trace = route_trace(engine, parsed.request)
            try:
                # Router._route: the decision without the ``routed`` event, which would put
                # a request that never happened in the feed and the metrics.
                decision = engine.router._route(parsed.request, explicit, None)
            except (RoutingError, PluginError) as exc:
                # A routing plugin's mistake (an unknown model, a wrong type): the trace
                # shows which; the client did nothing wrong.
                return None, str(exc), signals, trace
            return engine.check_capabilities(decision, parsed.request), None, signals, trace

        decision, failure, signals, trace = await anyio.to_thread.run_sync(decide)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return server._fail(error_for(exc), exc)
    residency = engine.router.residency()
    return JSONResponse({"decision": None if decision is None else decision.to_dict(),
                         "error": failure, "signals": signals, "trace": trace,
                         "residency": {name: residency.state(name) for name in residency}})


def _sse(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, default=str, ensure_ascii=False) + "\n\n"


async def events(request: Request) -> Response:
    server = _server(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    subscriber = HUB.subscribe(queue.put_nowait, loop.call_soon_threadsafe)
    # The recent past first (the feed and the charts start from it), then what happens.
    backlog = HUB.recent()

    def stopping() -> bool:
        return bool(getattr(server, "shutting_down", False))

    async def frames():
        try:
            yield _sse({"type": "status", **status(server)})
            for frame in backlog:
                yield f"data: {frame}\n\n"
            yield _sse({"type": "live", "lost": 0})
            last_status = time.monotonic()
            dirty = False
            while not stopping():
                try:
                    frame = await asyncio.wait_for(queue.get(), timeout=STATUS_MIN_SECONDS)
                except asyncio.TimeoutError:
                    frame = None
                else:
                    subscriber.taken()
                    if frame == "":  # the hub closed the stream (shutdown)
                        break
                    yield f"data: {frame}\n\n"
                    dirty = True
                since = time.monotonic() - last_status
                if (dirty and since >= STATUS_MIN_SECONDS) or since >= STATUS_EVERY_SECONDS:
                    yield _sse({"type": "status", "lost": subscriber.lost, **status(server)})
                    last_status, dirty = time.monotonic(), False
        finally:
            HUB.unsubscribe(subscriber)

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def page(request: Request) -> Response:
    name, media = UI_FILES[request.url.path]
    body = resources.files(__package__).joinpath("admin_ui", name).read_bytes()
    return Response(body, media_type=media, headers=UI_HEADERS)


def routes() -> list[Route]:
    return [
        Route("/admin/models", models, methods=["GET"]),
        Route("/admin/models/load", load, methods=["POST"]),
        Route("/admin/models/unload", unload, methods=["POST"]),
        Route("/admin/route", route, methods=["POST"]),
        Route("/admin/events", events, methods=["GET"]),
        *(Route(path, page, methods=["GET"]) for path in UI_FILES),
    ]
