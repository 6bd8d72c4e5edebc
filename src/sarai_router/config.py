"""TOML config -> frozen attrs classes, through one cattrs converter.

Every problem in a file is collected and reported at once, each with the file and the key
path (``cache.max_loaded``), so a user fixes them all in one go.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import attrs
import cattrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import ConfigError, not_configured

log = logging.getLogger(__name__)

CONFIG_ENV = "SARAI_ROUTER_CONFIG"
MODELS_DIR_ENV = "SARAI_ROUTER_MODELS_DIR"
LOCAL_CONFIG_NAME = "sarai.toml"
BUILTIN_CONFIG_LABEL = "<built-in default config>"
MODALITIES = ("text", "image", "audio")


#: Tables under ``[plugins]`` that are settings of the plugin system itself, not a plugin's.
PLUGINS_OWN_KEYS = ("dirs", "disable")


@attrs.frozen
class RoutingConfig:
    default_model: str = "fast"
    #: fallbacks one request may take before its error is returned: a long chain (or a
    #: ring of models) must not hold a request for minutes
    max_fallbacks: int = 5


@attrs.frozen
class CacheConfig:
    ttl_seconds: float = 60.0
    max_loaded: int = 2
    ram_budget_mb: float = 12288.0
    reap_interval_seconds: float = 5.0


@attrs.frozen
class PluginsConfig:
    dirs: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    #: ``[plugins.NAME]`` tables, checked against the schema a plugin registered for NAME.
    tables: dict[str, dict[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Requests allowed to wait for one model instance; one more is refused with 429.
    queue_size: int = 8
    max_body_bytes: int = 16 * 1024 * 1024
    # Empty: no key, unless $SARAI_ROUTER_API_KEY or --api-key sets one.
    api_key: str = ""
    # A request asking for more tokens than this is refused (HTTP 400).
    max_tokens_cap: int = 8192
    # Longer prompts are refused before they are tokenised (HTTP 400).
    max_prompt_chars: int = 262144
    # Host names answered besides IP literals and localhost ("*": any; DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # Origins a browser page may call from (CORS); empty: none.
    cors_origins: tuple[str, ...] = ()
    # Listen beyond loopback with no API key (else `serve` refuses to start).
    allow_unauthenticated: bool = False
    # A request's headers must arrive within this (slow clients are disconnected).
    header_timeout_seconds: float = 10.0
    # ... and its body within this (HTTP 408 after it).
    body_timeout_seconds: float = 60.0
    # Request line + headers larger than this get HTTP 431.
    max_header_bytes: int = 16384
    #: How long a stop (Ctrl-C, SIGTERM) may take: answers in flight are stopped at once,
    #: queued requests get 503 at once, and the process exits within this many seconds.
    shutdown_grace_seconds: float = 10.0
    #: The longest idle time a client's ``keep_alive`` (Ollama dialect) may ask for a
    #: model; longer asks are cut to this. 0: clients may only unload (keep_alive 0).
    keep_alive_max_seconds: float = 300.0


@attrs.frozen
class GenerationConfig:
    """``[generation]``: what every generation shares, whatever the model."""

    #: Stop an answer that keeps repeating the same passage (a sampling loop) instead of
    #: letting it run to max_tokens. ``[models.NAME] runaway_guard`` overrides it per model.
    runaway_guard: bool = True
    #: The shortest passage that counts as a repeat, in characters (whitespace collapsed).
    runaway_min_chars: int = 16
    #: The longest passage looked for, in characters.
    runaway_max_chars: int = 400
    #: Stop once the same passage has come this many times in a row, or the same line
    #: (of at least ``runaway_min_chars``, list numbering aside) this many times at all.
    runaway_repeats: int = 4
    #: The longest one answer may hold its model, in seconds (0: no bound); past it the
    #: answer ends with finish_reason "length". ``[models.NAME]`` overrides it.
    max_request_seconds: float = 600.0
    #: The longest choosing one token may take (a grammar's work, not the model's), in
    #: seconds (0: no bound); past it the answer ends the same way.
    max_token_sampling_seconds: float = 2.0


@attrs.frozen
class BenchConfig:
    """KPI targets for ``sarai-router bench`` (the field report's, by default)."""

    target_tps_min: float = 7.0
    target_tps_max: float = 15.0
    target_p50_seconds: float = 15.0
    target_speedup_min: float = 2.0
    target_speedup_max: float = 2.5
    target_ram_mb: float = 12288.0
    target_overhead_ratio: float = 0.98
    #: Speech to text: transcription time over clip length (``bench --audio``).
    target_rtf_max: float = 0.5
    target_decision_p99_ms: float = 5.0


@attrs.frozen
class PathsConfig:
    # Empty: $SARAI_ROUTER_MODELS_DIR, else the per-user cache folder.
    models_dir: str = ""


@attrs.frozen
class ModelSpec:
    """One ``[models.NAME]`` table: the keys every backend shares, and ``settings``.

    ``settings`` holds the backend's own keys (``n_batch`` for ``llama_cpp``, ``base_url``
    for ``openai``...), structured by the settings class the backend declares; they read
    as attributes of the spec too (``spec.n_batch``). ``path`` may use ``{models_dir}``.
    """

    path: str = ""
    backend: str = "llama_cpp"
    name: str = ""
    n_ctx: int = 2048
    max_tokens: int = 512
    modalities: tuple[str, ...] = ("text",)
    pinned: bool = False
    ttl_seconds: float | None = None
    sha256: str = ""
    description: str = ""
    #: models tried in order when this one fails before its first token (load failure,
    #: refused connection, 5xx, timeout)
    fallbacks: tuple[str, ...] = ()
    # Sampling defaults for this model (None: the model file's recommendation, else the
    # built-in one); a request's own values override them. See backend.SAMPLING_KEYS.
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    #: None: ``[generation] runaway_guard``
    runaway_guard: bool | None = None
    #: None: ``[generation] max_request_seconds`` / ``max_token_sampling_seconds``
    max_request_seconds: float | None = None
    max_token_sampling_seconds: float | None = None
    #: loaded for embeddings only (``/v1/embeddings``, ``/api/embed``), not for chat
    embedding: bool = False
    settings: Any = None
    #: the backend's keys as written, kept to bind them again to other plugins
    backend_keys: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def __getattr__(self, key: str) -> Any:
        # Only reached for names that are not fields: a backend key, read from settings.
        if key.startswith("_") or key in ("settings", "backend_keys"):
            raise AttributeError(key)
        settings = object.__getattribute__(self, "settings")
        if settings is not None and hasattr(settings, key):
            return getattr(settings, key)
        raise AttributeError(f"model {self.name!r} ({self.backend}) has no setting {key!r}")

    def supports(self, modality: str) -> bool:
        return modality in self.modalities


#: The keys of a ``[models.NAME]`` table that are not the backend's own.
COMMON_MODEL_KEYS = frozenset(f.name for f in attrs.fields(ModelSpec)) - {
    "name", "settings", "backend_keys"}


@attrs.frozen
class Config:
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    plugins: PluginsConfig = PluginsConfig()
    paths: PathsConfig = PathsConfig()
    server: ServerConfig = ServerConfig()
    generation: GenerationConfig = GenerationConfig()
    bench: BenchConfig = BenchConfig()
    models: dict[str, ModelSpec] = attrs.field(factory=dict)
    source: str = BUILTIN_CONFIG_LABEL
    models_dir: str = ""
    #: The plugins discovered for this config (bound once, reused by the router).
    plugin_set: Any = attrs.field(default=None, eq=False, repr=False)  # a PluginSet

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        """Plugin ``name``'s ``[plugins.NAME]`` table, read-only; empty when absent.

        When the plugin registered a schema for its table, missing keys hold their defaults.
        """
        return MappingProxyType(self.plugins.tables.get(name, {}))

    def plugin_settings(self, name: str, cls: type) -> Any:
        """Plugin ``name``'s table structured as ``cls`` (the class it registered)."""
        return _converter.structure(dict(self.plugins.tables.get(name, {})), cls)

    def ttl_for(self, spec: ModelSpec) -> float:
        return self.cache.ttl_seconds if spec.ttl_seconds is None else spec.ttl_seconds

    def runaway_guard_for(self, spec: ModelSpec) -> bool:
        guard = spec.runaway_guard
        return self.generation.runaway_guard if guard is None else guard

    def time_bounds_for(self, spec: ModelSpec) -> tuple[float, float]:
        """(max_request_seconds, max_token_sampling_seconds) for ``spec``; 0: no bound."""
        generation = self.generation
        total = spec.max_request_seconds
        token = spec.max_token_sampling_seconds
        return (generation.max_request_seconds if total is None else total,
                generation.max_token_sampling_seconds if token is None else token)


_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, accepted: type | tuple[type, ...]) -> Callable[[Any, Any], Any]:
    # cattrs' default calls kind(value): pinned = "false" -> True, "2" -> 2, "abc" -> 'a','b','c'.
    def structure(value: Any, _type: Any) -> Any:
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


