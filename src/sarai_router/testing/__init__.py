"""A kit for testing sarai-router plugins: real servers, a deterministic backend, helpers.

Installed with sarai-router and registered as a pytest plugin (the ``pytest11`` entry
point), so a plugin's tests get, with no conftest:

* the ``sarai_server`` fixture: ``sarai_server(toml_text)`` starts a real
  ``sarai-router serve`` on a free 127.0.0.1 port and returns its base URL; it is stopped
  when the test ends;
* the ``echo`` backend (:mod:`sarai_router.testing.echo`), a test backend that answers with
  the last user message, token by token, and needs no model file. The kit registers it in
  the servers it starts and in the configs it builds; sarai-router's defaults never do;
* helpers without HTTP: :func:`config_from_toml`, :func:`route` and :func:`answer`;
* what a test of a server needs anyway: :func:`free_port`, :data:`SARAI_ROUTER` (the
  command's path) and :func:`start_serve` (a running server to stop).

See "Testing your plugin" in docs/plugins.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from .echo import ECHO_BACKEND, EchoBackend, echo_plugin

if TYPE_CHECKING:
    from ..config import Config
    from ..engine import Completion
    from ..types import ChatRequest, RouteDecision

__all__ = ["ECHO_BACKEND", "EchoBackend", "SARAI_ROUTER", "ServeProcess", "answer",
           "config_from_toml", "echo_backend", "echo_plugin", "free_port", "route",
           "start_serve"]

#: The ``sarai-router`` command of the Python running the tests.
SARAI_ROUTER = str(Path(sys.executable).with_name("sarai-router"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def echo_backend() -> Iterator[None]:
    """Within it, every plugin manager built in this process registers the ``echo``
    backend (``config_from_toml`` and the servers the kit starts use it)."""
    from ..plugins import PROCESS_PLUGINS

    had = PROCESS_PLUGINS.get(ECHO_BACKEND)
    PROCESS_PLUGINS[ECHO_BACKEND] = echo_plugin
    try:
        yield
    finally:
        if had is None:
            PROCESS_PLUGINS.pop(ECHO_BACKEND, None)
        else:
            PROCESS_PLUGINS[ECHO_BACKEND] = had


def config_from_toml(text: str, *, base_dir: str | os.PathLike[str] | None = None,
                     echo: bool = True) -> "Config":
    """A config from TOML ``text`` (dedented), its plugins bound, the ``echo`` backend
    available unless ``echo=False``. ``base_dir``: where relative paths (``[plugins] dirs``,
    model paths) start; the current directory by default. Raises ``ConfigError``."""
    from ..loading import parse_config

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    with echo_backend() if echo else contextlib.nullcontext():
        return parse_config(textwrap.dedent(text), source="<test config>", base_dir=base)


def _request(prompt: "str | ChatRequest") -> "ChatRequest":
    from ..types import ChatRequest

    return ChatRequest.from_prompt(prompt) if isinstance(prompt, str) else prompt


def route(config: "Config", prompt: "str | ChatRequest", *,
          model: str | None = None) -> "RouteDecision":
    """The routing decision for ``prompt`` (text or a ``ChatRequest``), as ``sarai-router
    route`` makes it: no model loads, no HTTP. ``route(...).model``, ``.reason``,
    ``.plugin``, ``.signals``."""
    from ..router import Router

    return Router(config).route(_request(prompt), model=model)


def answer(config: "Config", prompt: "str | ChatRequest", *, model: str | None = None,
           **params) -> "Completion":
    """Route and answer ``prompt`` in this process (no HTTP), as ``sarai-router query``
    does; ``params`` are ``GenerationParams`` fields (``max_tokens=4``). The engine is
    closed afterwards. ``answer(...).text``, ``.decision``, ``.usage``, ``.finish_reason``."""
    from ..backend import GenerationParams
    from ..engine import Engine

    engine = Engine(config)
    try:
        return engine.complete(_request(prompt), GenerationParams(**params), model=model)
    finally:
        engine.close()


class ServeProcess:
    """A ``sarai-router serve`` process started by :func:`start_serve`."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        #: the base URL, ``http://127.0.0.1:PORT`` (the OpenAI API is under ``/v1``)
        self.url = url
        self.process = process
        self.log_path = log_path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_until(self, predicate: Callable[[], object], timeout: float, what: str) -> float:
        """Poll ``predicate`` until it is true; the seconds it took. AssertionError with the
        server's log after ``timeout`` seconds."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; log:\n"
                             + self.log()[-3000:])

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 now (it needs no API key)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server, wait for it to exit, and return its exit code; killed (and
        AssertionError) if it does not stop within ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop within {timeout} s of the signal; "
                                 "log:\n" + self.log()[-3000:]) from None

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_serve(config: str | os.PathLike[str], *, args: Sequence[str] = (),
                env: Mapping[str, str] | None = None, echo: bool = True,
                log_path: str | os.PathLike[str] | None = None, port: int | None = None,
                global_args: Sequence[str] = (), timeout: float = 120,
                wait: bool = True) -> ServeProcess:
    """Start ``sarai-router --config CONFIG serve --port PORT ARGS`` on 127.0.0.1 and wait
    until ``/health`` answers (``wait=False``: return at once).

    ``echo``: the server has the ``echo`` backend (it runs through ``python -m
    sarai_router.testing``, which registers it and is otherwise the same command).
    ``env``: the server's whole environment (default: this process's). ``log_path``: where
    its output goes (default: next to the config). ``global_args`` go before ``--config``
    (``-v``). Fails with the log if the server exits or does not answer within ``timeout``.
    """
    config = Path(config)
    port = port or free_port()
    log_path = Path(log_path) if log_path is not None else config.with_suffix(".serve.log")
    command = [sys.executable, "-m", "sarai_router.testing"] if echo else [SARAI_ROUTER]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [*command, *global_args, "--config", str(config), "serve", "--host", "127.0.0.1",
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ if env is None else env))
    server = ServeProcess(f"http://127.0.0.1:{port}", process, log_path)
    if wait:
        try:
            server.wait_until(lambda: process.poll() is not None or server.healthy(), timeout,
                              "the server to answer /health")
            if process.poll() is not None:
                raise AssertionError(f"sarai-router serve exited with {process.returncode}; "
                                     "log:\n" + server.log()[-3000:])
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
    return server
