"""Backend ``llama_server``: the router runs the real llama-server binary, one child per model.

The binary is ``$SARAI_ROUTER_LLAMA_SERVER`` when it is set (the user's own build), else
the one from ``build_llama_server()`` (built from the llama-cpp-python sdist on first use,
then cached); it reaches the router through ``$SARAI_ROUTER_LLAMA_SERVER``, the way a user
points at their own. Nothing here is skipped: a missing binary is built, a
missing model fails loudly (conftest).

Tests wait on states (a process gone, a slot processing, a metric counted) with generous
deadlines, never on how long something took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import tomllib
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_FILE
from sarai_router.backend import GenerationParams
from sarai_router.loading import load_config
from sarai_router.engine import Engine
from sarai_router.errors import BackendError, ConfigError, InstanceDead
from sarai_router.default_plugins.llama_server_install import (
    BINARY_ENV, CACHE_ENV, LlamaServerNotFound, build_llama_server, find_llama_server)
from sarai_router.testing import start_serve
from sarai_router.types import ChatRequest

pytestmark = pytest.mark.llama_server

#: Deadline for a state we wait on (a start on a busy 2-core machine, a process exit).
DEADLINE = 120.0


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The real llama-server: ``$SARAI_ROUTER_LLAMA_SERVER`` if set, else built once from
    the package index, then cached."""
    if os.environ.get(BINARY_ENV):
        try:
            return find_llama_server()
        except LlamaServerNotFound as exc:
            pytest.fail(str(exc), pytrace=False)
    return build_llama_server(report=lambda message: print(message, file=sys.stderr,
                                                           flush=True))


@pytest.fixture(autouse=True)
def _binary_env(monkeypatch: pytest.MonkeyPatch, llama_server_binary: Path) -> None:
    monkeypatch.setenv(BINARY_ENV, str(llama_server_binary))


def config_text(models_dir: Path, fast: str = "", cache: str = "") -> str:
    """A one-model config: ``fast`` on llama_server; ``fast``/``cache`` are TOML lines that
    add to or override the defaults of those tables."""
    model = {"backend": "llama_server", "path": f"{{models_dir}}/{FAST_FILE}", "n_ctx": 512,
             "max_tokens": 16, "parallel": 2, "n_threads": 1,
             **tomllib.loads(textwrap.dedent(fast))}
    return tomli_w.dumps({
        "paths": {"models_dir": models_dir.as_posix()},
        "routing": {"default_model": "fast"},
        "cache": {"ttl_seconds": 60, "max_loaded": 2, **tomllib.loads(textwrap.dedent(cache))},
        "plugins": {"heuristic": {"conversation_model": "fast", "multimodal_model": "fast"}},
        "models": {"fast": model},
    })


@pytest.fixture
def engine_for(tmp_path: Path, models_dir: Path):
    """``engine_for(fast=..., cache=...)``: an Engine on a llama_server config; closed after."""
    engines: list[Engine] = []

    def make(**parts: str) -> Engine:
        path = tmp_path / "sarai.toml"
        path.write_text(config_text(models_dir, **parts), encoding="utf-8")
        engine = Engine(load_config(path))
        engine.events = []  # type: ignore[attr-defined]
        engine.hooks.subscribe(engine.events.append, "test")  # type: ignore[attr-defined]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def kinds(engine: Engine) -> list[str]:
    """What the pool did with the model's instance (per-request events left out)."""
    return [f"{e.kind}:{e.data['reason']}" if e.kind == "model_unloaded" else e.kind
            for e in engine.events  # type: ignore[attr-defined]
            if not e.kind.startswith(("generation_", "runaway_"))
            and e.kind not in ("model_loading", "routed", "queued")]


def loaded_model(engine: Engine, name: str = "fast"):
    resident = engine.pool._residents[name]
    assert resident.state == "loaded"
    return resident.model


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.loads(response.read())