for _kind, _accepted in ((int, int), (float, (int, float)), (bool, bool), (str, str)):
    _converter.register_structure_hook(_kind, _strict(_kind, _accepted))
_converter.register_structure_hook_func(
    lambda t: t == tuple[str, ...],
    lambda value, _type: tuple(_strict(str, str)(v, str) for v in _strict(list, list)(value, list)),
)


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        # Relative to the working directory, like any path given on a command line.
        return Path(env).expanduser().absolute()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "sarai-router" / "models"


def builtin_config_text() -> str:
    # Next to this module (package data); importlib.resources would cost `route` ~10 ms.
    return Path(__file__).with_name("default_config.toml").read_text(encoding="utf-8")


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """``--config``, else ``$SARAI_ROUTER_CONFIG``, else ``./sarai.toml``, else None (built-in)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path.cwd() / LOCAL_CONFIG_NAME
    return local if local.is_file() else None


def load_config(path: str | os.PathLike[str] | None = None, *, check_files: bool = False) -> Config:
    """Load ``path`` (or the discovered/built-in config); raise ConfigError with every problem."""
    config_path = find_config_path(path)
    if config_path is None:
        return parse_config(builtin_config_text(), source=BUILTIN_CONFIG_LABEL, base_dir=None,
                            check_files=check_files)
    label = str(config_path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{label}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}: not a UTF-8 text file (byte {exc.start}); "
                           "a config is TOML text"]) from None
    return parse_config(text, source=label, base_dir=config_path.resolve().parent,
                        check_files=check_files)


def parse_config(
    text: str, *, source: str, base_dir: Path | None, check_files: bool = False
) -> Config:
    """Parse TOML ``text`` into a bound config: plugins discovered, backend keys and plugin
    tables checked against what the plugins declare. Every problem is raised at once."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    split = _split_plugin_owned(raw, source, problems)
    config = _structure(split.core, Config, source, "", problems)
    if config is None:
        raise ConfigError(problems)
    config = _resolve_paths(config, source, base_dir)
    problems.extend(semantic_problems(config, check_files=check_files))
    config = _bind(config, split, problems, base_dir=base_dir, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return config


@attrs.define
class _Split:
    """A raw config with the keys that plugins own taken out, and where each came from."""

    core: dict[str, Any]
    #: model name -> the keys of its table that belong to its backend
    backend_keys: dict[str, dict[str, Any]]
    #: plugin table name -> the key path it was written under (for messages)
    table_paths: dict[str, str]


def _split_plugin_owned(raw: Mapping[str, Any], source: str, problems: list[str]) -> _Split:
    raw = _deep_copy(raw)
    for reserved in ("source", "models_dir", "plugin_set"):
        if reserved in raw:
            hint = " (did you mean [paths] models_dir?)" if reserved == "models_dir" else ""
            problems.append(f"{source}: {reserved}: unknown key{hint}")
            raw.pop(reserved)
    backend_keys: dict[str, dict[str, Any]] = {}
    models_raw = raw.get("models", {})
    if isinstance(models_raw, dict):
        for name, table in models_raw.items():
            if not isinstance(table, dict):
                continue
            if "name" in table:
                problems.append(f"{source}: models.{name}.name: unknown key "
                                "(a model's name is its table name)")
            for reserved in ("settings", "backend_keys"):
                if reserved in table:
                    problems.append(f"{source}: models.{name}.{reserved}: unknown key "
                                    "(a backend's keys go in the model's table itself)")
                    table.pop(reserved)
            backend_keys[name] = {k: table.pop(k) for k in list(table)
                                  if k not in COMMON_MODEL_KEYS and k != "name"}
            table["name"] = name
    table_paths: dict[str, str] = {}
    plugins_raw = raw.get("plugins")
    if isinstance(plugins_raw, dict):
        if "tables" in plugins_raw:
            problems.append(f"{source}: plugins.tables: unknown key (write [plugins.NAME])")
            plugins_raw.pop("tables")
        tables = {k: plugins_raw.pop(k) for k in list(plugins_raw)
                  if k not in PLUGINS_OWN_KEYS and isinstance(plugins_raw[k], dict)}
        table_paths = {name: f"plugins.{name}" for name in tables}
        plugins_raw["tables"] = tables
    routing_raw = raw.get("routing")
    if isinstance(routing_raw, dict) and isinstance(routing_raw.get("heuristic"), dict):
        # [routing.heuristic] predates plugin tables; it still works, [plugins.heuristic] wins.
        log.warning("%s: [routing.heuristic] is deprecated: move its keys to "
                    "[plugins.heuristic]", source)
        old = routing_raw.pop("heuristic")
        plugins_raw = raw.setdefault("plugins", {})
        if isinstance(plugins_raw, dict):
            tables = plugins_raw.setdefault("tables", {})
            tables["heuristic"] = {**old, **tables.get("heuristic", {})}
            table_paths.setdefault("heuristic", "routing.heuristic")
    return _Split(core=raw, backend_keys=backend_keys, table_paths=table_paths)


def _structure(raw: dict[str, Any], kind: type, source: str, prefix: str,
               problems: list[str], owner_hint: Callable[[str], str] = lambda key: "") -> Any:
    """Structure ``raw`` as ``kind``; on type errors or unknown keys, report each one, drop
    the bad keys and structure again, so the remaining problems are reported in the same pass.
    ``prefix`` is the key path of ``raw`` in the file (``models.fast``)."""
    for _ in range(4):
        try:
            return _converter.structure(raw, kind)
        except Exception as exc:  # cattrs raises an exception group with every problem
            bad_paths = []
            for message in cattrs.transform_error(exc, path="$"):
                lines, paths = _describe_cattrs_message(message, raw, prefix, owner_hint)
                problems.extend(f"{source}: {line}" for line in lines)
                bad_paths.extend(paths)
            if not bad_paths or not all(_drop(raw, p) for p in bad_paths):
                return None
    return None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _split_path(where: str) -> list[str]:
    """``$.models['fast'].n_ctx`` -> ``['models', 'fast', 'n_ctx']``."""
    key = where.removeprefix("$").replace("['", ".").replace("']", "")
    key = key.replace("[", ".").replace("]", "")
    return [part for part in key.split(".") if part]


def _lookup(raw: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(raw, Mapping) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return None
    return raw


def _drop(raw: dict[str, Any], parts: list[str]) -> bool:
    parent = _lookup(raw, parts[:-1]) if parts[:-1] else raw
    if isinstance(parent, dict) and parts and parts[-1] in parent:
        del parent[parts[-1]]
        return True
    if isinstance(parent, list) and parts and parts[-1].isdigit():
        del parent[int(parts[-1])]
        return True
    return False


def _describe_cattrs_message(message: str, raw: Mapping[str, Any], prefix: str,
                              owner_hint: Callable[[str], str]) -> tuple[list[str], list[list[str]]]:
    """Problem lines (``cache.max_loaded: expected int, got 'x'``) and the key paths to drop."""
    text, sep, where = message.rpartition(" @ ")
    if not sep:
        return [message], []
    parts = _split_path(where)
    key = ".".join([prefix, *parts] if prefix else parts)
    if text.startswith("extra fields found"):
        fields = [f.strip() for f in text.split("(", 1)[-1].rstrip(")").split(",")]
        scope = f"{key}." if key else ""
        return ([f"{scope}{f}: unknown key{owner_hint(f)}" for f in fields],
                [parts + [f] for f in fields])
    if text.startswith("required field missing"):
        # Drop the table that lacks it, so the rest can still be checked.
        return [f"{key}: required key missing"], [parts[:-1]] if len(parts) > 1 else []
    value = _lookup(raw, parts)
    got = f", got {value!r}" if value is not None else ""
    return [f"{key or '(top level)'}: {text.replace('invalid value for type, ', '')}{got}"], [parts]


def _resolve_paths(config: Config, source: str, base_dir: Path | None) -> Config:
    models_dir = (
        Path(config.paths.models_dir).expanduser() if config.paths.models_dir else default_models_dir()
    )
    if base_dir is not None and not models_dir.is_absolute():
        models_dir = base_dir / models_dir
    resolve = path_resolver(models_dir, base_dir)
    models = {name: attrs.evolve(spec, path=resolve(spec.path))
              for name, spec in config.models.items()}
    dirs = tuple(resolve(d) for d in config.plugins.dirs)
    return attrs.evolve(
        config,
        models=models,
        plugins=attrs.evolve(config.plugins, dirs=dirs),
        source=source,
        models_dir=str(models_dir),
    )


def path_resolver(models_dir: Path, base_dir: Path | None) -> Callable[[str], str]:
    """``{models_dir}`` expanded, ``~`` expanded, relative paths against the config's folder."""

    def resolve(value: str) -> str:
        if not value:
            return value
        expanded = Path(value.replace("{models_dir}", str(models_dir))).expanduser()
        if not expanded.is_absolute() and base_dir is not None:
            expanded = base_dir / expanded
        return os.path.normpath(expanded)

    return resolve


#: Mark a settings field as a file path: resolved like ``path`` (``{models_dir}``, relative
#: to the config's folder). ``attrs.field(default="", metadata=PATH_SETTING)``.
PATH_SETTING = {"sarai_path": True}


@attrs.frozen
class NoSettings:
    """The settings of a backend or plugin that declares no keys of its own."""


def _bind(config: Config, split: _Split, problems: list[str], *, base_dir: Path | None,
          check_files: bool) -> Config:
    """Discover the plugins, then structure each model's backend keys and each plugin table
    with the class its plugin declared, and let them check themselves."""
    from .plugins import build_plugins

    models = {name: attrs.evolve(spec, backend_keys=split.backend_keys.get(name, {}))
              for name, spec in config.models.items()}
    config = attrs.evolve(config, models=models)
    return bind_plugins(config, build_plugins(config), problems, base_dir=base_dir,
                        strict=check_files, check_files=check_files,
                        table_paths=split.table_paths)


def rebind(config: Config, plugin_set: Any) -> Config:
    """``config`` bound to another plugin set (one with plugins registered in code): the
    backend keys and plugin tables are structured again with what those plugins declare."""
    problems: list[str] = []
    base_dir = None if config.source == BUILTIN_CONFIG_LABEL else Path(config.source).resolve().parent
    bound = bind_plugins(config, plugin_set, problems, base_dir=base_dir, strict=False,
                         check_files=False, table_paths={})
    if problems:
        raise ConfigError(problems)
    return bound


def bind_plugins(config: Config, plugin_set: Any, problems: list[str], *,
                 base_dir: Path | None, strict: bool, check_files: bool,
                 table_paths: Mapping[str, str]) -> Config:
    """Structure backend keys and plugin tables with what ``plugin_set`` declares.

    ``strict`` (``config check``): a backend kind or a plugin table that no plugin claims is
    a problem. Otherwise it is left unbound (the first load of such a model fails naming
    the backend), so that plugins registered in code after loading can still claim it.
    """
    from .plugins import Hooks

    src = config.source
    hooks = Hooks(plugin_set, config)
    backends = {kind: factory for kind, (_, factory) in hooks.backends().items()}
    owners: dict[str, list[str]] = {}

    def owners_of(key: str) -> list[str]:
        # Only for an error's hint: asking every backend for its keys imports them all.
        if not owners:
            for kind, factory in backends.items():
                for field in attrs.fields(settings_class_of(factory)):
                    owners.setdefault(field.name, []).append(kind)
        return owners.get(key, [])
    resolve = path_resolver(Path(config.models_dir), base_dir)
    models = {}
    for name, spec in config.models.items():
        factory = backends.get(spec.backend)
        if factory is None:
            if strict:
                problems.append(f"{src}: models.{name}.backend: no plugin registers backend "
                                f"{spec.backend!r} (registered: "
                                f"{', '.join(sorted(backends)) or 'none'})")
            models[name] = attrs.evolve(spec, settings=None)
            continue

        def owner_hint(key: str, _kind: str = spec.backend) -> str:
            others = [k for k in owners_of(key) if k != _kind]
            return (f" for backend {_kind!r} (a key of backend {', '.join(map(repr, others))})"
                    if others else f" for backend {_kind!r}")

        cls = settings_class_of(factory)
        settings = _structure(_deep_copy(spec.backend_keys), cls, src, f"models.{name}",
                              problems, owner_hint)
        if settings is None:
            settings = cls()
        settings = _resolve_setting_paths(settings, resolve)
        models[name] = spec = attrs.evolve(spec, settings=settings)
        check = getattr(factory, "check", None)
        if check is not None:
            problems.extend(f"{src}: models.{name}.{key}: {message}"
                            for key, message in check(spec, config=config, check_files=check_files))
    tables = _bind_tables(config, hooks, problems, strict=strict, table_paths=table_paths)
    bound = attrs.evolve(config, models=models, plugin_set=plugin_set,
                         plugins=attrs.evolve(config.plugins, tables=tables))
    hooks.config = bound
    for name, (plugin, cls) in hooks.config_tables().items():
        check = getattr(cls, "check", None)
        if check is not None:
            path = table_paths.get(name, f"plugins.{name}")
            settings = _converter.structure(dict(tables.get(name, {})), cls)
            problems.extend(f"{src}: {path}.{key}: {message}"
                            for key, message in check(settings, bound))
    return bound


def _bind_tables(config: Config, hooks: Any, problems: list[str], *, strict: bool,
                 table_paths: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    src = config.source
    schemas = hooks.config_tables()
    known_plugins = set(hooks.plugins.sources) | set(config.plugins.disable)
    tables: dict[str, dict[str, Any]] = {}
    for name, table in config.plugins.tables.items():
        path = table_paths.get(name, f"plugins.{name}")
        if name in schemas:
            settings = _structure(_deep_copy(table), schemas[name][1], src, path, problems)
            if settings is not None:
                tables[name] = _converter.unstructure(settings)
            continue
        if strict and name not in known_plugins:
            problems.append(f"{src}: {path}: no plugin named {name!r} is loaded "
                            f"(loaded: {', '.join(sorted(hooks.plugins.sources))})")
        tables[name] = dict(table)
    for name, (_, cls) in schemas.items():
        # Defaults for a plugin whose table is absent, so plugin_config() has every key.
        tables.setdefault(name, _converter.unstructure(cls()))
    return tables


def settings_class_of(factory: Any) -> type:
    return getattr(factory, "settings_class", None) or NoSettings


def _resolve_setting_paths(settings: Any, resolve: Callable[[str], str]) -> Any:
    changes = {field.name: resolve(getattr(settings, field.name))
               for field in attrs.fields(type(settings))
               if field.metadata.get("sarai_path") and getattr(settings, field.name)}
    return attrs.evolve(settings, **changes) if changes else settings


def semantic_problems(config: Config, *, check_files: bool) -> list[str]:
    """What a well-typed config can still get wrong: dangling names, bad ranges.

    A backend checks its own keys (and its files) when the config is bound.
    """
    src = config.source
    problems: list[str] = _non_finite_numbers(config)
    names = set(config.models)
    if not names:
        problems.append(f"{src}: models: no model is configured (add a [models.NAME] table)")
    embedders = {n for n, s in config.models.items() if s.embedding}
    if config.routing.default_model in embedders:
        problems.append(f"{src}: routing.default_model: {config.routing.default_model!r} is "
                        "an embedding model (embedding = true); chat cannot be routed to it")
    if names and config.routing.default_model not in names:
        problems.append(f"{src}: routing.default_model: routes to "
                        f"{not_configured(config.routing.default_model, names)}")
    cache = config.cache
    if cache.ttl_seconds < 0:
        problems.append(f"{src}: cache.ttl_seconds: must be >= 0")
    if cache.max_loaded < 1:
        problems.append(f"{src}: cache.max_loaded: must be >= 1, got {cache.max_loaded}")
    if cache.ram_budget_mb <= 0:
        problems.append(f"{src}: cache.ram_budget_mb: must be > 0")
    if cache.reap_interval_seconds <= 0:
        problems.append(f"{src}: cache.reap_interval_seconds: must be > 0")
    server = config.server
    if not 0 < server.port < 65536:
        problems.append(f"{src}: server.port: must be 1..65535, got {server.port}")
    if server.queue_size < 0:
        problems.append(f"{src}: server.queue_size: must be >= 0")
    if server.max_body_bytes < 1024:
        problems.append(f"{src}: server.max_body_bytes: must be >= 1024")
    if server.max_tokens_cap < 1:
        problems.append(f"{src}: server.max_tokens_cap: must be >= 1")
    if server.max_prompt_chars < 1:
        problems.append(f"{src}: server.max_prompt_chars: must be >= 1")
    if server.header_timeout_seconds <= 0 or server.body_timeout_seconds <= 0:
        problems.append(f"{src}: server.header_timeout_seconds and body_timeout_seconds: "
                        "must be > 0")
    if server.max_header_bytes < 1024:
        problems.append(f"{src}: server.max_header_bytes: must be >= 1024")
    if server.shutdown_grace_seconds < 0:
        problems.append(f"{src}: server.shutdown_grace_seconds: must be >= 0")
    if server.keep_alive_max_seconds < 0:
        problems.append(f"{src}: server.keep_alive_max_seconds: must be >= 0")
    generation = config.generation
    if generation.runaway_min_chars < 1:
        problems.append(f"{src}: generation.runaway_min_chars: must be >= 1")
    if generation.runaway_max_chars < generation.runaway_min_chars:
        problems.append(f"{src}: generation.runaway_max_chars: must be >= runaway_min_chars "
                        f"({generation.runaway_min_chars})")
    if generation.runaway_repeats < 2:
        problems.append(f"{src}: generation.runaway_repeats: must be >= 2")
    for key in ("max_request_seconds", "max_token_sampling_seconds"):
        if getattr(generation, key) < 0:
            problems.append(f"{src}: generation.{key}: must be >= 0 (0: no bound)")
    pinned = [n for n, s in config.models.items() if s.pinned]
    if config.routing.max_fallbacks < 0:
        problems.append(f"{src}: routing.max_fallbacks: must be >= 0")
    if len(pinned) > cache.max_loaded:
        problems.append(f"{src}: cache.max_loaded: {cache.max_loaded} is fewer than the "
                        f"{len(pinned)} pinned models ({', '.join(pinned)})")
    for name, spec in config.models.items():
        key = f"models.{name}"
        for field in ("n_ctx", "max_tokens"):
            if getattr(spec, field) < 1:
                problems.append(f"{src}: {key}.{field}: must be >= 1")
        if spec.ttl_seconds is not None and spec.ttl_seconds < 0:
            problems.append(f"{src}: {key}.ttl_seconds: must be >= 0")
        for field in ("max_request_seconds", "max_token_sampling_seconds"):
            value = getattr(spec, field)
            if value is not None and value < 0:
                problems.append(f"{src}: {key}.{field}: must be >= 0 (0: no bound)")
        unknown = [m for m in spec.modalities if m not in MODALITIES]
        if unknown:
            problems.append(f"{src}: {key}.modalities: unknown modality {', '.join(map(repr, unknown))}"
                            f" (known: {', '.join(MODALITIES)})")
        if "text" not in spec.modalities:
            problems.append(f"{src}: {key}.modalities: must include 'text'")
        for index, other in enumerate(spec.fallbacks):
            where = f"{src}: {key}.fallbacks[{index}]"
            if other == name:
                problems.append(f"{where}: a model cannot fall back to itself")
            elif other not in names:
                problems.append(f"{where}: {not_configured(other, names)}")
            elif other in spec.fallbacks[:index]:
                problems.append(f"{where}: {other!r} is listed twice")
        problems.extend(f"{src}: {key}.{problem}" for problem in sampling_problems(spec))
    if check_files:
        for index, directory in enumerate(config.plugins.dirs):
            if not Path(directory).is_dir():
                problems.append(f"{src}: plugins.dirs[{index}]: not a directory: {directory}")
    return problems


def fallback_cycles(models: Mapping[str, ModelSpec]) -> list[list[str]]:
    """Each cycle of the ``fallbacks`` graph once, as ``[a, b, ..., a]`` (a self-loop is a
    problem of its own, reported by the checks). A cycle is allowed, since a request tries
    each model at most once, but ``config check`` shows it. Walked with an explicit stack,
    so 1,500 models in one ring cost no recursion."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in models:
        if start in state:
            continue
        path = [start]
        state[start] = 1
        stack = [iter(models[start].fallbacks)]
        while stack:
            other = next(stack[-1], None)
            if other is None:
                stack.pop()
                state[path.pop()] = 2
            elif other not in models or other == path[-1]:
                continue
            elif state.get(other) == 1:
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                state[other] = 1
                path.append(other)
                stack.append(iter(models[other].fallbacks))
    return cycles


#: The range of each sampling setting (the OpenAI API's where it has one).
SAMPLING_RANGES: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0), "top_k": (0, 1_000_000), "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0), "repeat_penalty": (0.0, 10.0), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def sampling_problems(values: Any) -> list[str]:
    """``key: must be ...`` for each sampling setting of ``values`` out of its range."""
    problems = []
    for key, (low, high) in SAMPLING_RANGES.items():
        value = getattr(values, key, None)
        if value is not None and not low <= value <= high:
            problems.append(f"{key}: must be between {low:g} and {high:g}, got {value}")
    return problems


def gguf_problems(path: str) -> list[str]:
    """Why ``path`` is not a readable GGUF file (empty when it is)."""
    from .gguf_info import GGUFError, read_info

    try:
        read_info(path)
    except GGUFError as exc:
        return [str(exc)]
    return []


def _non_finite_numbers(config: Config) -> list[str]:
    """TOML allows nan and inf; no setting here means anything with them."""
    problems = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{config.source}: {key}: must be a finite number, got {value}")
        elif attrs.has(type(value)):  # walked as is: unstructuring the config costs more
            for field in attrs.fields(type(value)):
                if field.name != "plugin_set":
                    walk(getattr(value, field.name), f"{key}.{field.name}" if key else field.name)
        elif isinstance(value, Mapping):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else name)

    walk(config, "")
    return problems


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data (resolved paths), for ``config show``; a file with this
    content loads as the same config."""
    data = _converter.unstructure(attrs.evolve(config, plugin_set=None))
    # Where the config came from is not a key a file may set.
    for key in ("source", "models_dir", "plugin_set"):
        data.pop(key, None)
    for name, spec in data["models"].items():
        spec.pop("name", None)
        keys = spec.pop("backend_keys", {})
        # Unbound (no plugin claims its backend here): the keys as written.
        spec.update(spec.pop("settings") or keys)
    data["plugins"].update(data["plugins"].pop("tables"))
    return data
