"""``sarai-router serve`` and ``sarai-router chat``: the long-running commands.

The server stack (starlette, uvicorn) and llama_cpp are imported inside the commands, so
``sarai-router --help`` and ``route`` never pay for them.
"""

from __future__ import annotations

import logging

import click

from .cli import EXIT_USAGE, AppContext, dim, ensure_model_file, fail


@click.command()
@click.option("--host", help="Address to bind (default: [server] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: [server] port, 8000).")
@click.option("--api-key", envvar="SARAI_ROUTER_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' (default: [server] api_key; none).")
@click.pass_obj
def serve(app: AppContext, host: str | None, port: int | None, api_key: str | None) -> None:
    """Serve an OpenAI-compatible API (model "auto" routes) until Ctrl-C."""
    config = app.config()
    host = host or config.server.host
    port = port or config.server.port
    api_key = api_key or config.server.api_key
    _check_port_free(host, port)
    if logging.getLogger().level > logging.INFO:
        # Loads, unloads and pre-warms are what a server operator wants to see.
        logging.getLogger("sarai_router").setLevel(logging.INFO)
    for name, spec in config.models.items():
        if spec.pinned:
            ensure_model_file(config, name)
    try:
        from .server import serve as run_server
    except ImportError as exc:  # pragma: no cover - a broken install
        fail(f"the server stack is not importable ({exc}); reinstall sarai-router")
    click.echo(dim(f"sarai-router: http://{host}:{port}/v1 (models: auto, "
                   f"{', '.join(config.models)}; API key {'required' if api_key else 'off'})"),
               err=True)
    run_server(config, host=host, port=port, api_key=api_key or "")


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading any model if the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        fail(f"--host {host!r}: cannot resolve it ({exc.strerror})", EXIT_USAGE)
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror} "
                 "(choose another --port, or stop what uses it)", EXIT_USAGE)


@click.command()
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap each answer's length.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True)
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.option("--system", help="A system prompt for the whole conversation.")
@click.pass_obj
def chat(app: AppContext, max_tokens: int | None, temperature: float, seed: int | None,
         system: str | None) -> None:
    """Talk with the router turn by turn; /help inside lists the commands."""
    from .backend import GenerationParams
    from .chat import run_chat

    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    run_chat(app.config(), params, system=system)
