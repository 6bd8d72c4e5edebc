"""The ``sarai-router`` command line: one click group, one module per command family.

Every module here imports from the core and from ``cli.common``, never from another
command module, so the arrows point one way. A command's module is imported only when
that command runs (``LazyGroup``), and heavy imports (llama_cpp, the server stack,
plotting) happen inside the commands that need them: ``--help`` and ``route`` stay quick.
Plugins add commands through the ``register_commands`` hook; they are asked only when the
command line names a command that is not built in, and for ``--help``.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from .. import __version__
from ..events import SOURCE
from .common import EXIT_FAILURE, AppContext, config_error, printable

log = logging.getLogger(__name__)

#: built-in command name -> (module under sarai_router.cli, attribute), imported on use
BUILTIN_COMMANDS = {
    "route": ("route", "route"),
    "query": ("route", "query"),
    "eval": ("evaluate", "evaluate"),
    "models": ("models", "models"),
    "plugins": ("plugins", "plugins"),
    "config": ("config", "config"),
    "serve": ("serve", "serve"),
    "chat": ("chat", "chat"),
    "bench": ("bench", "bench"),
    "bench-concurrency": ("bench", "bench_concurrency"),
    "engines": ("engines", "engines"),
}


class LazyGroup(click.Group):
    """A click group whose built-in commands are imported when used, and whose plugin
    commands (``register_commands``) are looked for only when a name is not built in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plugins_asked = False
        self._config_error = None

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._ask_plugins(ctx)
        return sorted({*BUILTIN_COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in BUILTIN_COMMANDS:
            module, attribute = BUILTIN_COMMANDS[name]
            return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        if name not in self.commands:
            self._ask_plugins(ctx)
            if name not in self.commands and self._config_error is not None:
                # It may be a plugin's command: say why no plugin could be asked.
                raise config_error(self._config_error)
        return self.commands.get(name)

    def _ask_plugins(self, ctx: click.Context) -> None:
        """Let the plugins of the config the command line names add their commands."""
        if self._plugins_asked:
            return
        self._plugins_asked = True
        from ..loading import load_config
        from ..errors import ConfigError
        from ..plugins import Hooks, build_plugins

        try:
            config = load_config(ctx.params.get("config_path"))
        except ConfigError as exc:
            self._config_error = exc
            return
        plugins = config.plugin_set or build_plugins(config)
        Hooks(plugins, config).register_commands(self)
        for name in BUILTIN_COMMANDS:
            if self.commands.pop(name, None) is not None:
                log.warning("a plugin registers the command %r, which is built in; "
                            "the built-in one stays", name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
# Eager: read before --help, which lists the commands of the config's plugins.
@click.option("--config", "config_path", type=click.Path(dir_okay=False), is_eager=True,
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
    # Every request of this command came through the command line (its events say so).
    token = SOURCE.set("cli")
    ctx.call_on_close(lambda: SOURCE.reset(token))


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
