"""Plugin discovery and the one typed class through which the core calls hooks.

Order of registration: the default plugins (all ``trylast``), then entry points in the
``sarai_router`` group, then ``*.py`` files in ``[plugins] dirs``. Any of them can be
blocked by name with ``[plugins] disable``. ``SARAI_ROUTER_NO_PLUGINS=1`` skips entry
points and plugin dirs; ``SARAI_ROUTER_TRACE_PLUGINS=1`` logs every hook call.

A plugin that raises is logged and skipped: the next plugin's answer is used. That is why
``Hooks`` calls implementations one by one instead of through ``pm.hook``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import attrs
import pluggy

from . import hookspecs
from .errors import BackendError, PluginError, SaraiError
from .events import REQUEST_ID, Event
from .hookspecs import PROJECT_NAME

if TYPE_CHECKING:
    import threading

    import click
    from starlette.routing import BaseRoute

    from .backend import BackendFactory
    from .config import CacheConfig, Config, ModelSpec
    from .types import AudioInput, ChatRequest, Residency, ResidentInfo, RouteDecision

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = PROJECT_NAME
NO_PLUGINS_ENV = "SARAI_ROUTER_NO_PLUGINS"
TRACE_ENV = "SARAI_ROUTER_TRACE_PLUGINS"

#: name -> module of the default plugins, registered under these names.
DEFAULT_PLUGINS = {
    "signals": "sarai_router.default_plugins.signals",
    "empathy": "sarai_router.default_plugins.empathy",
    "heuristic": "sarai_router.default_plugins.heuristic",
    "llama_cpp": "sarai_router.default_plugins.llama_cpp",
    "llama_server": "sarai_router.default_plugins.llama_server",
    "openai": "sarai_router.default_plugins.openai",
    "lru_ttl": "sarai_router.default_plugins.lru_ttl",
    "prewarm": "sarai_router.default_plugins.prewarm",
    "whisper": "sarai_router.default_plugins.whisper",
    "admin": "sarai_router.default_plugins.admin",
    "ollama": "sarai_router.default_plugins.ollama",
    "embeddings": "sarai_router.default_plugins.embeddings",
}

#: default plugins that only register a backend (of the same name): ``(module, class)``.
#: They are registered as a stand-in whose backend imports the module when it is first
#: asked something, so a command that uses no model of theirs never imports them.
LAZY_BACKENDS = {
    "llama_cpp": ("sarai_router.default_plugins.llama_cpp", "LlamaCppBackend"),
    "llama_server": ("sarai_router.default_plugins.llama_server", "LlamaServerBackend"),
    "openai": ("sarai_router.default_plugins.openai", "OpenAIBackend"),
}

#: name -> plugin registered in every plugin manager this process builds, after the
#: defaults. Empty unless the testing kit (``sarai_router.testing``) puts its ``echo``
#: backend here, in a test process or a server it starts for a test.
PROCESS_PLUGINS: dict[str, object] = {}


class LazyBackendPlugin:
    """Stands in for a default plugin that only registers a backend (``LAZY_BACKENDS``):
    it registers a :class:`sarai_router.backend.LazyBackend`, so the plugin's module is
    imported only when a model of that backend is used."""

    def __init__(self, kind: str, module: str, class_name: str):
        self.kind = kind
        self.__name__ = module  # how pluggy and `sarai-router plugins` name it
        self._where = (module, class_name)

    @hookspecs.hookimpl(trylast=True)
    def register_backends(self, register: Callable[[str, Any], None]) -> None:
        from .backend import LazyBackend

        register(self.kind, LazyBackend(*self._where))


@attrs.frozen
class PluginFailure:
    name: str
    source: str
    error: str


@attrs.define
class PluginSet:
    """The plugin manager plus what discovery found, for ``sarai-router plugins``."""

    pm: pluggy.PluginManager
    sources: dict[str, str] = attrs.field(factory=dict)
    failures: list[PluginFailure] = attrs.field(factory=list)
    blocked: tuple[str, ...] = ()
    trace: bool = False
    #: names that discovery found but did not register because they are blocked
    skipped: set[str] = attrs.field(factory=set)
    #: e.g. a hook implementation whose name matches no hookspec (a typo never called)
    warnings: list[str] = attrs.field(factory=list)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def build_plugins(config: "Config", extra: Iterable[tuple[str, object]] = ()) -> PluginSet:
    """Create the plugin manager for ``config``; ``extra`` plugins are registered last."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    plugins = PluginSet(pm=pm, blocked=tuple(config.plugins.disable))
    for name in config.plugins.disable:
        pm.set_blocked(name)
    for name, module_name in DEFAULT_PLUGINS.items():
        if pm.is_blocked(name):
            continue
        if name in LAZY_BACKENDS:
            pm.register(LazyBackendPlugin(name, *LAZY_BACKENDS[name]), name=name)
        else:
            pm.register(importlib.import_module(module_name), name=name)
        plugins.sources[name] = "default"
    for name, plugin in PROCESS_PLUGINS.items():
        if not pm.is_blocked(name) and not pm.has_plugin(name):
            pm.register(plugin, name=name)
            plugins.sources[name] = "testing kit"
    if not _env_flag(NO_PLUGINS_ENV):
        _load_entry_points(plugins)
        for directory in config.plugins.dirs:
            _load_plugin_dir(plugins, Path(directory))
    for name, plugin in extra:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
            plugins.sources[name] = "registered"
    _refuse_wrappers(plugins)
    _warn_unknown_hooks(plugins)
    # Hooks calls implementations one by one, bypassing pm.hook (and pluggy's tracing).
    plugins.trace = _env_flag(TRACE_ENV)
    known = set(plugins.sources) | plugins.skipped | {f.name for f in plugins.failures}
    for name in config.plugins.disable:
        if name not in known and name not in DEFAULT_PLUGINS:
            log.warning("[plugins] disable names %r, but no plugin has that name", name)
    return plugins


