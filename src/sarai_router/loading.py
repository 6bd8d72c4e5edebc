"""Loading a config: TOML text -> a bound ``Config``, with every problem collected at once.

It sits above the plugins because binding needs them: each model's backend keys and each
plugin table are structured with the class its plugin declares. ``config`` holds the
classes and the checks that need no plugin.
"""

from __future__ import annotations

import logging
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

from .config import (BUILTIN_CONFIG_LABEL, COMMON_MODEL_KEYS, PLUGINS_OWN_KEYS, Config,
                     NoSettings, builtin_config_text, converter, default_models_dir,
                     find_config_path, path_resolver, semantic_problems)
from .errors import ConfigError
from .plugins import Hooks, build_plugins

log = logging.getLogger(__name__)


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
    #: models whose table wrote ``backend``
    explicit_backends: set[str] = attrs.field(factory=set)


def _split_plugin_owned(raw: Mapping[str, Any], source: str, problems: list[str]) -> _Split:
    raw = _deep_copy(raw)
    for reserved in ("source", "models_dir", "plugin_set"):
        if reserved in raw:
            hint = " (did you mean [paths] models_dir?)" if reserved == "models_dir" else ""
            problems.append(f"{source}: {reserved}: unknown key{hint}")
            raw.pop(reserved)
    backend_keys: dict[str, dict[str, Any]] = {}
    explicit_backends: set[str] = set()
    models_raw = raw.get("models", {})
    if isinstance(models_raw, dict):
        for name, table in models_raw.items():
            if not isinstance(table, dict):
                continue
            if "name" in table:
                problems.append(f"{source}: models.{name}.name: unknown key "
                                "(a model's name is its table name)")
            for reserved in ("settings", "backend_keys", "backend_explicit"):
                if reserved in table:
                    problems.append(f"{source}: models.{name}.{reserved}: unknown key "
                                    "(a backend's keys go in the model's table itself)")
                    table.pop(reserved)
            if "backend" in table:
                explicit_backends.add(name)
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
    return _Split(core=raw, backend_keys=backend_keys, table_paths=table_paths,
                  explicit_backends=explicit_backends)


def _structure(raw: dict[str, Any], kind: type, source: str, prefix: str,
               problems: list[str], owner_hint: Callable[[str], str] = lambda key: "") -> Any:
    """Structure ``raw`` as ``kind``; on type errors or unknown keys, report each one, drop
    the bad keys and structure again, so the remaining problems are reported in the same pass.
    ``prefix`` is the key path of ``raw`` in the file (``models.fast``)."""
    for _ in range(4):
        try:
            return converter.structure(raw, kind)
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


def _bind(config: Config, split: _Split, problems: list[str], *, base_dir: Path | None,
          check_files: bool) -> Config:
    """Discover the plugins, then structure each model's backend keys and each plugin table
    with the class its plugin declared, and let them check themselves."""
    models = {name: attrs.evolve(spec, backend_keys=split.backend_keys.get(name, {}),
                                 backend_explicit=name in split.explicit_backends)
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
            settings = converter.structure(dict(tables.get(name, {})), cls)
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
                tables[name] = converter.unstructure(settings)
            continue
        if strict and name not in known_plugins:
            problems.append(f"{src}: {path}: no plugin named {name!r} is loaded "
                            f"(loaded: {', '.join(sorted(hooks.plugins.sources))})")
        tables[name] = dict(table)
    for name, (_, cls) in schemas.items():
        # Defaults for a plugin whose table is absent, so plugin_config() has every key.
        tables.setdefault(name, converter.unstructure(cls()))
    return tables


def settings_class_of(factory: Any) -> type:
    return getattr(factory, "settings_class", None) or NoSettings


def _resolve_setting_paths(settings: Any, resolve: Callable[[str], str]) -> Any:
    changes = {field.name: resolve(getattr(settings, field.name))
               for field in attrs.fields(type(settings))
               if field.metadata.get("sarai_path") and getattr(settings, field.name)}
    return attrs.evolve(settings, **changes) if changes else settings
