"""``plugins``: what is registered, blocked, failed."""

from __future__ import annotations

import click

from .common import AppContext, dim, emit_json, json_option


@click.command()
@json_option
@click.pass_obj
def plugins(app: AppContext, as_json: bool) -> None:
    """List the plugins, their hooks, and those blocked or failed."""
    from ..router import Router

    router = Router(app.config())
    rows = router.hooks.describe()
    data = {
        "plugins": rows,
        "blocked": list(router.plugins.blocked),
        "failed": [{"name": f.name, "source": f.source, "error": f.error}
                   for f in router.plugins.failures],
        "warnings": list(router.plugins.warnings),
        "signals": {name: plugin for name, (plugin, _) in router.hooks.signal_functions().items()},
        "backends": {kind: plugin for kind, (plugin, _) in router.hooks.backends().items()},
        "config_tables": {name: plugin for name, (plugin, _) in router.hooks.config_tables().items()},
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
