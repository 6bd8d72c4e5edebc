"""What every command shares: the app context, errors as ``CliError``, output helpers.

Commands translate the core's errors (all ``SaraiError``) into a ``CliError``: a message
on stderr, an exit code, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..config import Config
from ..loading import load_config
from ..errors import (AudioError, CapabilityError, ConfigError, ContextLengthError, FetchError,
                      ModelFileMissing, RoutingError, SaraiError)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """An error for a person: ``Error: <message>`` on stderr and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


def config_error(exc: ConfigError) -> CliError:
    count = len(exc.problems)
    lines = [f"{count} problem{'s' if count != 1 else ''} in the config:"]
    lines += [f"  - {problem}" for problem in exc.problems]
    return CliError("\n".join(lines), EXIT_USAGE)


#: Errors in what the user asked for (exit 2), as opposed to failures while doing it (1).
USAGE_ERRORS = (RoutingError, CapabilityError, ContextLengthError, ModelFileMissing, AudioError)


def cli_error(exc: SaraiError) -> CliError:
    """The CLI's message and exit code for an error the core raised."""
    if isinstance(exc, ConfigError):
        return config_error(exc)
    message = str(exc)
    if isinstance(exc, FetchError) and not isinstance(exc, ModelFileMissing):
        message += "\n(try again with `sarai-router models pull`)"
    return CliError(message, EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE)


class AppContext:
    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                raise config_error(exc) from None
        return self._config


def utf8_problem(text: str) -> str | None:
    """Why ``text`` is not UTF-8 text, or None. Python hands undecodable argument bytes over
    as lone surrogates (surrogateescape); they break at the first print or tokenisation."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start:exc.end].encode("utf-8", "surrogateescape")
        return f"byte 0x{raw[:1].hex()} at character {exc.start + 1} is not UTF-8"
    return None


def printable(text: str) -> str:
    """``text`` safe to print whatever it holds (undecodable bytes as backslash escapes)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Utf8Text(click.ParamType):
    """Free text (a prompt, a name, a key): refused with exit 2 unless it is UTF-8.

    File paths are not checked: a Linux file name may be any bytes, and Path takes them."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            problem = utf8_problem(value)
            if problem:
                self.fail(f"not valid UTF-8 text ({problem}); check the terminal's or the "
                          "script's encoding", param, ctx)
        return value


TEXT = Utf8Text()


def dim(text: str) -> str:
    return click.style(text, dim=True)


def say(message: str) -> None:
    """A progress line for people, dim on stderr."""
    click.echo(dim(message), err=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def progressbar(total: int, label: str):
    bar = click.progressbar(length=total, label=label, file=sys.stderr)
    bar.__enter__()
    return bar


def request_from_options(prompt: str, images: tuple[str, ...], audio: str | None,
                         config: Config):
    """The request of ``route``/``query``; each attachment is a regular file of at most
    ``[server] max_body_bytes`` (what ``serve`` would take), checked before it is read."""
    from ..errors import AttachmentError
    from ..types import ChatRequest

    if not prompt.strip() and not images and not audio:
        raise CliError("PROMPT is empty: give some text (or attach --image / --audio)",
                       EXIT_USAGE)
    try:
        return ChatRequest.from_files(prompt, tuple(Path(p) for p in images),
                                      Path(audio) if audio else None,
                                      max_bytes=config.server.max_body_bytes)
    except AttachmentError as exc:
        option = "--audio" if audio and exc.path == str(Path(audio)) else "--image"
        raise CliError(f"{option} {exc}", EXIT_USAGE) from None


def check_model_names(config: Config, label: str, names) -> None:
    from ..errors import not_configured

    for name in names:
        if name is not None and name not in config.models:
            raise CliError(f"{label}: {not_configured(name, config.models)}", EXIT_USAGE)


image_option = click.option("--image", "images", multiple=True,
                            type=click.Path(exists=True, dir_okay=False),
                            help="Attach an image file (repeatable; a regular file of at most "
                                 "[server] max_body_bytes).")
audio_option = click.option("--audio", type=click.Path(exists=True, dir_okay=False),
                            help="Attach an audio file (wav, mp3, ...; a regular file of at "
                                 "most [server] max_body_bytes); transcribed when the model "
                                 "can't take audio. PROMPT is optional with it.")


def transcript_line(transcript) -> str:
    """``[transcribed audio, en, 3.3 s clip in 1.05 s (whisper)] "Please describe..."``"""
    language = f"{transcript.language}, " if transcript.language else ""
    return (f"[transcribed audio, {language}{transcript.duration:.1f} s clip in "
            f"{transcript.seconds:.2f} s ({transcript.plugin})] {transcript.text}")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
