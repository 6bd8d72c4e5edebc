"""The ``sarai-router`` command line: one click group, one module per command family.

Every module here imports from the core and from ``cli.common``, never from another
command module, so the arrows point one way. Heavy imports (llama_cpp, the server stack,
plotting) happen inside the commands that need them: ``--help`` and ``route`` stay instant.
"""

from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from . import bench, chat, config, evaluate, models, plugins, route, serve
from .common import EXIT_FAILURE, AppContext, printable


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


for command in (route.route, route.query, evaluate.evaluate, models.models, plugins.plugins,
                config.config, serve.serve, chat.chat, bench.bench, bench.bench_concurrency):
    cli.add_command(command)


def main() -> None:
    try:
        cli(prog_name="sarai-router")
    except Exception as exc:  # noqa: BLE001 - the last line of defence, see below
        # Every error we expect is a CliError with its own message; reaching here is a bug.
        # Say so in one line instead of a traceback, unless -vv asked for details.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {printable(str(exc))}); "
                   "this is a bug in sarai-router: run again with -vv to see where", err=True)
        sys.exit(EXIT_FAILURE)


__all__ = ["cli", "main"]
