"""Shared fixtures: configs written to tmp_path as real TOML files, pointing at the real models.

Tests that need the models fail loudly when a file is missing (CI pulls them first with
``sarai-router models pull``); they are never skipped. A test that loads a model carries
the ``models`` marker, and one that doesn't is failed if it loads one (model_load_guard/),
so ``pytest -m "not models"`` loads none.

Tests that reach the package index (``network``) or need the llama-server build
(``llama_server``) are counted as ``models`` tests too, so ``-m "not models"`` stays quick
and offline; the load guard still holds for them unless they carry ``models`` themselves.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import tempfile
import textwrap
from pathlib import Path
from typing import Callable

import pytest

from sarai_router.config import Config, default_models_dir
from sarai_router.loading import load_config

#: The server tests (test_server.py, test_openai_dialect.py, test_bad_inputs.py, ...) test the
#: in-process path, on configs whose models name no backend, which `serve` would otherwise
#: move to a batching llama-server: they keep the in-process one (the servers they start
#: inherit this). tests/test_batching.py tests the default, with this removed.
BATCHING_ENV = "SARAI_ROUTER_BATCHING"
os.environ.setdefault(BATCHING_ENV, "off")

FAST_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUALITY_FILE = "gemma-3-270m-q4_k_m.gguf"

#: Two real models with small contexts so they load and answer quickly.
BASE_TOML = """\
[paths]
models_dir = "{models_dir}"

[routing]
{routing}

[cache]
{cache}

[models.fast]
path = "{{models_dir}}/{fast_file}"
n_ctx = 512
max_tokens = 16
{fast}

[models.quality]
path = "{{models_dir}}/{quality_file}"
chat_format = "gemma"
n_ctx = 512
max_tokens = 16
{quality}
"""

#: What the base config's open tables hold unless a test says otherwise.
BASE_PARTS = {
    "routing": 'default_model = "fast"',
    "cache": "ttl_seconds = 60\nmax_loaded = 2",
    "fast": "pinned = true",
    "quality": "",
}


# -- the `models` marker, enforced ----------------------------------------------------------

GUARD_DIR = Path(__file__).parent / "model_load_guard"
_spec = importlib.util.spec_from_file_location("sarai_model_load_guard",
                                               GUARD_DIR / "sarai_model_load_guard.py")
load_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_guard)
load_guard.install()


#: Markers of slow or online tests that ``-m "not models"`` leaves out with the model tests,
#: and their per-test timeout (pyproject's ``timeout`` is the rest's): the first test that
#: needs llama-server may build it (4-9 minutes on 2 cores), a network test downloads.
HEAVY_MARKERS = {"llama_server": 1800, "network": 900}
#: Set on a test counted as ``models`` only for its heavy marker: it may still load no model.
_LOADS_FORBIDDEN = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        heavy = [name for name in HEAVY_MARKERS if item.get_closest_marker(name)]
        if not heavy:
            continue
        if not item.get_closest_marker("models"):
            item.add_marker(pytest.mark.models)
            item.stash[_LOADS_FORBIDDEN] = True
        if not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(max(HEAVY_MARKERS[name] for name in heavy)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test not marked ``models`` runs with model loads forbidden, here and in its children."""
    if item.get_closest_marker("models") and not item.stash.get(_LOADS_FORBIDDEN, False):
        return
    handle, name = tempfile.mkstemp(prefix="sarai-forbidden-loads-", suffix=".txt")
    os.close(handle)
    record = Path(name)
    item._forbidden_loads = (record, os.environ.get(load_guard.ENV), os.environ.get("PYTHONPATH"))
    os.environ[load_guard.ENV] = str(record)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(GUARD_DIR), os.environ.get("PYTHONPATH")) if p)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    try:
        return (yield)
    finally:
        saved = getattr(item, "_forbidden_loads", None)
        if saved is not None:
            record, env, pythonpath = saved
            for name, value in ((load_guard.ENV, env), ("PYTHONPATH", pythonpath)):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            loads = record.read_text(encoding="utf-8").strip()
            record.unlink()
            if loads:
                pytest.fail(f"{item.nodeid} loads a model but is not marked `models`:\n{loads}",
                            pytrace=False)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own config or plugin switches must not leak into the tests."""
    for name in ("SARAI_ROUTER_CONFIG", "SARAI_ROUTER_NO_PLUGINS", "SARAI_ROUTER_TRACE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The folder holding the real default models; fails (not skips) if they are missing."""
    folder = default_models_dir()
    missing = [name for name in (FAST_FILE, QUALITY_FILE) if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"real models missing from {folder}: {', '.join(missing)}; "
                    "run `sarai-router models pull` first", pytrace=False)
    return folder


