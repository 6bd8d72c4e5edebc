"""TOML config -> frozen attrs classes, through one cattrs converter.

Every problem in a file is collected and reported at once, each with the file and the key
path (``cache.max_loaded``), so a user fixes them all in one go.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
import cattrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_ENV = "SARAI_ROUTER_CONFIG"
MODELS_DIR_ENV = "SARAI_ROUTER_MODELS_DIR"
LOCAL_CONFIG_NAME = "sarai.toml"
BUILTIN_CONFIG_LABEL = "<built-in default config>"
MODALITIES = ("text", "image", "audio")


class ConfigError(Exception):
    """One or more problems in a config file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@attrs.frozen
class HeuristicConfig:
    empathy_threshold: float = 0.8
    max_chars: int = 200
    conversation_model: str = "fast"
    multimodal_model: str = "quality"
    multimodal_keywords: tuple[str, ...] = (
        "imagen", "image", "foto", "photo", "picture", "fotografía", "screenshot",
        "captura", "audio", "vídeo", "video", "diagrama", "diagram",
    )


@attrs.frozen
class RoutingConfig:
    default_model: str = "fast"
    heuristic: HeuristicConfig = HeuristicConfig()


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


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Requests allowed to wait for one model instance; one more is refused with 429.
    queue_size: int = 8
    max_body_bytes: int = 16 * 1024 * 1024
    # Empty: no key, unless $SARAI_ROUTER_API_KEY or --api-key sets one.
    api_key: str = ""


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


@attrs.frozen
class PathsConfig:
    # Empty: $SARAI_ROUTER_MODELS_DIR, else the per-user cache folder.
    models_dir: str = ""


@attrs.frozen
class ModelSpec:
    """One ``[models.NAME]`` table. ``path`` may use ``{models_dir}``."""

    path: str
    backend: str = "llama_cpp"
    name: str = ""
    n_ctx: int = 2048
    max_tokens: int = 512
    n_batch: int = 512
    n_threads: int = 0
    chat_format: str = ""
    modalities: tuple[str, ...] = ("text",)
    pinned: bool = False
    ttl_seconds: float | None = None
    sha256: str = ""
    mmproj: str = ""
    description: str = ""
    options: dict[str, Any] = attrs.field(factory=dict)

    @property
    def file(self) -> Path:
        return Path(self.path)

    def supports(self, modality: str) -> bool:
        return modality in self.modalities


@attrs.frozen
class Config:
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    plugins: PluginsConfig = PluginsConfig()
    paths: PathsConfig = PathsConfig()
    server: ServerConfig = ServerConfig()
    bench: BenchConfig = BenchConfig()
    models: dict[str, ModelSpec] = attrs.field(factory=dict)
    source: str = BUILTIN_CONFIG_LABEL
    models_dir: str = ""

    def model(self, name: str) -> ModelSpec:
        return self.models[name]

    def ttl_for(self, spec: ModelSpec) -> float:
        return self.cache.ttl_seconds if spec.ttl_seconds is None else spec.ttl_seconds


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
    from importlib.resources import files

    return files("sarai_router").joinpath("default_config.toml").read_text(encoding="utf-8")


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
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    config = _structure(raw, source, problems)
    if config is None:
        raise ConfigError(problems)
    config = _resolve_paths(config, source, base_dir)
    problems.extend(semantic_problems(config, check_files=check_files))
    if problems:
        raise ConfigError(problems)
    return config


def _structure(raw: Mapping[str, Any], source: str, problems: list[str]) -> Config | None:
    """Structure ``raw``; on type errors or unknown keys, report each one, drop the bad keys
    and structure again, so the remaining (semantic) problems are reported in the same pass."""
    raw = _prepare(raw, source, problems)
    for _ in range(3):
        try:
            return _converter.structure(raw, Config)
        except Exception as exc:  # cattrs raises an exception group with every problem
            bad_paths = []
            for message in cattrs.transform_error(exc, path="$"):
                line, paths = _describe_cattrs_message(message, raw)
                problems.append(f"{source}: {line}")
                bad_paths.extend(paths)
            if not bad_paths or not all(_drop(raw, p) for p in bad_paths):
                return None
    return None


def _prepare(raw: Mapping[str, Any], source: str, problems: list[str]) -> dict[str, Any]:
    raw = _deep_copy(raw)
    for reserved in ("source", "models_dir"):
        if reserved in raw:
            hint = " (did you mean [paths] models_dir?)" if reserved == "models_dir" else ""
            problems.append(f"{source}: {reserved}: unknown key{hint}")
            raw.pop(reserved)
    models_raw = raw.get("models", {})
    if isinstance(models_raw, dict):
        for name, table in models_raw.items():
            if isinstance(table, dict):
                if "name" in table:
                    problems.append(f"{source}: models.{name}.name: unknown key "
                                    "(a model's name is its table name)")
                table["name"] = name
    return raw


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


