"""``config show`` and ``config check``."""

from __future__ import annotations

from typing import Any

import click

from ..config import fallback_cycles
from ..loading import load_config
from ..errors import ConfigError
from .common import AppContext, config_error, emit_json, json_option


@click.group(invoke_without_command=True)
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
    from ..config import to_dict

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
    """Check a config file (keys, types, backends, plugin tables, files): every problem at once."""
    try:
        cfg = load_config(path, check_files=True)
    except ConfigError as exc:
        raise config_error(exc) from None
    click.echo(f"{path}: ok ({len(cfg.models)} models: {', '.join(cfg.models)})")
    for cycle in fallback_cycles(cfg.models):
        shown = " -> ".join(cycle if len(cycle) <= 8 else [*cycle[:4], "...", *cycle[-3:]])
        click.echo(f"{path}: note: models.{cycle[0]}.fallbacks: fallback cycle {shown} "
                   f"({len(cycle) - 1} models; a request tries each at most once)")