@pytest.fixture
def fast_path(models_dir: Path) -> Path:
    return models_dir / FAST_FILE


@pytest.fixture
def quality_path(models_dir: Path) -> Path:
    return models_dir / QUALITY_FILE


def base_toml(models_dir: Path, **parts: str) -> str:
    """The base config; ``parts`` replace the body of [routing], [cache], [models.fast] or
    [models.quality] (keys: routing, cache, fast, quality)."""
    unknown = set(parts) - set(BASE_PARTS)
    assert not unknown, f"unknown base config parts: {unknown}"
    body = {name: textwrap.dedent(parts.get(name, default)) for name, default in BASE_PARTS.items()}
    return BASE_TOML.format(models_dir=models_dir.as_posix(), fast_file=FAST_FILE,
                            quality_file=QUALITY_FILE, **body)


@pytest.fixture
def write_config(tmp_path: Path, models_dir: Path) -> Callable[..., Path]:
    """``write_config(extra="", base=True, name="sarai.toml", **parts)`` -> a TOML file's path.

    ``extra`` (new tables only: TOML forbids redefining one) is appended to the two-model
    base config, whose open tables ``parts`` may rewrite (see :func:`base_toml`);
    ``base=False`` writes ``extra`` alone.
    """

    def write(extra: str = "", *, base: bool = True, name: str = "sarai.toml", **parts: str) -> Path:
        text = (base_toml(models_dir, **parts) if base else "") + "\n" + textwrap.dedent(extra)
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_config(write_config: Callable[..., Path]) -> Callable[..., Config]:
    """``make_config(...)``: ``write_config(...)``'s file, loaded."""

    def make(extra: str = "", **kwargs) -> Config:
        return load_config(write_config(extra, **kwargs))

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    """The base two-model config: fast (pinned) and quality (lazy), text only."""
    return make_config()


# -- a real remote OpenAI-compatible endpoint -------------------------------------------

#: The key the remote endpoint below requires (and the env var the router reads it from).
UPSTREAM_KEY = "sk-upstream-secret-4f9d2a"
UPSTREAM_KEY_ENV = "SARAI_TEST_UPSTREAM_KEY"


from sarai_router.testing import free_port  # noqa: E402 - test modules import it from here


@pytest.fixture(scope="session")
def llama_cpp_server(models_dir: Path, tmp_path_factory):
    """``python -m llama_cpp.server`` with the fast model on 127.0.0.1, requiring
    UPSTREAM_KEY: an OpenAI-compatible endpoint written by others. Yields its base URL.
    Fails (never skips) when it does not come up."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("llama_cpp_server") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            # llama_cpp.server, with repacking off on AMX CPUs as our backends do.
            [sys.executable, str(Path(__file__).with_name("llama_cpp_server_launcher.py")),
             "--model", str(models_dir / FAST_FILE),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024",
             "--n_threads", "1", "--api_key", UPSTREAM_KEY, "--verbose", "False",
             # Its default stops a streaming answer when another request arrives; queue
             # them instead, as the endpoints the router fronts do.
             "--interrupt_requests", "False"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"python -m llama_cpp.server exited with {process.returncode}:\n"
                            + log.read_text(errors="replace")[-3000:], pytrace=False)
            try:
                request = urllib.request.Request(
                    url + "/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("python -m llama_cpp.server did not answer within 120 s:\n"
                            + log.read_text(errors="replace")[-3000:], pytrace=False)
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def dead_url() -> str:
    """An OpenAI base URL on a free port where nothing listens: a real refused connection."""
    return f"http://127.0.0.1:{free_port()}/v1"


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` for a child that a test sends Ctrl-C: SIGINT back to its default.

    A suite started in the background by a non-interactive shell (``cmd &``, ``nohup``)
    inherits SIGINT ignored, and so would every child it starts; Python then installs no
    KeyboardInterrupt handler, and the test would see its Ctrl-C ignored, whatever the code
    does with one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

