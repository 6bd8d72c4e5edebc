"""The testing kit's pytest plugin (registered through the ``pytest11`` entry point).

``sarai_server``: a factory fixture. ``sarai_server(toml_text, api_key=None, args=(),
env=None)`` writes the config to the test's temporary folder, starts a real ``sarai-router
serve`` on a free 127.0.0.1 port (the ``echo`` backend registered), waits for ``/health``
and returns the base URL (``http://127.0.0.1:PORT``); every server it started is stopped
when the test ends, and a server that did not exit cleanly fails the test with its log.
"""

from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest

from . import ServeProcess, start_serve

#: the variable ``serve`` reads its API key from
API_KEY_ENV = "SARAI_ROUTER_API_KEY"


@pytest.fixture
def sarai_server(tmp_path: Path) -> Callable[..., str]:
    servers: list[ServeProcess] = []
    numbers = itertools.count(1)

    def start(toml_text: str, *, api_key: str | None = None, args: Sequence[str] = (),
              env: Mapping[str, str] | None = None) -> str:
        folder = tmp_path / f"sarai-server-{next(numbers)}"
        folder.mkdir()
        config = folder / "sarai.toml"
        config.write_text(textwrap.dedent(toml_text), encoding="utf-8")
        environment = dict(os.environ if env is None else env)
        environment.pop(API_KEY_ENV, None)
        if api_key:
            environment[API_KEY_ENV] = api_key
        server = start_serve(config, args=args, env=environment)
        servers.append(server)
        return server.url

    yield start
    problems = []
    for server in servers:
        code = server.stop()
        if code != 0:
            problems.append(f"{server.url} exited with {code}; log:\n{server.log()[-3000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
