"""The config's frozen attrs classes, their cattrs converter, and the checks that need no plugin.

Loading a file (TOML text -> a bound ``Config``) is in ``loading``, above the plugins.

Every problem in a file is collected and reported at once, each with the file and the key
path (``cache.max_loaded``), so a user fixes them all in one go.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import attrs
import cattrs

# ConfigError too: callers catch it from here, where the config is.
from .errors import ConfigError, not_configured  # noqa: F401
from .load_queue import QUEUE_ORDERS
from .sampling import SAMPLING_KEYS, Sampling, sampling_problems

CONFIG_ENV = "SARAI_ROUTER_CONFIG"
MODELS_DIR_ENV = "SARAI_ROUTER_MODELS_DIR"
LOCAL_CONFIG_NAME = "sarai.toml"
BUILTIN_CONFIG_LABEL = "<built-in default config>"
MODALITIES = ("text", "image", "audio")
#: ``[server] batching``: see ServerConfig
BATCHING_MODES = ("auto", "off")


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
    # When models can't all be resident: "grouped" (requests for a resident model first)
    # or "fifo" (arrival order across models).
    queue_order: str = "grouped"
    # grouped: the longest a request waiting to load its model is overtaken by requests
    # for the resident one.
    max_queue_wait_seconds: float = 30.0


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
    #: "auto": `serve` runs GGUF models that name no backend under a managed llama-server
    #: (continuous batching) when one is installed; "off": in process, one request at a time.
    batching: str = "auto"
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
class ModelSpec(Sampling):
    """One ``[models.NAME]`` table: the keys every backend shares (the sampling defaults
    among them, from :class:`~sarai_router.sampling.Sampling`), and ``settings``.

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
    #: whether the table wrote ``backend`` (else it is the default, which `serve` may
    #: replace with a batching one)
    backend_explicit: bool = attrs.field(default=True, eq=False, repr=False)

    def __getattr__(self, key: str) -> Any:
        # Only reached for names that are not fields: a backend key, read from settings.
        if key.startswith("_") or key in ("settings", "backend_keys", "backend_explicit"):
            raise AttributeError(key)
        settings = object.__getattribute__(self, "settings")
        if settings is not None and hasattr(settings, key):
            return getattr(settings, key)
        raise AttributeError(f"model {self.name!r} ({self.backend}) has no setting {key!r}")

    def supports(self, modality: str) -> bool:
        return modality in self.modalities


#: The keys of a ``[models.NAME]`` table that are not the backend's own.
COMMON_MODEL_KEYS = frozenset(f.name for f in attrs.fields(ModelSpec)) - {
    "name", "settings", "backend_keys", "backend_explicit"}


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
        return converter.structure(dict(self.plugins.tables.get(name, {})), cls)

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


converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, accepted: type | tuple[type, ...]) -> Callable[[Any, Any], Any]:
    # cattrs' default calls kind(value): pinned = "false" -> True, "2" -> 2, "abc" -> 'a','b','c'.
    def structure(value: Any, _type: Any) -> Any:
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


for _kind, _accepted in ((int, int), (float, (int, float)), (bool, bool), (str, str)):
    converter.register_structure_hook(_kind, _strict(_kind, _accepted))
converter.register_structure_hook_func(
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
    if cache.queue_order not in QUEUE_ORDERS:
        problems.append(f"{src}: cache.queue_order: must be one of "
                        f"{', '.join(map(repr, QUEUE_ORDERS))}, got {cache.queue_order!r}")
    if cache.max_queue_wait_seconds < 0:
        problems.append(f"{src}: cache.max_queue_wait_seconds: must be >= 0")
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
    if server.batching not in BATCHING_MODES:
        problems.append(f"{src}: server.batching: must be one of "
                        f"{', '.join(map(repr, BATCHING_MODES))}, got {server.batching!r}")
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
    data = converter.unstructure(attrs.evolve(config, plugin_set=None))
    # Where the config came from is not a key a file may set.
    for key in ("source", "models_dir", "plugin_set"):
        data.pop(key, None)
    for name, spec in data["models"].items():
        spec.pop("name", None)
        spec.pop("backend_explicit", None)
        # The sampling keys (a base class's, so first) after the table's own.
        for key in SAMPLING_KEYS:
            if key in spec:
                spec[key] = spec.pop(key)
        keys = spec.pop("backend_keys", {})
        # Unbound (no plugin claims its backend here): the keys as written.
        spec.update(spec.pop("settings") or keys)
    data["plugins"].update(data["plugins"].pop("tables"))
    return data
