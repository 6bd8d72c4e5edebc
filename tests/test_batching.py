"""The default ``serve``: models that name no backend run under a managed llama-server that
batches, when one is installed; in process otherwise, said once at startup.

conftest.py pins the other server tests to the in-process path with $SARAI_ROUTER_BATCHING;
the servers here run without it (the default) unless a test sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import BATCHING_ENV
from sarai_router.default_plugins.batching import INSTALL_COMMAND, plan
from sarai_router.errors import ConfigError
from sarai_router.default_plugins.llama_server_install import (BINARY_ENV, CACHE_ENV,
                                                                build_llama_server)
from sarai_router.testing import start_serve

SAR = str(Path(sys.executable).with_name("sarai-router"))


@pytest.fixture(scope="module")
def llama_server_binary() -> Path:
    # The cached build (waits on the build lock if another process is building it).
    return build_llama_server()


@pytest.fixture
def with_binary(monkeypatch, llama_server_binary):
    monkeypatch.setenv(BINARY_ENV, str(llama_server_binary))


@pytest.fixture
def no_binary(monkeypatch, tmp_path):
    """No llama-server anywhere: none on PATH, an empty cache, the variable unset."""
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))


def _default_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != BATCHING_ENV}


# -- the plan (no model is loaded) ---------------------------------------------------------

def test_models_without_a_backend_move_to_llama_server_with_their_settings(
        make_config, with_binary):
    config = make_config(fast="pinned = true\nn_threads = 1\nrepack = false")
    served = plan(config, "auto")
    assert served.batched == ("fast", "quality")
    fast, quality = served.config.models["fast"], served.config.models["quality"]
    assert fast.backend == quality.backend == "llama_server"
    assert fast.settings.n_threads == 1 and fast.settings.repack is False
    assert fast.settings.parallel == 16 and fast.pinned and fast.n_ctx == 512
    assert fast.path == config.models["fast"].path
    # The quality model's file has no chat template: llama-server gets the same one.
    assert quality.settings.server_args[-2:] == ("--chat-template", "gemma")
    assert "continuous batching" in served.message and '"off"' in served.message


def test_a_model_that_writes_its_backend_keeps_it(make_config, with_binary):
    served = plan(make_config(fast='pinned = true\nbackend = "llama_cpp"'), "auto")
    assert served.config.models["fast"].backend == "llama_cpp"
    assert served.batched == ("quality",)


def test_options_that_llama_server_cannot_take_keep_the_model_in_process(
        make_config, with_binary):
    served = plan(make_config(fast="pinned = true\noptions = { flash_attn = true }"), "auto")
    assert served.config.models["fast"].backend == "llama_cpp"
    assert "flash_attn" in served.in_process["fast"]
    assert "model fast stays in process" in served.message and "flash_attn" in served.message


def test_a_chat_format_without_a_llama_server_template_stays_in_process(
        make_config, with_binary):
    served = plan(make_config(fast='chat_format = "saiga"'), "auto")
    assert served.config.models["fast"].backend == "llama_cpp"
    assert "'saiga'" in served.in_process["fast"]


def test_off_changes_nothing(make_config, with_binary):
    config = make_config(extra='[server]\nbatching = "off"')
    assert config.server.batching == "off"
    served = plan(config)
    assert served.config is config and served.message == ""


def test_without_a_binary_the_models_stay_and_the_message_says_how_to_batch(
        make_config, no_binary):
    served = plan(make_config(), "auto")
    assert served.batched == ()
    assert {s.backend for s in served.config.models.values()} == {"llama_cpp"}
    assert INSTALL_COMMAND in served.message and "in process" in served.message


def test_an_unknown_batching_mode_is_a_config_problem(make_config):
    with pytest.raises(ConfigError, match=r"server\.batching: must be one of 'auto', 'off'"):
        make_config(extra='[server]\nbatching = "yes"')


def test_engines_where_without_a_binary_is_a_clean_error(no_binary):
    result = subprocess.run([SAR, "engines", "where"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert INSTALL_COMMAND in result.stderr and "Traceback" not in result.stderr


def test_serve_help_names_the_setting():
    result = subprocess.run([SAR, "serve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--batching [auto|off]" in result.stdout and "SARAI_ROUTER_BATCHING" in result.stdout


# -- real servers --------------------------------------------------------------------------

def _ask(url: str, model: str = "auto") -> dict:
    body = json.dumps({"model": model, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Hello there!"}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _children(pid: int) -> list[str]:
    return [child.name() for child in psutil.Process(pid).children(recursive=True)]


@pytest.mark.models
def test_default_serve_runs_llama_server_children(write_config, with_binary):
    config = write_config()
    env = _default_env()
    with start_serve(config, echo=False, env=env, timeout=300) as server:
        # The pinned model was started at startup: its child is running.
        assert "llama-server" in _children(server.process.pid)
        answer = _ask(server.url, "fast")
        assert answer["choices"][0]["message"]["content"]
        assert answer["model"] == "fast"
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
            rows = {row["id"]: row for row in json.loads(response.read())["data"]}
        assert rows["fast"]["loaded"]
        log = server.log()
    assert log.count("run under llama-server with continuous batching") == 1


@pytest.mark.models
def test_default_serve_without_a_binary_says_so_once_and_answers_in_process(
        write_config, no_binary):
    config = write_config()
    with start_serve(config, echo=False, env=_default_env(), timeout=300) as server:
        assert "llama-server" not in _children(server.process.pid)
        answer = _ask(server.url, "fast")
        assert answer["choices"][0]["message"]["content"]
        log = server.log()
    assert log.count(f"run `{INSTALL_COMMAND}`") == 1
    assert "run in process, one request at a time" in log


def test_engines_install_with_one_installed_prints_it(with_binary, llama_server_binary):
    result = subprocess.run([SAR, "engines", "install"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(llama_server_binary)
    assert "llama-server is installed" in result.stderr


def test_an_embedding_model_stays_in_process(make_config, with_binary):
    served = plan(make_config(quality="embedding = true"), "auto")
    assert served.config.models["quality"].backend == "llama_cpp"
    assert "embedding" in served.in_process["quality"]
    assert served.batched == ("fast",)