def _refuse_wrappers(plugins: PluginSet) -> None:
    """Hooks calls implementations one by one (to isolate failures), so a pluggy wrapper
    (``wrapper=True`` / ``hookwrapper=True``) would never wrap anything: refuse its plugin."""
    for name, plugin in list(plugins.pm.list_name_plugin()):
        if plugin is None:
            continue
        wrappers = [caller.name for caller in plugins.pm.get_hookcallers(plugin) or []
                    for impl in caller.get_hookimpls()
                    if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)]
        if not wrappers:
            continue
        plugins.pm.unregister(plugin)
        source = plugins.sources.pop(name, "registered")
        _record_failure(plugins, name, source, PluginError(
            f"implements {', '.join(wrappers)} as a hook wrapper; sarai-router calls each "
            "plugin on its own and does not support wrappers: return a value instead"))


def _warn_unknown_hooks(plugins: PluginSet) -> None:
    for name, caller in vars(plugins.pm.hook).items():
        if getattr(caller, "spec", True) is not None:
            continue
        for impl in caller.get_hookimpls():
            message = (f"plugin {impl.plugin_name!r} implements {name!r}, which is not a "
                       "sarai_router hook, so it is never called (a typo?)")
            log.warning("%s", message)
            plugins.warnings.append(message)


#: the entry points found, by the ``sys.path`` they were looked for on: scanned once
_ENTRY_POINTS: dict[tuple[str, ...], list[tuple[str, str]]] = {}


def entry_points(group: str = ENTRY_POINT_GROUP) -> list[tuple[str, str]]:
    """``[(name, value), ...]`` of ``group`` in the distributions installed on ``sys.path``.

    Reads each ``*.dist-info`` / ``*.egg-info`` folder's ``entry_points.txt`` once per
    process (per ``sys.path``); the first distribution of a name on the path wins, as
    with ``importlib.metadata``, whose import and scan alone cost ``route`` about 50 ms.
    """
    key = (group, *sys.path)
    if key not in _ENTRY_POINTS:
        found: list[tuple[str, str]] = []
        seen: set[str] = set()
        for folder in sys.path:
            try:
                names = sorted(os.listdir(folder or "."))
            except OSError:  # a zip, a missing folder
                continue
            for name in names:
                if not name.endswith((".dist-info", ".egg-info")):
                    continue
                dist = name.rsplit(".", 1)[0].split("-")[0].replace(".", "_").lower()
                if dist in seen:
                    continue
                seen.add(dist)
                try:
                    text = Path(folder or ".", name, "entry_points.txt").read_text("utf-8")
                except OSError:
                    continue
                found.extend(_entry_point_section(text, group))
        _ENTRY_POINTS[key] = found
    return _ENTRY_POINTS[key]


