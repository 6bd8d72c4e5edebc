"""The kit for plugin authors (``sarai_router.testing``): the ``sarai_server`` fixture, the
``echo`` test backend, the helpers without HTTP, and the docs' example run where a plugin
author would run it: in a folder of its own, outside this repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sarai_router.backend import GenerationParams
from sarai_router.loading import load_config
from sarai_router.errors import ConfigError
from sarai_router.plugins import Hooks, build_plugins
from sarai_router.testing import (ECHO_BACKEND, answer, config_from_toml, free_port, route,
                                  start_serve)
from sarai_router.testing.echo import EchoModel, tokens

REPO = Path(__file__).resolve().parent.parent
ECHO = """
[routing]
default_model = "fast"

[models.fast]
backend = "echo"
max_tokens = 5

[models.quality]
backend = "echo"
"""


def test_echo_answers_the_last_user_message_word_by_word():
    model = EchoModel(max_tokens=50)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "hola  qué tal"}]}]
    deltas = list(model.chat(messages, GenerationParams()))
    assert [d.text for d in deltas] == ["hola  ", "qué ", "tal", ""]
    assert deltas[-1].finish_reason == "stop"
    assert (deltas[-1].usage.prompt_tokens, deltas[-1].usage.completion_tokens) == (9, 3)
    assert tokens("a b") == ["a ", "b"]


def test_echo_is_cut_by_max_tokens_and_is_deterministic():
    config = config_from_toml(ECHO)
    first = answer(config, "one two three four five six seven")
    assert first.text == "one two three four five "  # the model's max_tokens = 5
    assert first.finish_reason == "length" and first.usage.completion_tokens == 5
    again = answer(config, "one two three four five six seven", max_tokens=2)
    assert (again.text, again.finish_reason) == ("one two ", "length")
    assert answer(config, "one two three four five six seven").text == first.text


def test_route_and_answer_without_http():
    config = config_from_toml(ECHO)
    decision = route(config, "Describe esta imagen, por favor")
    assert (decision.model, decision.plugin) == ("quality", "heuristic")
    assert route(config, "hola", model="quality").plugin == "(explicit)"
    completion = answer(config, "hola", model="quality")
    assert completion.text == "hola" and completion.decision.model == "quality"


def test_echo_is_not_a_default_backend(tmp_path):
    config = load_config(None)
    assert ECHO_BACKEND not in Hooks(build_plugins(config), config).backends()
    path = tmp_path / "sarai.toml"
    path.write_text(ECHO, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "sarai_router", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no plugin registers backend 'echo'" in done.stderr
    with pytest.raises(ConfigError):
        config_from_toml(ECHO.replace('default_model = "fast"', 'default_model = "nope"'))


def test_sarai_server_serves_the_echo_backend(sarai_server):
    url = sarai_server(ECHO, api_key="kit-key")
    assert httpx.get(f"{url}/v1/models").status_code == 401
    body = {"model": "auto", "stream": True,
            "messages": [{"role": "user", "content": "streamed word by word"}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer kit-key"}) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [p for p in pieces if p] == ["streamed ", "word ", "by ", "word"]


def test_start_serve_reports_a_server_that_does_not_start(tmp_path):
    config = tmp_path / "sarai.toml"
    config.write_text(ECHO + "\n[server]\nmax_body_bytes = 1\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="max_body_bytes"):
        start_serve(config, args=["--allow-unauthenticated"])


def test_start_serve_runs_the_real_command_and_stops_it(tmp_path):
    """``echo=False``: the plain ``sarai-router`` (how the project's own server tests start
    it); a remote model that nothing loads until a request comes."""
    config = tmp_path / "sarai.toml"
    config.write_text('[models.remote]\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                      '[routing]\ndefault_model = "remote"\n[plugins]\ndisable = ["heuristic"]\n',
                      encoding="utf-8")
    server = start_serve(config, echo=False, args=["--allow-unauthenticated"])
    assert server.healthy() and server.process.poll() is None
    assert httpx.get(f"{server.url}/v1/models").json()["data"][1]["id"] == "remote"
    assert server.stop() == 0
    assert "sarai-router: http://127.0.0.1:" in server.log()


def test_free_port_is_free():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def _kit_example() -> dict[str, str]:
    """The files of "Testing your plugin" in docs/plugins.md: ``<!-- kit-example: PATH -->``
    just before a fenced block."""
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    found = re.findall(r"<!-- kit-example: (\S+) -->\n```python\n(.*?)```", text, re.DOTALL)
    return dict(found)


def test_the_docs_example_runs_outside_the_repository(tmp_path):
    files = _kit_example()
    assert set(files) == {"plugins/greetings.py", "test_greetings.py"}
    folder = tmp_path / "my-plugin"
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(content, encoding="utf-8")
    assert not folder.resolve().is_relative_to(REPO)
    # As a plugin author runs it: their folder, no conftest, only the installed package.
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