def wait_for(predicate, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def gone(pid: int, created: float) -> bool:
    """The process ``pid`` started at ``created`` has exited (a zombie holds no memory)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() != created or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


HELLO = ChatRequest.from_prompt("Say hello.")


# -- config ------------------------------------------------------------------------------


def test_config_check_names_each_bad_key(tmp_path: Path, models_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "sarai.toml"
    path.write_text(config_text(models_dir, fast="""\
        parallel = 0
        server_args = ["--port", "9999", "--ctx-size=4096", "--cache-ram", "64"]
        binary = "no-such-dir/llama-server"
        """), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_files=True)
    text = str(caught.value)
    assert "models.fast.parallel: must be >= 1" in text
    assert "'--port' is managed by the router" in text
    assert "'--ctx-size' is managed by the router: use `n_ctx`" in text
    assert "--cache-ram" not in text  # anything else goes through
    assert "models.fast.binary" in text and "sarai-router engines install" in text


def test_config_check_without_any_binary_says_how_to_get_one(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(BINARY_ENV)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    path = tmp_path / "sarai.toml"
    path.write_text(config_text(models_dir), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_files=True)
    assert ("models.fast.binary: no llama-server found" in str(caught.value)
            and "sarai-router engines install" in str(caught.value))
    # Without file checks the config loads; the first load says the same.
    engine = Engine(load_config(path))
    with pytest.raises(BackendError, match="no llama-server found.*engines install"):
        engine.complete(HELLO)


def test_ram_estimate_counts_every_slot(tmp_path: Path, models_dir: Path):
    estimates = {}
    for parallel in (1, 4):
        path = tmp_path / f"p{parallel}.toml"
        path.write_text(config_text(models_dir, fast=f"parallel = {parallel}"), encoding="utf-8")
        engine = Engine(load_config(path))
        backend = engine.hooks.backend("llama_server")
        estimates[parallel] = backend.describe(engine.config.models["fast"])["estimated_ram"]
    assert estimates[4]["kv_cache_mb"] == pytest.approx(4 * estimates[1]["kv_cache_mb"], abs=0.5)
    assert estimates[4]["weights_mb"] == estimates[1]["weights_mb"] > 50


# -- the child's life --------------------------------------------------------------------


@pytest.mark.models
def test_first_use_starts_a_healthy_child_that_the_budget_measures(engine_for):
    engine = engine_for()
    me = psutil.Process()
    assert not engine.pool.is_loaded("fast")
    assert not [p for p in me.children() if p.name() == "llama-server"]

    completion = engine.complete(HELLO, GenerationParams(max_tokens=8, seed=1))

    assert completion.text and completion.usage.completion_tokens > 0
    model = loaded_model(engine)
    assert model.pid in [p.pid for p in me.children()]
    assert get_json(model.base_url + "/health")[0] == 200
    # `n_ctx` is per slot: the server got n_ctx x parallel and split it.
    status, slots = get_json(model.base_url + "/slots")
    assert [slot["n_ctx"] for slot in slots] == [512, 512]
    # The budget counts the child's measured RSS, not the router's own growth.
    row = engine.pool.residents()[0]
    child_mb = psutil.Process(model.pid).memory_info().rss / 2**20
    assert row["measured_mb"] == pytest.approx(child_mb, rel=0.25)
    assert row["ram_mb"] >= row["measured_mb"] > 50
    assert row["concurrency"] == 2


@pytest.mark.models
def test_pinned_model_starts_with_the_router_and_stops_with_it(engine_for):
    engine = engine_for(fast="pinned = true")
    assert engine.start() == ["fast"]
    model = loaded_model(engine)
    pid, created = model.pid, psutil.Process(model.pid).create_time()
    assert get_json(model.base_url + "/health")[0] == 200
    assert kinds(engine) == ["model_loaded"]

    engine.close()

    assert gone(pid, created)
    assert "unload_unverified" not in kinds(engine)


@pytest.mark.models
def test_ttl_expiry_stops_the_process_and_releases_its_memory(engine_for):
    engine = engine_for(fast="ttl_seconds = 1")
    engine.complete(HELLO, GenerationParams(max_tokens=4))
    model = loaded_model(engine)
    pid, created = model.pid, psutil.Process(model.pid).create_time()
    held_mb = model.rss_mb()
    assert held_mb > 50

    assert engine.pool.reap(now=engine.pool.clock() + 5) == ["fast"]

    assert gone(pid, created)
    assert model.rss_mb() == 0.0
    assert kinds(engine) == ["model_loaded", "model_unloaded:expire"]  # no unload_unverified: the RSS went with it
    assert engine.pool.residents() == []


@pytest.mark.models
def test_concurrent_requests_share_the_slots_of_one_child(engine_for):
    # --ignore-eos: each answer runs to max_tokens, so both are still generating when looked at.
    engine = engine_for(fast="""\
        n_ctx = 2048
        server_args = ["--ignore-eos"]
        """)
    params = GenerationParams(max_tokens=1500, seed=1)
    started = [threading.Event(), threading.Event()]
    release = threading.Event()
    errors: list[BaseException] = []

    def generate(index: int) -> None:
        try:
            decision = engine.prepare(HELLO, prewarm=False)
            pieces = engine.stream(HELLO, decision, params)
            next(pieces)
            started[index].set()
            release.wait(DEADLINE)
            pieces.close()  # hangs up: the child stops that slot
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started[index].set()

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        for event in started:
            assert event.wait(DEADLINE), "a stream never produced its first piece"
        assert not errors, errors
        model = loaded_model(engine)
        status, slots = get_json(model.base_url + "/slots")
        assert [slot["is_processing"] for slot in slots] == [True, True]
        assert engine.pool.residents()[0]["users"] == 2
        assert [e for e in kinds(engine) if e == "model_loaded"] == ["model_loaded"]  # one child for both
    finally:
        release.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert not errors, errors
    wait_for(lambda: not any(s["is_processing"]
                             for s in get_json(model.base_url + "/slots")[1]),
             "the child to stop both slots after the hang-ups")


@pytest.mark.models
def test_a_child_killed_mid_answer_fails_that_answer_and_restarts_for_the_next(engine_for):
    engine = engine_for(fast="""\
        n_ctx = 2048
        server_args = ["--ignore-eos"]
        """)
    decision = engine.prepare(HELLO, prewarm=False)
    pieces = engine.stream(HELLO, decision, GenerationParams(max_tokens=1500))
    next(pieces)
    first = loaded_model(engine)

    os.kill(first.pid, signal.SIGKILL)
    with pytest.raises(InstanceDead, match="its llama-server .* died .*SIGKILL"):
        for _ in pieces:
            pass

    assert kinds(engine) == ["model_loaded", "model_crashed"]
    assert engine.pool.residents() == []  # the dead instance is dropped at once
    completion = engine.complete(HELLO, GenerationParams(max_tokens=4))
    assert completion.usage.completion_tokens > 0
    assert loaded_model(engine).pid != first.pid
    assert kinds(engine) == ["model_loaded", "model_crashed", "model_loaded"]


@pytest.mark.models
def test_a_child_that_dies_while_idle_is_dropped_and_started_again(engine_for):
    engine = engine_for()
    engine.complete(HELLO, GenerationParams(max_tokens=4))
    first = loaded_model(engine)
    created = psutil.Process(first.pid).create_time()
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: not first.alive(), "the child to be seen dead")

    completion = engine.complete(HELLO, GenerationParams(max_tokens=4))

    assert completion.usage.completion_tokens > 0
    assert gone(first.pid, created)
    assert loaded_model(engine).pid != first.pid
    assert kinds(engine) == ["model_loaded", "model_crashed", "model_loaded"]


@pytest.mark.models
def test_a_child_that_fails_to_start_is_reported_with_its_last_lines(
        tmp_path: Path, models_dir: Path):
    private = tmp_path / "my private folder"  # a space: the path is not one word
    private.mkdir()
    broken = private / "broken.gguf"
    broken.write_bytes(b"GGUF but not really" * 64)
    path = tmp_path / "sarai.toml"
    path.write_text(config_text(models_dir, fast=f'path = "{broken.as_posix()}"'),
                    encoding="utf-8")
    engine = Engine(load_config(path))
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(BackendError) as caught:
        engine.complete(HELLO)
    message = str(caught.value)
    assert "llama-server exited during start-up (exit code" in message
    assert "broken.gguf" in message  # the model's file name...
    assert "private folder" not in message  # ...but not where the user keeps it
    assert engine.pool.residents() == []
    wait_for(lambda: {p.pid for p in psutil.Process().children()
                      if p.status() != psutil.STATUS_ZOMBIE} <= before,
             "no child left behind")


# -- under `sarai-router serve` ----------------------------------------------------------


class Serve:
    """A real `sarai-router serve` subprocess on a llama_server config."""

    def __init__(self, folder: Path, models_dir: Path, fast: str = "pinned = true"):
        self.config = folder / "sarai.toml"
        self.config.write_text(config_text(models_dir, fast=fast,
                                           cache="reap_interval_seconds = 0.25"),
                               encoding="utf-8")
        self.log = folder / "serve.log"
        self.server = start_serve(self.config, echo=False, log_path=self.log, timeout=DEADLINE,
                                  env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})
        self.port, self.url, self.process = self.server.port, self.server.url, \
            self.server.process

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return None

    def wait(self, predicate, what: str) -> None:
        try:
            wait_for(predicate, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; serve's log:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.process.pid).children()
                if p.name() == "llama-server" and p.status() != psutil.STATUS_ZOMBIE]

    def models(self) -> dict[str, dict]:
        return {row["id"]: row for row in get_json(self.url + "/v1/models")[1]["data"]}

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def chat(self, text: str = "Say hello.") -> dict:
        body = json.dumps({"model": "fast", "max_tokens": 4,
                           "messages": [{"role": "user", "content": text}]}).encode()
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.server.stop(timeout=30)


@pytest.fixture(scope="module")
def serve(tmp_path_factory, models_dir, llama_server_binary):
    os.environ[BINARY_ENV] = str(llama_server_binary)  # read by the subprocess
    server = Serve(tmp_path_factory.mktemp("serve"), models_dir)
    try:
        yield server
    finally:
        server.stop()
        os.environ.pop(BINARY_ENV, None)


@pytest.mark.models
def test_serve_runs_the_pinned_model_as_its_child(serve: Serve):
    serve.wait(lambda: serve.models()["fast"]["loaded"], "the pinned model to load")
    children = serve.children()
    assert len(children) == 1
    assert "--parallel" in children[0].cmdline()
    row = serve.models()["fast"]
    assert row["loaded"] is True and row["state"] == "loaded"
    assert row["resident"]["concurrency"] == 2
    answer = serve.chat()
    assert answer["model"] == "fast" and answer["usage"]["completion_tokens"] > 0


@pytest.mark.models
def test_serve_counts_a_crashed_child_and_starts_it_again(serve: Serve):
    serve.wait(lambda: len(serve.children()) == 1, "serve's llama-server child")
    before = serve.metric("sarai_backend_crashes_total", model="fast")
    victim = serve.children()[0]
    victim.kill()

    answer = serve.chat()

    assert answer["usage"]["completion_tokens"] > 0
    assert serve.metric("sarai_backend_crashes_total", model="fast") == before + 1
    (child,) = serve.children()
    assert child.pid != victim.pid
    assert serve.models()["fast"]["loaded"] is True


@pytest.mark.models
def test_no_orphan_when_serve_is_killed_with_sigkill(tmp_path: Path, models_dir: Path,
                                                     llama_server_binary: Path):
    server = Serve(tmp_path, models_dir)
    try:
        server.wait(lambda: len(server.children()) == 1, "serve's llama-server child")
        (child,) = server.children()
        created = child.create_time()

        server.process.kill()
        server.process.wait()

        wait_for(lambda: gone(child.pid, created),
                 "the llama-server child to exit after its router was SIGKILLed", timeout=30)
    finally:
        server.stop()


@pytest.mark.models
def test_the_example_config_checks_and_serves_four_slots():
    example = Path(__file__).resolve().parent.parent / "config" / "llama-server.toml"
    config = load_config(example, check_files=True)
    assert config.models["fast"].backend == "llama_server"
    engine = Engine(config)
    try:
        completion = engine.complete(HELLO, GenerationParams(max_tokens=4), model="fast")
        assert completion.usage.completion_tokens > 0
        status, slots = get_json(loaded_model(engine).base_url + "/slots")
        assert [slot["n_ctx"] for slot in slots] == [2048] * 4
    finally:
        engine.close()


@pytest.mark.models
def test_a_port_taken_before_the_child_binds_it_is_recognised(llama_server_binary: Path,
                                                                fast_path: Path):
    from sarai_router.default_plugins.llama_server_process import ServerProcess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess("fast", [str(llama_server_binary), "--model", str(fast_path),
                                        "--host", "127.0.0.1", "--port", str(port)], port)
        with pytest.raises(BackendError, match="exited during start-up"):
            server.start(timeout=DEADLINE)
    assert server.bind_failed()  # what makes load() retry on another port
    assert not server.alive()


@pytest.mark.models
def test_a_schema_too_big_for_llama_cpp_is_refused_before_the_child_sees_it(engine_for):
    """llama-server parses grammars with the same recursive llama.cpp parser: the same
    limits apply, and the child is never handed a schema that could take it down."""
    from sarai_router.backend import GenerationParams
    from sarai_router.errors import InvalidRequest

    engine = engine_for()
    for schema, keyword in (
            ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}},
             "maxLength at #/properties/s/maxLength"),
            ({"type": "string", "pattern": "^(a?){120}a{120}$"}, "pattern at #/pattern")):
        params = GenerationParams(max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        with pytest.raises(InvalidRequest, match=keyword):
            engine.complete(HELLO, params)
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "maxItems": 100000}}}}}
    with pytest.raises(InvalidRequest, match=r"tools\[0\]\.function\.parameters: maxItems"):
        engine.complete(HELLO, GenerationParams(max_tokens=8, tools=(tool,),
                                                tool_choice="required"))
    assert engine.complete(HELLO).usage.completion_tokens > 0
