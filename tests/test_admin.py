"""Residency control from outside: the pool's ``status()`` and ``unload_when_idle()``, the
admin API of a real ``sarai-router serve`` (models, load, unload, route, events) and the
``models ps|load|unload --server`` commands, on the real models.

The pool tests hold a real generation slot open from a thread to show that an unload waits
for it; the server tests use a real HTTP client against a server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import base_toml
from sarai_router.errors import ModelBusy, ModelPinned
from sarai_router.plugins import Hooks, build_plugins
from sarai_router.pool import ModelPool
from sarai_router.testing import SARAI_ROUTER, free_port, start_serve

API_KEY = "admin-key-1"
QUALITY_TTL = 3600.0


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool_for(make_config):
    pools: list[ModelPool] = []

    def make(**parts) -> ModelPool:
        config = make_config(**parts)
        pool = ModelPool(config, Hooks(build_plugins(config), config), clock=FakeClock())
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def rows(pool: ModelPool) -> dict[str, dict]:
    return {row["name"]: row for row in pool.status()}


# -- the pool --------------------------------------------------------------------------------


def test_status_lists_every_configured_model_unloaded_at_first(pool_for):
    pool = pool_for(cache="ttl_seconds = 30")
    status = rows(pool)
    assert set(status) == {"fast", "quality"}
    assert status["fast"]["pinned"] and not status["quality"]["pinned"]
    for row in status.values():
        assert row["state"] == "unloaded" and row["rss_mb"] is None
        assert row["in_flight"] == row["queued"] == 0 and row["last_used"] is None
    assert status["fast"]["ttl_seconds"] is None and status["quality"]["ttl_seconds"] == 30


@pytest.mark.models
def test_status_counts_down_the_ttl_and_shows_rss_and_requests(pool_for):
    pool = pool_for(cache="ttl_seconds = 30")
    clock = pool.clock
    with pool.use("quality"):
        row = rows(pool)["quality"]
        assert row["state"] == "loaded" and row["in_flight"] == 1 and row["queued"] == 0
        assert row["expires_in_seconds"] is None  # in use: its idle clock has not started
        assert row["rss_mb"] > 50  # a 270M-parameter model, measured
        clock.now += 5
    clock.now += 12
    row = rows(pool)["quality"]
    assert row["in_flight"] == 0 and row["idle_seconds"] == 12.0
    assert row["expires_in_seconds"] == 18.0
    assert abs(row["expires_at"] - (time.time() + 18.0)) < 2
    assert abs(row["last_used"] - (time.time() - 12.0)) < 2
    pool.ensure_loaded("fast")
    fast = rows(pool)["fast"]
    assert fast["state"] == "loaded" and fast["expires_in_seconds"] is None  # pinned


@pytest.mark.models
def test_unload_when_idle_waits_for_the_generation_in_flight(pool_for):
    pool = pool_for()
    holding, release = threading.Event(), threading.Event()

    def generate() -> None:
        with pool.use("quality"):
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=generate)
    worker.start()
    assert holding.wait(60)
    outcome: list = []
    unloader = threading.Thread(target=lambda: outcome.append(
        pool.unload_when_idle("quality", timeout=60)))
    unloader.start()
    time.sleep(0.5)
    # Still generating: the unload waits, the model stays.
    assert unloader.is_alive() and rows(pool)["quality"]["state"] == "loaded"
    release.set()
    worker.join(30)
    unloader.join(30)
    assert outcome == [True]
    assert rows(pool)["quality"]["state"] == "unloaded"
    assert pool.unload_when_idle("quality") is False  # not resident any more


@pytest.mark.models
def test_unload_when_idle_gives_up_on_a_busy_model_and_refuses_a_pinned_one(pool_for):
    pool = pool_for()
    pool.ensure_loaded("fast")
    with pytest.raises(ModelPinned, match=r"pinned.*\[models.fast\] pinned = true"):
        pool.unload_when_idle("fast")
    assert rows(pool)["fast"]["state"] == "loaded"
    with pool.use("quality"):
        with pytest.raises(ModelBusy, match=r"still in use \(1 request generating or queued\) "
                                            r"after 0.3 s"):
            pool.unload_when_idle("quality", timeout=0.3)
        assert rows(pool)["quality"]["state"] == "loaded"


@pytest.mark.models
def test_unload_when_idle_stops_waiting_once_cancelled(pool_for):
    pool = pool_for()
    cancel = threading.Event()
    with pool.use("quality"):
        timer = threading.Timer(0.3, lambda: (cancel.set(), pool.wake()))
        timer.start()
        started = time.monotonic()
        with pytest.raises(ModelBusy, match=r"gave up unloading model 'quality': cancelled"):
            pool.unload_when_idle("quality", timeout=60, cancel=cancel)
        # Given up at the cancel, not at the 60 s timeout.
        assert time.monotonic() - started < 30
        timer.join()
    assert rows(pool)["quality"]["state"] == "loaded"


# -- a real server ---------------------------------------------------------------------------


class Served:
    def __init__(self, url: str, config: Path):
        self.url, self.config = url, config

    def call(self, method: str, path: str, body=None, key: str | None = API_KEY,
             timeout: float = 120) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, json=body, headers=headers,
                             timeout=timeout)

    def status(self) -> dict[str, dict]:
        answer = self.call("GET", "/admin/models")
        assert answer.status_code == 200, answer.text
        return {row["name"]: row for row in answer.json()["models"]}

    def cli(self, *args: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SARAI_ROUTER_API_KEY"}
        if key:
            env["SARAI_ROUTER_API_KEY"] = key
        return subprocess.run([SARAI_ROUTER, "--config", str(self.config), *args], env=env,
                              capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def served(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("admin")
    port = free_port()
    config = folder / "sarai.toml"
    # The port in [server] too: `models ps` without --server finds the server there.
    config.write_text(base_toml(
        models_dir, cache=f"ttl_seconds = {QUALITY_TTL}\nmax_loaded = 2",
        fast="pinned = true\nn_threads = 1", quality="n_threads = 1")
        + f"\n[server]\nport = {port}\napi_key = \"{API_KEY}\"\n", encoding="utf-8")
    with start_serve(config, port=port, echo=False,
                     env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"}) as server:
        yield Served(server.url, config)


@pytest.mark.models
def test_ps_shows_the_pinned_model_loaded_and_the_lazy_one_not(served):
    result = served.cli("models", "ps", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    status = {row["name"]: row for row in data["models"]}
    assert status["fast"]["state"] == "loaded" and status["fast"]["pinned"]
    assert status["fast"]["rss_mb"] > 0 and data["resident_mb"] >= status["fast"]["rss_mb"]
    assert status["quality"]["state"] in ("unloaded", "loaded")
    table = served.cli("models", "ps")  # the default URL: the config's [server] port
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "RSS"]
    fast_line = next(line for line in lines if line.startswith("fast"))
    assert fast_line.split()[1] == "loaded" and "never" in fast_line


@pytest.mark.models
def test_load_then_unload_through_the_cli(served):
    loaded = served.cli("models", "load", "quality", "--server", served.url)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("quality: ")
    row = served.status()["quality"]
    assert row["state"] == "loaded" and row["rss_mb"] > 0
    assert 0 < row["expires_in_seconds"] <= QUALITY_TTL
    again = served.cli("models", "load", "quality", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_loaded"] is True
    unloaded = served.cli("models", "unload", "quality")
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.strip() == "quality: unloaded"
    assert served.status()["quality"]["state"] == "unloaded"
    twice = served.cli("models", "unload", "quality")
    assert twice.returncode == 0 and twice.stdout.strip() == "quality: was not loaded"


@pytest.mark.models
def test_a_pinned_model_is_refused_with_a_clear_message(served):
    result = served.cli("models", "unload", "fast")
    assert result.returncode == 2
    assert "model 'fast' is pinned" in result.stderr and "Traceback" not in result.stderr
    answer = served.call("POST", "/admin/models/unload", {"model": "fast"})
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "model_pinned"
    assert served.status()["fast"]["state"] == "loaded"


@pytest.mark.models
def test_cli_errors_say_what_is_wrong(served):
    nokey = served.cli("models", "ps", "--api-key", "wrong", key=None)
    assert nokey.returncode == 2 and "refused the API key" in nokey.stderr
    unknown = served.cli("models", "load", "gpt-4")
    assert unknown.returncode == 2 and "unknown model 'gpt-4'" in unknown.stderr
    down = served.cli("models", "ps", "--server", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the server" in down.stderr
    bad = served.cli("models", "ps", "--server", "localhost:8000")
    assert bad.returncode == 2 and "not an http:// or https:// URL" in bad.stderr
    for result in (nokey, unknown, down, bad):
        assert "Traceback" not in result.stderr


@pytest.mark.models
def test_an_unload_waits_for_the_answer_in_flight(served):
    assert served.call("POST", "/admin/models/load", {"model": "quality"}).status_code == 200
    body = {"model": "quality", "stream": True, "max_tokens": 48,
            "messages": [{"role": "user", "content": "Tell me a long story about a cat."}]}
    chunks: list[dict] = []
    finished_at: list[float] = []
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {API_KEY}"}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        chunks.append(json.loads(first[6:]))
        during = served.status()["quality"]
        assert during["state"] == "loaded" and during["in_flight"] == 1, during
        assert during["expires_in_seconds"] is None  # busy: no idle clock
        # The answer is under way: ask for the unload now, from another thread.
        outcome: list[httpx.Response] = []
        unloader = threading.Thread(target=lambda: outcome.append(served.call(
            "POST", "/admin/models/unload", {"model": "quality"})))
        unloader.start()
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        finished_at.append(time.monotonic())
    unloader.join(120)
    answer = outcome[0]
    assert answer.status_code == 200, answer.text
    assert answer.json()["unloaded"] is True
    # The answer was not cut: it ended on its own terms.
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert reasons[-1] in ("stop", "length"), chunks[-3:]
    assert served.status()["quality"]["state"] == "unloaded"


@pytest.mark.models
def test_the_playground_routes_without_loading_or_generating(served):
    served.call("POST", "/admin/models/unload", {"model": "quality"})
    prompt = "Describe this photo of my garden, please, in detail: <b>foto</b>"
    answer = served.call("POST", "/admin/route", {
        "model": "auto", "messages": [{"role": "user", "content": prompt}]})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    decision, trace = data["decision"], data["trace"]
    assert decision["model"] == "quality" and decision["plugin"] == "heuristic"
    assert decision["reason"]
    deciders = [step for step in trace if step["decided"]]
    assert [step["plugin"] for step in deciders] == ["heuristic"]
    assert deciders[0]["model"] == "quality"
    assert data["signals"]["chars"] == {"value": len(prompt), "plugin": "signals"}
    assert data["signals"]["empathy"]["plugin"] == "empathy"
    # Nothing loaded, nothing pre-warmed: a playground decision costs no RAM.
    time.sleep(0.5)
    assert served.status()["quality"]["state"] == "unloaded"


@pytest.mark.models
def test_the_event_stream_carries_a_request_and_the_models_status(served):
    seen: list[dict] = []
    ready = threading.Event()
    failures: list[BaseException] = []

    def read() -> None:
        try:
            follow()
        except BaseException as exc:  # shown by the assertion below
            failures.append(exc)
            ready.set()

    def follow() -> None:
        with httpx.stream("GET", served.url + "/admin/events", timeout=60,
                          headers={"authorization": f"Bearer {API_KEY}"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                frame = json.loads(line[6:])
                seen.append(frame)
                if frame["type"] == "live":
                    ready.set()  # what came before is the recent past, replayed
                elif ready.is_set() and frame.get("kind") == "generation_finished":
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(30) and not failures, (failures, seen)
    chat = served.call("POST", "/v1/chat/completions", {
        "model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi!"}]})
    assert chat.status_code == 200, chat.text
    request_id = chat.headers["x-request-id"]
    reader.join(60)
    assert seen[0]["type"] == "status"
    # The configured models, and the speech model (a resident the whisper plugin adds).
    assert {row["name"] for row in seen[0]["models"]} == {"fast", "quality", "whisper"}
    ours = [f for f in seen if f["type"] == "event" and f["data"].get("request_id") == request_id]
    kinds = [f["kind"] for f in ours]
    assert "routed" in kinds and kinds[-1] == "generation_finished", kinds
    routed = ours[kinds.index("routed")]
    assert routed["model"] == "fast" and routed["data"]["plugin"] == "heuristic"
    assert routed["data"]["reason"] and "empathy" in routed["data"]["signals"]
    finished = ours[-1]["data"]
    assert finished["completion_tokens"] > 0 and finished["finish_reason"]


@pytest.mark.models
def test_the_page_loads_without_the_key_and_its_data_needs_it(served):
    page = served.call("GET", "/ui", key=None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/ui/app.js", "/ui/app.css"):
        assert served.call("GET", path, key=None).status_code == 200
    for path in ("/admin/models", "/admin/events"):
        refused = served.call("GET", path, key=None)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.models
def test_an_open_event_stream_does_not_hold_up_a_stop(tmp_path, models_dir):
    port = free_port()
    config = tmp_path / "sarai.toml"
    config.write_text(base_toml(models_dir, fast="pinned = true\nn_threads = 1")
                      + f"\n[server]\nport = {port}\nshutdown_grace_seconds = 20\n",
                      encoding="utf-8")
    server = start_serve(config, port=port, echo=False)
    try:
        with httpx.stream("GET", server.url + "/admin/events", timeout=60) as stream:
            lines = stream.iter_lines()
            assert any(line.startswith('data: {"type": "live"') for line in lines)
            server.process.terminate()
            for _ in lines:  # the server ends the stream itself
                pass
        assert server.stop() == 0
    finally:
        if server.process.poll() is None:
            server.stop()
    text = server.log()
    # uvicorn cancels what is still open once the grace runs out, and says so.
    assert "graceful shutdown exceeded" not in text and "Traceback" not in text, text[-3000:]


MISROUTING_PLUGIN = '''
from sarai_router import hookimpl


@hookimpl
def select_route(request):
    if "ghost" in request.text:
        return "ghost-model"
    if "boom" in request.text:
        raise RuntimeError("boom")
    return None
'''


def test_the_playground_shows_a_misbehaving_routing_plugin(tmp_path, models_dir):
    """In process, no model loaded: the trace names the plugin that broke routing."""
    from starlette.testclient import TestClient

    from sarai_router.serving import create_app
    from sarai_router.testing import config_from_toml

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "misrouting.py").write_text(MISROUTING_PLUGIN, encoding="utf-8")
    config = config_from_toml(base_toml(models_dir) + '\n[plugins]\ndirs = ["plugins"]\n',
                              base_dir=tmp_path, echo=False)
    app = create_app(config, load_pinned=False)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        def ask(prompt: str) -> dict:
            answer = client.post("/admin/route", json={
                "model": "auto", "messages": [{"role": "user", "content": prompt}]})
            assert answer.status_code == 200, answer.text
            return answer.json()

        ghost = ask("send this to the ghost")
        assert ghost["decision"] is None and "'ghost-model'" in ghost["error"]
        first = ghost["trace"][0]
        assert first == {"plugin": "misrouting", "model": "ghost-model", "reason": None,
                         "error": None, "decided": True}
        boom = ask("boom")
        assert boom["trace"][0]["error"] == "RuntimeError: boom"
        assert not boom["trace"][0]["decided"]
        assert boom["decision"]["plugin"] == "heuristic"
        assert [step["plugin"] for step in boom["trace"] if step["decided"]] == ["heuristic"]
        assert not [r for r in app.state.sarai.engine.pool.status() if r["state"] != "unloaded"]
