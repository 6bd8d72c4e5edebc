"""``sarai-router engines``: the inference programs the router runs beside itself.

Today that is llama.cpp's ``llama-server``, which ``serve`` uses to decode concurrent
requests together (continuous batching). ``install`` finds one or builds it from the
``llama-cpp-python`` source on the Python package index (minutes, once; then cached).
"""

from __future__ import annotations

import click

from .common import CliError, dim


@click.group()
def engines() -> None:
    """Install or locate llama-server, which lets `serve` batch concurrent requests."""


@engines.command()
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=None,
              help="Parallel compile jobs (default: the CPUs this process may use).")
def install(force: bool, jobs: int | None) -> None:
    """Find llama-server, or build it from the package index (a few minutes, once).

    Looks at $SARAI_ROUTER_LLAMA_SERVER, PATH and the cache first; a build prints its
    progress and ends with the path of the binary on stdout.
    """
    from ..default_plugins.llama_server_install import (LlamaServerError, build_llama_server,
                                                        find_llama_server)

    def report(message: str) -> None:
        click.echo(dim(message), err=True)

    try:
        found = None if force else find_llama_server()
        if found is not None:
            report("llama-server is installed")
        else:
            found = build_llama_server(report=report, jobs=jobs, force=force)
    except LlamaServerError as exc:
        raise CliError(str(exc)) from None
    click.echo(str(found))


@engines.command()
def where() -> None:
    """Print the llama-server that `serve` would run (exit 1 if there is none)."""
    from ..default_plugins.batching import INSTALL_COMMAND
    from ..default_plugins.llama_server_install import (LlamaServerError, cache_dir,
                                                        find_llama_server)

    try:
        found = find_llama_server()
    except LlamaServerError as exc:
        raise CliError(str(exc)) from None
    if found is None:
        raise CliError(f"no llama-server: none in $SARAI_ROUTER_LLAMA_SERVER, on PATH or in "
                       f"{cache_dir()}; run `{INSTALL_COMMAND}` to build it")
    click.echo(str(found))
