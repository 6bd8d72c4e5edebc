"""``sarai-router serve``: the OpenAI-compatible server.

The server stack (starlette, uvicorn) and llama_cpp are imported inside the command, so
``sarai-router --help`` and ``route`` never pay for them.
"""

from __future__ import annotations

import logging

import click

from ..errors import SaraiError
from .common import EXIT_USAGE, TEXT, AppContext, CliError, cli_error, dim, progressbar, say


@click.command()
@click.option("--host", type=TEXT, help="Address to bind (default: [server] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: [server] port, 8000).")
@click.option("--api-key", envvar="SARAI_ROUTER_API_KEY", show_envvar=True, type=TEXT,
              help="Require 'Authorization: Bearer KEY' (default: [server] api_key; none).")
@click.option("--allow-unauthenticated", is_flag=True,
              help="Listen beyond loopback without an API key (default: [server] "
                   "allow_unauthenticated; refused otherwise).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this Host name (repeatable; added to [server] "
                   "allowed_hosts; IP literals and localhost always are).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from this origin call the API (repeatable; added to "
                   "[server] cors_origins; none by default).")
@click.option("--batching", type=click.Choice(["auto", "off"]), envvar="SARAI_ROUTER_BATCHING",
              show_envvar=True,
              help="auto: GGUF models whose table sets no backend run under a managed "
                   "llama-server that decodes many requests together, when one is installed "
                   "(`sarai-router engines install`); off: in process, one request at a time "
                   "per model (default: [server] batching, auto).")
@click.pass_obj
def serve(app: AppContext, host: str | None, port: int | None, api_key: str | None,
          allow_unauthenticated: bool, allowed_hosts: tuple[str, ...],
          cors_origins: tuple[str, ...], batching: str | None) -> None:
    """Serve an OpenAI-compatible API (model "auto" routes) until Ctrl-C.

    With llama-server installed, models that set no backend decode concurrent requests
    together (continuous batching); see --batching.
    """
    import attrs

    from ..engine import Engine, share_cores
    from ..memory import tune_malloc_for_serving

    # Before any thread starts: idle RSS must not creep up with the requests served.
    tune_malloc_for_serving()
    config = app.config()
    host = host or config.server.host
    port = port or config.server.port
    api_key = api_key or config.server.api_key
    if not api_key and not (allow_unauthenticated or config.server.allow_unauthenticated) \
            and not is_loopback(host):
        raise CliError(f"--host {host}: anyone who can reach this address could use the "
                       "models; set an API key (--api-key, $SARAI_ROUTER_API_KEY or [server] "
                       "api_key), or pass --allow-unauthenticated to mean it", EXIT_USAGE)
    if allowed_hosts or cors_origins:
        server = config.server
        config = attrs.evolve(config, server=attrs.evolve(
            server, allowed_hosts=(*server.allowed_hosts, *allowed_hosts),
            cors_origins=(*server.cors_origins, *cors_origins)))
    _check_port_free(host, port)
    if logging.getLogger().level > logging.INFO:
        # Loads, unloads and pre-warms are what a server operator wants to see.
        logging.getLogger("sarai_router").setLevel(logging.INFO)
    from ..default_plugins.batching import plan

    try:
        served = plan(config, batching)
    except SaraiError as exc:
        raise cli_error(exc) from None
    if served.message:
        # Once, at startup: whether concurrent requests are decoded together or queue.
        click.echo(dim(f"sarai-router: {served.message}"), err=True)
    config = served.config
    engine = Engine(share_cores(config), report=say, progressbar=progressbar)
    try:
        # Before binding: a model that can't be had is the user's to fix, not a crash.
        for name, spec in config.models.items():
            if spec.pinned:
                engine.ensure_present(name)
    except SaraiError as exc:
        raise cli_error(exc) from None
    try:
        from ..serving import serve as run_server
    except ImportError as exc:  # pragma: no cover - a broken install
        raise CliError(f"the server stack is not importable ({exc}); reinstall sarai-router")
    click.echo(dim(f"sarai-router: http://{host}:{port}/v1 (models: auto, "
                   f"{', '.join(config.models)}; API key {'required' if api_key else 'off'})"),
               err=True)
    run_server(engine, host=host, port=port, api_key=api_key or "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address to bind) is only reachable from this machine."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading any model if the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CliError(f"--host {host!r}: cannot resolve it ({exc.strerror})", EXIT_USAGE) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror} "
                           "(choose another --port, or stop what uses it)", EXIT_USAGE) from None