def _describe_cattrs_message(message: str, raw: Mapping[str, Any]) -> tuple[str, list[list[str]]]:
    """One problem line (``cache.max_loaded: expected int, got 'x'``) and the key paths to drop."""
    text, sep, where = message.rpartition(" @ ")
    if not sep:
        return message, []
    parts = _split_path(where)
    key = ".".join(parts)
    if text.startswith("extra fields found"):
        fields = [f.strip() for f in text.split("(", 1)[-1].rstrip(")").split(",")]
        scope = f"{key}." if key else ""
        return ("; ".join(f"{scope}{f}: unknown key" for f in fields),
                [parts + [f] for f in fields])
    if text.startswith("required field missing"):
        # Drop the table that lacks it, so the rest can still be checked.
        return f"{key}: required key missing", [parts[:-1]] if len(parts) > 1 else []
    value = _lookup(raw, parts)
    got = f", got {value!r}" if value is not None else ""
    return f"{key or '(top level)'}: {text.replace('invalid value for type, ', '')}{got}", [parts]


def _resolve_paths(config: Config, source: str, base_dir: Path | None) -> Config:
    models_dir = (
        Path(config.paths.models_dir).expanduser() if config.paths.models_dir else default_models_dir()
    )
    if base_dir is not None and not models_dir.is_absolute():
        models_dir = base_dir / models_dir

    def resolve(value: str) -> str:
        if not value:
            return value
        expanded = Path(value.replace("{models_dir}", str(models_dir))).expanduser()
        if not expanded.is_absolute() and base_dir is not None:
            expanded = base_dir / expanded
        return os.path.normpath(expanded)

    models = {
        name: attrs.evolve(spec, path=resolve(spec.path), mmproj=resolve(spec.mmproj))
        for name, spec in config.models.items()
    }
    dirs = tuple(resolve(d) for d in config.plugins.dirs)
    return attrs.evolve(
        config,
        models=models,
        plugins=attrs.evolve(config.plugins, dirs=dirs),
        source=source,
        models_dir=str(models_dir),
    )


def semantic_problems(config: Config, *, check_files: bool) -> list[str]:
    """What a well-typed config can still get wrong: dangling names, bad ranges, missing files."""
    src = config.source
    problems: list[str] = _non_finite_numbers(config)
    names = set(config.models)
    if not names:
        problems.append(f"{src}: models: no model is configured (add a [models.NAME] table)")
    routes = {
        "routing.default_model": config.routing.default_model,
        "routing.heuristic.conversation_model": config.routing.heuristic.conversation_model,
        "routing.heuristic.multimodal_model": config.routing.heuristic.multimodal_model,
    }
    for key, target in routes.items():
        if names and target not in names:
            problems.append(
                f"{src}: {key}: routes to model {target!r}, which is not configured "
                f"(configured: {', '.join(sorted(names))})"
            )
    heuristic = config.routing.heuristic
    if not 0.0 <= heuristic.empathy_threshold <= 1.0:
        problems.append(f"{src}: routing.heuristic.empathy_threshold: must be between 0 and 1, "
                        f"got {heuristic.empathy_threshold}")
    if heuristic.max_chars < 0:
        problems.append(f"{src}: routing.heuristic.max_chars: must be >= 0")
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
    pinned = [n for n, s in config.models.items() if s.pinned]
    if len(pinned) > cache.max_loaded:
        problems.append(f"{src}: cache.max_loaded: {cache.max_loaded} is fewer than the "
                        f"{len(pinned)} pinned models ({', '.join(pinned)})")
    for name, spec in config.models.items():
        key = f"models.{name}"
        if not spec.path:
            problems.append(f"{src}: {key}.path: must not be empty")
        elif check_files and not Path(spec.path).is_file():
            problems.append(f"{src}: {key}.path: model file not found: {spec.path}"
                            + (" (run `sarai-router models pull`)" if _pullable(spec) else ""))
        elif check_files and spec.backend == "llama_cpp":
            problems.extend(f"{src}: {key}.path: {p}" for p in _gguf_problems(spec.path))
        for field in ("n_ctx", "max_tokens", "n_batch"):
            if getattr(spec, field) < 1:
                problems.append(f"{src}: {key}.{field}: must be >= 1")
        if spec.n_threads < 0:
            problems.append(f"{src}: {key}.n_threads: must be >= 0 (0 = all cores)")
        if spec.ttl_seconds is not None and spec.ttl_seconds < 0:
            problems.append(f"{src}: {key}.ttl_seconds: must be >= 0")
        unknown = [m for m in spec.modalities if m not in MODALITIES]
        if unknown:
            problems.append(f"{src}: {key}.modalities: unknown modality {', '.join(map(repr, unknown))}"
                            f" (known: {', '.join(MODALITIES)})")
        if "text" not in spec.modalities:
            problems.append(f"{src}: {key}.modalities: must include 'text'")
        if spec.mmproj and check_files and not Path(spec.mmproj).is_file():
            problems.append(f"{src}: {key}.mmproj: file not found: {spec.mmproj}")
    if check_files:
        for index, directory in enumerate(config.plugins.dirs):
            if not Path(directory).is_dir():
                problems.append(f"{src}: plugins.dirs[{index}]: not a directory: {directory}")
    return problems


def _gguf_problems(path: str) -> list[str]:
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
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else name)

    walk(_converter.unstructure(config), "")
    return problems


def _pullable(spec: ModelSpec) -> bool:
    from .fetch import catalog_entry_for

    return catalog_entry_for(spec) is not None


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data (resolved paths), for ``config show``."""
    data = _converter.unstructure(config)
    # Where the config came from is not a key a file may set.
    data.pop("source", None)
    data.pop("models_dir", None)
    for spec in data["models"].values():
        spec.pop("name", None)
    return data