def _entry_point_section(text: str, group: str) -> list[tuple[str, str]]:
    """The ``name = value`` lines of ``[group]`` in an entry_points.txt (an INI file)."""
    section, found = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            found.append((name.strip(), value.strip()))
    return found


def load_entry_point(value: str) -> object:
    """What ``module.sub:attr.attr [extra]`` names."""
    module, _, attribute = value.split("[", 1)[0].strip().partition(":")
    target: object = importlib.import_module(module.strip())
    for part in filter(None, attribute.strip().split(".")):
        target = getattr(target, part)
    return target


def _load_entry_points(plugins: PluginSet) -> None:
    for name, value in entry_points(ENTRY_POINT_GROUP):
        if plugins.pm.is_blocked(name):
            plugins.skipped.add(name)
            continue
        if plugins.pm.has_plugin(name):
            continue
        try:
            plugins.pm.register(load_entry_point(value), name=name)
        except Exception as exc:
            _record_failure(plugins, name, f"entry point {value}", exc)
            continue
        plugins.sources[name] = f"entry point {value}"


def _load_plugin_dir(plugins: PluginSet, directory: Path) -> None:
    if not directory.is_dir():
        _record_failure(plugins, directory.name, str(directory),
                        FileNotFoundError("[plugins] dirs: not a directory"))
        return
    for file in sorted(directory.glob("*.py")):
        name = file.stem
        if file.name.startswith("_"):
            continue
        if plugins.pm.is_blocked(name):
            plugins.skipped.add(name)
            continue
        if plugins.pm.has_plugin(name):
            _record_failure(plugins, name, str(file),
                            ValueError(f"a plugin named {name!r} is already registered"))
            continue
        module_name = f"sarai_router_plugins_dir.{name}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            plugins.pm.register(module, name=name)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            _record_failure(plugins, name, str(file), exc)
            continue
        plugins.sources[name] = str(file)


