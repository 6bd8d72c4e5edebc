"""Every hook sarai-router calls, one place, each typed and documented.

Seven families:

* configuration: ``register_config_tables`` (the schema of a plugin's ``[plugins.NAME]``);
* input: ``transcribe`` (speech to text, for audio that the chosen model can't take);
* routing policy: ``register_signals`` (what we know about a request) and
  ``select_route`` (which model answers it);
* model backends: ``register_backends`` (how a model of a given ``backend`` kind loads);
* cache (residency) policy: ``select_eviction`` (which resident model makes room),
  ``model_expired`` (when an idle model is unloaded) and ``prewarm_models`` (which models to
  load in the background before a request needs them);
* seeing: ``observe`` (every event: routing, queueing, generations, fallbacks,
  transcriptions, model loads and unloads, refused requests);
* extending: ``register_commands`` (``sarai-router`` subcommands), ``register_routes``
  (HTTP routes ``serve`` mounts), ``startup`` and ``shutdown`` (a server's life).

Collecting hooks take a ``register`` callback. Decision hooks are ``firstresult``: the
first implementation that returns something other than ``None`` decides. Defaults live in
``sarai_router.default_plugins`` and are ``trylast``, so any user plugin runs before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

import pluggy

if TYPE_CHECKING:
    import threading

    import click
    from starlette.routing import BaseRoute

    from .backend import BackendFactory
    from .events import Event
    from .config import CacheConfig, Config, ModelSpec
    from .types import (AudioInput, ChatRequest, ModelState, ResidentInfo, Route, RouteDecision,
                        Transcript)

PROJECT_NAME = "sarai_router"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_config_tables(register: Callable[[str, type], None]) -> None:
    """Declare the schema of a plugin's config table: ``register(name, attrs_class)``.

    The ``[plugins.NAME]`` table is structured with ``attrs_class`` when the config loads:
    unknown keys and wrong types are config errors naming the key, like any other. If the
    class has a ``check(self, config)`` method, its ``(key, message)`` pairs are reported
    too. The plugin reads the checked table, defaults filled in, with
    ``config.plugin_config(NAME)``.

    If the class has a ``model_files(self, config)`` method, ``sarai-router models pull``
    fetches what it returns (:class:`sarai_router.fetch.PluginModel` entries) along with
    the configured models.

    :param register: call it once per table.
    """


@hookspec(firstresult=True)
def transcribe(
    audio: "AudioInput", request: "ChatRequest", language: "str | None", config: "Config",
    cancel: "threading.Event | None", hold: "Callable[..., ContextManager[Any]]",
) -> "Transcript | None":
    """Turn ``audio`` into text. Stops at first non-None result.

    Asked when a request carries audio that its model can't take: before routing when no
    configured model lists ``"audio"`` in its ``modalities``, otherwise when the model the
    request was routed to doesn't. The request is then routed (again) on the typed text
    plus the transcript, and the model receives the transcript as the user's text, marked
    ``[transcribed audio]``. A model that takes audio gets the audio itself. The HTTP
    ``POST /v1/audio/transcriptions`` endpoint asks this hook too.

    Raise :class:`sarai_router.errors.AudioError` when the clip itself is unusable (not
    audio, empty, silent, too long): the user is told (exit 2, HTTP 400) unless a later
    plugin transcribes it. Raise another ``SaraiError`` (e.g.
    :class:`~sarai_router.errors.TranscriptionUnavailable`) when this plugin can't work
    here (a package missing); any other exception is a plugin failure, logged and skipped.

    :param audio: the clip: ``.data`` (bytes), ``.mime`` (``audio/wav``, ``audio/mp3``...),
        ``.source`` (a file name or the HTTP field it came from, for messages).
    :param request: the request that carries it (its typed text, its history).
    :param language: an ISO 639-1 code the caller asked for, or ``None`` (use your own
        setting or detect it).
    :param config: the loaded config (``config.plugin_config(NAME)`` for your settings).
    :param cancel: set when nobody wants the transcript any more (the HTTP client left);
        check it between pieces of work and raise :class:`sarai_router.errors.Cancelled`.
        ``None`` when nothing can cancel (the CLI).
    :param hold: for a plugin that runs a model of its own in this process:
        ``with hold(spec, backend, cancel=event) as model:`` makes it one of the engine's
        pool residents (``spec``, a :class:`~sarai_router.config.ModelSpec` named for
        ``models ps``; ``backend``, the :class:`~sarai_router.backend.Backend` that loads
        it): loaded within ``[cache] ram_budget_mb`` if it is not, held for this
        transcription (one at a time per instance; past the caller's queue limit,
        :class:`~sarai_router.errors.QueueFull`), unloaded after ``spec.ttl_seconds``
        idle, shown by ``models ps`` and the metrics, never routed to. ``cancel`` (default:
        the request's) ends the wait for it.
    :returns: a :class:`sarai_router.types.Transcript` (``text``, ``language``,
        ``duration`` in seconds), or ``None`` to let the next plugin try.
    """


@hookspec
def register_signals(
    register: Callable[[str, Callable[["ChatRequest"], Any]], None], config: "Config"
) -> None:
    """Register signal functions: ``register(name, fn)``, ``fn(request) -> value``.

    Every signal is computed once per request, before routing, and handed to
    ``select_route`` in the ``signals`` dict. When two plugins register the same name, the
    one called first (a user plugin before a ``trylast`` default) wins.

    :param register: call it once per signal.
    :param config: the loaded config, for plugins that read their settings from it.
    """


@hookspec(firstresult=True)
def select_route(
    request: "ChatRequest",
    signals: Mapping[str, Any],
    models: Mapping[str, "ModelSpec"],
    config: "Config",
    residency: Mapping[str, "ModelState"],
) -> "str | Route | None":
    """Choose the model that answers ``request``. Stops at first non-None result.

    :param request: the chat request (``.text``, ``.messages``, ``.images``, ``.audio``,
        ``.needs``, ``.previous_models``: the models that answered the conversation's earlier
        turns, when known).
    :param signals: every registered signal's value, e.g. ``empathy``, ``chars``, ``modality``.
    :param models: configured model specs by name.
    :param config: the loaded config (``config.routing`` holds the routing settings).
    :param residency: every configured model's :class:`sarai_router.types.ModelState`:
        ``.state`` (``"loaded"``, ``"loading"`` or ``"unloaded"``), ``.warm`` (not
        unloaded) and ``.cold_load_seconds`` (the last measured load, else the backend's
        RAM estimate at ``COLD_LOAD_MB_PER_S``; ``None`` if unknown; worked out when read).
        A server or chat shows its pool; ``eval`` the pool it simulates; ``route``, which
        has no pool, every model ``"unloaded"``.
    :returns: a model name, a :class:`sarai_router.Route` (``.model``, ``.reason``), or
        ``None`` to let the next plugin decide.
    """


@hookspec
def register_backends(register: Callable[[str, "BackendFactory"], None], config: "Config") -> None:
    """Register model backends by kind: ``register(kind, factory)``.

    ``factory`` is a :class:`sarai_router.backend.Backend`: ``load(spec)`` returns a loaded
    model with ``chat(...)`` and ``close()``; the rest tells the core the backend's config
    keys (``settings_class``, ``check``), its concurrency, thread use, RAM estimate, file
    presence and capabilities. A model's ``backend`` key in the config names its kind.
    When two plugins register the same kind, the one called first wins.

    :param register: call it once per backend kind.
    :param config: the loaded config.
    """


@hookspec(firstresult=True)
def select_eviction(
    candidates: Sequence["ResidentInfo"],
    needed_mb: float,
    loading: "ModelSpec",
) -> "str | None":
    """Pick the resident model to unload to make room for ``loading``. Stops at first non-None result.

    Only idle, unpinned, loaded models are candidates: the pool never offers a model that a
    request uses or waits for.

    :param candidates: frozen snapshots of the evictable residents (``.name``,
        ``.last_used``, ``.ram_mb``, ``.spec``, ...).
    :param needed_mb: how many MB over the RAM budget the load would go (0 when only
        ``max_loaded`` is the limit).
    :param loading: the spec of the model about to load.
    :returns: the name of the model to evict, or ``None`` to pass.
    """


@hookspec(firstresult=True)
def model_expired(resident: "ResidentInfo", now: float, cache: "CacheConfig") -> "bool | None":
    """Say whether an idle resident model should be unloaded now. Stops at first non-None result.

    Asked by the reaper for every loaded model that no request uses or waits for.

    :param resident: a frozen snapshot of the resident model (``.spec``, ``.last_used`` on
        the monotonic clock).
    :param now: the current ``time.monotonic()``.
    :param cache: the ``[cache]`` config section.
    :returns: ``True`` to unload, ``False`` to keep, ``None`` to pass.
    """


@hookspec
def prewarm_models(
    request: "ChatRequest",
    signals: Mapping[str, Any],
    decision: "RouteDecision",
    loaded: "frozenset[str]",
    models: Mapping[str, "ModelSpec"],
    config: "Config",
) -> "Sequence[str] | None":
    """Name models to load in the background now, before a request needs them.

    Called once per routed request (server and chat), after routing and before the answer
    is generated. Every plugin is asked and the answers are merged. A model that is already
    resident or being loaded is skipped, and a pre-warm never evicts another model; the
    ``sarai_prewarms_total`` metric counts each pre-warm as used (a request came for the
    model before it was unloaded) or wasted.

    :param request: the chat request being answered.
    :param signals: the signals computed for it.
    :param decision: the routing decision (``.model`` answers this request).
    :param loaded: names of the models resident (or loading) right now.
    :param models: configured model specs by name.
    :param config: the loaded config.
    :returns: model names to pre-load, or ``None`` / ``[]`` for none.
    """


@hookspec
def observe(event: "Event") -> None:
    """See one event of the router's stream. Every implementation gets every event.

    Called on the thread that did the thing (a generation's worker, the event loop, the
    reaper), so keep it short: append to a file, bump a counter, hand it to a queue. An
    observer that raises is logged and counted (``sarai_observer_errors_total``); the
    request goes on unharmed.

    :param event: a frozen :class:`sarai_router.events.Event`: ``.kind`` (``"routed"``,
        ``"generation_finished"``, ``"model_loaded"``, ... every kind and its data keys
        are listed in :data:`sarai_router.events.EVENT_KINDS`), ``.model`` (str or
        None), ``.time`` (wall clock, ``time.time()``) and ``.data`` (a read-only mapping
        that serialises to JSON; request-scoped events carry ``request_id``).
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add commands to ``sarai-router``: ``cli.add_command(my_command)``.

    Asked when the command line meets a command name that is not built in (and for
    ``--help``), with the plugins of the config the command line names (``--config``,
    ``$SARAI_ROUTER_CONFIG``, ``./sarai.toml``). A built-in name can't be replaced.

    :param cli: the ``sarai-router`` click group.
    """


@hookspec
def register_routes() -> "Sequence[BaseRoute] | None":
    """Return Starlette routes (``starlette.routing.Route``, ``Mount``...) for ``serve``.

    Every route goes through the server's guards like its own: the Host allowlist, the
    API key (``SARAI_ROUTER_API_KEY``), the request id. A handler reaches the server
    through ``request.app.state.sarai`` (``.engine`` is the :class:`sarai_router.engine.Engine`,
    ``.config`` the config). A route whose path the server already answers is refused
    (logged); the built-in one stays. A handler that reads a body should keep within
    ``config.server.max_body_bytes``: ``await request.app.state.sarai.read_body(request)``
    does.

    :returns: a list of routes, or ``None``.
    """


# ``engine`` is typed Any: the engine sits above the hooks, and importing it here would
# close a loop (engine -> plugins -> hookspecs -> engine).
@hookspec
def startup(engine: Any) -> None:
    """The server starts: called once, after pinned models are loaded and before the first
    request is answered. Start background work here (and stop it in :func:`shutdown`).

    :param engine: the server's :class:`sarai_router.engine.Engine`.
    """


@hookspec
def shutdown(engine: Any) -> None:
    """The server stops: called once, after answers in flight ended and before models are
    unloaded.

    :param engine: the server's :class:`sarai_router.engine.Engine`.
    """