def _record_failure(plugins: PluginSet, name: str, source: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"
    log.warning("plugin %s (%s) was not loaded: %s", name, source, message)
    plugins.failures.append(PluginFailure(name=name, source=source, error=message))


@attrs.frozen
class Answer:
    """A firstresult hook's answer and the plugin that gave it."""

    value: Any
    plugin: str


class Hooks:
    """Calls every hook with keyword arguments, isolating plugins that raise."""

    def __init__(self, plugins: PluginSet, config: "Config"):
        self.plugins = plugins
        self.pm = plugins.pm
        self.config = config
        # The latest plugin failures, for `route --json`; bounded, as a server lives long.
        self.errors: deque[str] = deque(maxlen=100)
        self._backends: dict[str, tuple[str, "BackendFactory"]] | None = None
        self._signals: dict[str, tuple[str, Callable[..., Any]]] | None = None
        self._tables: dict[str, tuple[str, type]] | None = None
        #: the core's own observers (the server's metrics): the same stream as ``observe``
        self._subscribers: list[tuple[str, Callable[[Event], Any]]] = []
        #: observers that raised, by name: ``sarai_observer_errors_total``
        self.observer_errors: Counter[str] = Counter()

    def _impls(self, hook_name: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last-registered, non-trylast implementation first.
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _call(self, impl: pluggy.HookImpl, hook_name: str, kwargs: dict[str, Any]) -> Any:
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        if not self.plugins.trace:
            return impl.function(**args)
        print(f"[trace] {hook_name} -> {impl.plugin_name}({', '.join(args)})", file=sys.stderr)
        result = impl.function(**args)
        print(f"[trace] {hook_name} <- {impl.plugin_name}: {result!r}", file=sys.stderr)
        return result

    def _skip(self, impl: pluggy.HookImpl, hook_name: str, exc: Exception) -> None:
        message = f"plugin {impl.plugin_name!r} raised in {hook_name}: {type(exc).__name__}: {exc}"
        log.warning("%s; skipped it", message)
        self.errors.append(message)

    def call_first(self, hook_name: str, *, _valid: Callable[[Any], bool] | None = None,
                   **kwargs: Any) -> Answer | None:
        """The first non-None answer; with ``_valid``, an answer it rejects is skipped too."""
        for impl in self._impls(hook_name):
            try:
                value = self._call(impl, hook_name, kwargs)
            except Exception as exc:
                self._skip(impl, hook_name, exc)
                continue
            if value is None:
                continue
            if _valid is not None and not _valid(value):
                self._skip(impl, hook_name, ValueError(f"invalid answer {value!r}"))
                continue
            return Answer(value=value, plugin=impl.plugin_name)
        return None

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        for impl in self._impls(hook_name):
            try:
                self._call(impl, hook_name, kwargs)
            except Exception as exc:
                self._skip(impl, hook_name, exc)

    def _collect(self, hook_name: str) -> dict[str, tuple[str, Any]]:
        collected: dict[str, tuple[str, Any]] = {}
        for impl in self._impls(hook_name):
            def register(name: str, thing: Any, _plugin: str = impl.plugin_name) -> None:
                # First registration wins: user plugins run before trylast defaults.
                collected.setdefault(name, (_plugin, thing))

            try:
                self._call(impl, hook_name, {"register": register, "config": self.config})
            except Exception as exc:
                self._skip(impl, hook_name, exc)
        return collected

    # -- the event stream ------------------------------------------------------------

    def subscribe(self, observer: Callable[[Event], Any], name: str) -> None:
        """Have ``observer(event)`` see every event, after the ``observe`` plugins, isolated
        like them. For the core's own observers (metrics); plugins implement ``observe``."""
        self._subscribers.append((name, observer))

    def unsubscribe(self, observer: Callable[[Event], Any]) -> None:
        self._subscribers = [(n, o) for n, o in self._subscribers if o != observer]

    def emit(self, kind: str, model: str | None = None, **data: Any) -> Event | None:
        """Tell every observer that ``kind`` happened (see ``events.EVENT_KINDS``); the
        current request's id is added when one is set and ``data`` has none. Returns the
        event, or None when nobody observes (then nothing is built)."""
        impls = self.pm.hook.observe.get_hookimpls()
        if not impls and not self._subscribers:
            return None
        if "request_id" not in data:
            request_id = REQUEST_ID.get()
            if request_id:
                data["request_id"] = request_id
        event = Event(kind=kind, model=model, time=time.time(), data=data)
        for impl in reversed(impls):
            try:
                self._call(impl, "observe", {"event": event})
            except Exception as exc:
                self._observer_failed(impl.plugin_name, kind, exc)
        for name, observer in self._subscribers:
            try:
                observer(event)
            except Exception as exc:
                self._observer_failed(name, kind, exc)
        return event

    def _observer_failed(self, name: str, kind: str, exc: Exception) -> None:
        self.observer_errors[name] += 1
        message = f"observer {name!r} raised on a {kind} event: {type(exc).__name__}: {exc}"
        log.warning("%s; the request goes on", message, exc_info=log.isEnabledFor(logging.DEBUG))
        self.errors.append(message)

    # -- extending the command line and the server -------------------------------------

    def register_commands(self, cli: "click.Group") -> None:
        self.call_each("register_commands", cli=cli)

    def routes(self) -> list[tuple[str, "BaseRoute"]]:
        """Every plugin's routes for ``serve``: ``[(plugin, route), ...]``."""
        from starlette.routing import BaseRoute

        found: list[tuple[str, BaseRoute]] = []
        for impl in self._impls("register_routes"):
            try:
                routes = self._call(impl, "register_routes", {})
            except Exception as exc:
                self._skip(impl, "register_routes", exc)
                continue
            for route in routes or ():
                if not isinstance(route, BaseRoute):
                    self._skip(impl, "register_routes", TypeError(
                        f"returned {type(route).__name__}; expected starlette routes"))
                    continue
                found.append((impl.plugin_name, route))
        return found

    def startup(self, engine: Any) -> None:
        self.call_each("startup", engine=engine)

    def shutdown(self, engine: Any) -> None:
        self.call_each("shutdown", engine=engine)

    # -- the typed surface the core uses ---------------------------------------------

    def signal_functions(self) -> dict[str, tuple[str, Callable[..., Any]]]:
        if self._signals is None:
            self._signals = self._collect("register_signals")
        return self._signals

    def backends(self) -> dict[str, tuple[str, "BackendFactory"]]:
        if self._backends is None:
            from .backend import as_backend

            self._backends = {kind: (plugin, as_backend(factory))
                              for kind, (plugin, factory) in self._collect("register_backends").items()}
        return self._backends

    def config_tables(self) -> dict[str, tuple[str, type]]:
        """``[plugins.NAME]`` schemas by table name: ``{name: (plugin, attrs_class)}``."""
        if self._tables is None:
            self._tables = self._collect("register_config_tables")
        return self._tables

    def backend(self, kind: str) -> "BackendFactory":
        found = self.backends().get(kind)
        if found is None:
            known = ", ".join(sorted(self.backends())) or "none"
            raise BackendError(f"no plugin registers backend {kind!r} (registered: {known}); "
                              "is its plugin disabled in [plugins] disable?")
        return found[1]

    def select_route(self, *, request: ChatRequest, signals: Mapping[str, Any],
                     models: Mapping[str, ModelSpec], residency: Residency) -> Answer | None:
        return self.call_first("select_route", request=request, signals=signals,
                               models=models, config=self.config, residency=residency)

    def select_eviction(self, *, candidates: Sequence[ResidentInfo], needed_mb: float,
                        loading: ModelSpec) -> str | None:
        names = {resident.name for resident in candidates}
        answer = self.call_first("select_eviction", candidates=candidates,
                                 needed_mb=needed_mb, loading=loading,
                                 _valid=lambda value: value in names)
        return None if answer is None else answer.value

    def model_expired(self, *, resident: ResidentInfo, now: float, cache: CacheConfig) -> bool:
        answer = self.call_first("model_expired", resident=resident, now=now, cache=cache)
        return bool(answer and answer.value)

    def transcribe(self, *, audio: AudioInput, request: ChatRequest | None,
                   language: str | None = None, cancel: threading.Event | None = None,
                   hold: Callable[..., Any] | None = None) -> Answer | None:
        """The first plugin's transcript. A plugin that raises a ``SaraiError`` (bad audio,
        a missing package) passes the word to the next; if none transcribes, the first
        such error is raised, since it says what is wrong. Other exceptions are plugin
        failures: logged and skipped like in every hook."""
        from .types import Transcript

        refusal: SaraiError | None = None
        kwargs = dict(audio=audio, request=request, language=language, config=self.config,
                      cancel=cancel, hold=hold)
        for impl in self._impls("transcribe"):
            try:
                value = self._call(impl, "transcribe", kwargs)
            except SaraiError as exc:
                refusal = refusal or exc
                continue
            except Exception as exc:
                self._skip(impl, "transcribe", exc)
                continue
            if value is None:
                continue
            if not isinstance(value, Transcript) or not isinstance(value.text, str):
                self._skip(impl, "transcribe", ValueError(
                    f"returned {type(value).__name__}; expected a sarai_router.types.Transcript"))
                continue
            return Answer(value=value, plugin=impl.plugin_name)
        if refusal is not None:
            raise refusal
        return None

    def prewarm_models(self, *, request: ChatRequest, signals: Mapping[str, Any],
                       decision: RouteDecision, loaded: Iterable[str]) -> list[tuple[str, str]]:
        """Every plugin's pre-warm wishes, merged in call order: ``[(model, plugin), ...]``."""
        wanted: dict[str, str] = {}
        kwargs = dict(request=request, signals=signals, decision=decision,
                      loaded=frozenset(loaded), models=self.config.models, config=self.config)
        for impl in self._impls("prewarm_models"):
            try:
                names = self._call(impl, "prewarm_models", kwargs)
            except Exception as exc:
                self._skip(impl, "prewarm_models", exc)
                continue
            if isinstance(names, str):  # a lone name is a common slip; take it
                names = [names]
            for name in names or ():
                wanted.setdefault(name, impl.plugin_name)
        return list(wanted.items())

    def describe(self) -> list[dict[str, Any]]:
        """Every registered plugin with its hooks, for ``sarai-router plugins``."""
        rows = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:  # pluggy keeps blocked names as None entries
                continue
            hooks = sorted(
                caller.name for caller in (self.pm.get_hookcallers(plugin) or [])
            )
            rows.append({
                "name": name,
                "source": self.plugins.sources.get(name, "registered"),
                "hooks": hooks,
                "default": name in DEFAULT_PLUGINS,
            })
        return rows
