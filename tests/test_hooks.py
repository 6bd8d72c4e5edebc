"""The hooks that let plugins see and extend the router: ``observe`` (the event stream),
``register_commands``, ``register_routes``, ``startup`` and ``shutdown``.

Models here use the testing kit's ``echo`` backend (no model file), so nothing loads a
GGUF; the served tests start a real ``sarai-router serve`` through the kit.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sarai_router.backend import GenerationParams
from sarai_router.engine import Engine
from sarai_router.events import EVENT_KINDS, Event, request_scope
from sarai_router.testing import SARAI_ROUTER, config_from_toml, start_serve
from sarai_router.types import ChatRequest, Transcript


@pytest.fixture(autouse=True)
def _forget_plugin_modules():
    yield
    for name in [m for m in sys.modules if m.startswith("sarai_router_plugins_dir.")]:
        del sys.modules[name]


#: A plugin that records every event it sees in ``RECORDED`` (read back by the tests).
RECORDER = """
from sarai_router import hookimpl

RECORDED = []

@hookimpl
def observe(event):
    RECORDED.append(event)
"""

ECHO_MODELS = """
[routing]
default_model = "small"

[cache]
max_loaded = 1

[models.small]
backend = "echo"
max_tokens = 8

[models.big]
backend = "echo"
max_tokens = 8
"""


def plugin_config(tmp_path: Path, plugins: dict[str, str], toml: str = ECHO_MODELS,
                  **kit):
    folder = tmp_path / "plugs"
    folder.mkdir(exist_ok=True)
    for name, source in plugins.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return config_from_toml(f'[plugins]\ndirs = ["plugs"]\ndisable = ["heuristic"]\n{toml}',
                            base_dir=tmp_path, **kit)


def recorded(engine: Engine, plugin: str = "recorder") -> list[Event]:
    return engine.hooks.pm.get_plugin(plugin).RECORDED


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


def test_hook_observe(tmp_path):
    config = plugin_config(tmp_path, {"recorder": RECORDER})
    engine = Engine(config)
    try:
        with request_scope("python", "req_one"):
            completion = engine.complete(ChatRequest.from_prompt("hello there world"))
        events = recorded(engine)
    finally:
        engine.close()
    assert completion.text == "hello there world"
    assert kinds(events) == ["routed", "model_loading", "model_loaded", "generation_started",
                             "generation_finished", "model_unloaded"]
    routed, loading, loaded, started, finished, unloaded = events
    assert routed.model == "small" and routed.data["plugin"] == "(fallback)"
    assert routed.data["fallback"] is True and routed.data["source"] == "python"
    assert finished.data["completion_tokens"] == 3 and finished.data["finish_reason"] == "stop"
    assert finished.data["total_s"] >= finished.data["generation_s"] >= 0
    assert unloaded.data["reason"] == "shutdown"
    # Request-scoped events carry the request's id; every event serialises to JSON.
    for event in (routed, started, finished):
        assert event.data["request_id"] == "req_one"
    for event in events:
        assert set(event.kind) and event.kind in EVENT_KINDS
        json.dumps(event.to_dict())
        assert abs(event.time - events[0].time) < 60
    with pytest.raises(TypeError):
        finished.data["completion_tokens"] = 0  # read-only: one observer can't change another's


def test_each_prepare_without_a_scope_is_its_own_request(tmp_path):
    config = plugin_config(tmp_path, {"recorder": RECORDER})
    engine = Engine(config)
    try:
        for prompt in ("one", "two"):
            engine.complete(ChatRequest.from_prompt(prompt))
        events = recorded(engine)
    finally:
        engine.close()
    ids = [e.data["request_id"] for e in events if e.kind == "generation_finished"]
    assert len(ids) == 2 and ids[0] != ids[1] and all(ids)


def test_an_observer_that_raises_is_logged_counted_and_harms_nothing(tmp_path, caplog):
    config = plugin_config(tmp_path, {"recorder": RECORDER, "broken": """
        from sarai_router import hookimpl

        @hookimpl
        def observe(event):
            raise RuntimeError("observer bug")
    """})
    engine = Engine(config)
    try:
        completion = engine.complete(ChatRequest.from_prompt("still answered"))
        events = recorded(engine)
        assert completion.text == "still answered"
        # Every event reached the healthy observer too, and each failure was counted.
        assert engine.hooks.observer_errors["broken"] == len(events) >= 5
        assert "observer 'broken' raised on a routed event: RuntimeError: observer bug" in \
            caplog.text
    finally:
        engine.close()


def test_queued_fallback_evicted_and_failed_loads_are_events(tmp_path):
    # A remote model whose key variable is unset: its load fails (no model file loads).
    os.environ.pop("SARAI_TEST_UNSET_KEY", None)
    config = plugin_config(tmp_path, {"recorder": RECORDER}, toml=f"""
        [routing]
        default_model = "slow"

        [cache]
        max_loaded = 2

        [models.slow]
        backend = "echo"
        delay_seconds = 0.2

        [models.broken]
        backend = "openai"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "SARAI_TEST_UNSET_KEY"
        fallbacks = ["other"]

        [models.other]
        backend = "echo"
    """)
    engine = Engine(config)
    try:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            engine.complete(ChatRequest.from_prompt("one two")))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert [a.text for a in answers] == ["one two", "one two"]
        fell_back = engine.complete(ChatRequest.from_prompt("hi"), model="broken")
        assert fell_back.decision.model == "other" and fell_back.text == "hi"
        events = recorded(engine)
    finally:
        engine.close()
    queued = [e for e in events if e.kind == "queued"]
    assert len(queued) == 1 and queued[0].model == "slow" and queued[0].data["position"] == 0
    failed = [e for e in events if e.kind == "load_failed"]
    assert [e.model for e in failed] == ["broken"]
    assert "SARAI_TEST_UNSET_KEY" in failed[0].data["error"]
    fallback = [e for e in events if e.kind == "fallback"]
    assert [(e.data["from_model"], e.data["to_model"], e.data["reason"]) for e in fallback] \
        == [("broken", "other", "load_failed")]
    assert fallback[0].data["request_id"] == fell_back.request_id


def test_an_eviction_names_the_model_it_made_room_for(tmp_path):
    config = plugin_config(tmp_path, {"recorder": RECORDER})  # max_loaded = 1
    engine = Engine(config)
    try:
        engine.complete(ChatRequest.from_prompt("a"), model="small")
        engine.complete(ChatRequest.from_prompt("b"), model="big")
        events = recorded(engine)
    finally:
        engine.close()
    evicted = [e for e in events if e.kind == "model_evicted"]
    assert [(e.model, e.data["by"]) for e in evicted] == [("small", "big")]
    assert "max_loaded" in evicted[0].data["reason"]


def test_a_transcription_is_an_event(tmp_path):
    config = plugin_config(tmp_path, {"recorder": RECORDER, "hears": """
        from sarai_router import hookimpl
        from sarai_router.types import Transcript

        @hookimpl
        def transcribe(audio):
            return Transcript(text="words from the clip", language="en", duration=1.5)
    """})
    engine = Engine(config)
    try:
        from sarai_router.types import AudioInput

        transcript = engine.transcribe(AudioInput(data=b"RIFF....", mime="audio/wav",
                                                  source="clip.wav"))
        events = recorded(engine)
    finally:
        engine.close()
    assert isinstance(transcript, Transcript)
    (event,) = [e for e in events if e.kind == "transcribed"]
    assert event.data["language"] == "en" and event.data["chars"] == len("words from the clip")
    assert event.data["plugin"] == "hears"


# -- a plugin in a [plugins] dirs folder, served: the "done when" -------------------

#: Writes every event to events.jsonl next to itself, adds `sarai-router hello` and
#: `GET /hello`, and notes its startup and shutdown.
HELLO_PLUGIN = '''
import json
from pathlib import Path

import click
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from sarai_router import hookimpl

LOG = Path(__file__).with_name("events.jsonl")


def _write(record):
    with LOG.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\\n")


@hookimpl
def observe(event):
    _write(event.to_dict())


@click.command()
@click.option("--name", default="world")
def hello(name):
    """Say hello."""
    click.echo(f"hello, {name}")


@hookimpl
def register_commands(cli):
    cli.add_command(hello)


async def hello_page(request):
    engine = request.app.state.sarai.engine
    return JSONResponse({"hello": "world", "models": sorted(engine.config.models)})


async def hello_echo(request):
    return PlainTextResponse(await request.body())


@hookimpl
def register_routes():
    return [Route("/hello", hello_page, methods=["GET"]),
            Route("/hello/echo", hello_echo, methods=["POST"]),
            Route("/health", hello_page, methods=["GET"])]


@hookimpl
def startup(engine):
    _write({"kind": "plugin_startup", "models": sorted(engine.config.models)})


@hookimpl
def shutdown(engine):
    _write({"kind": "plugin_shutdown"})
'''

KEY = "sk-hello-test"


def _call(url: str, *, key: str | None = None, data: bytes | None = None,
          headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def hello_dir(tmp_path) -> Path:
    folder = tmp_path / "plugs"
    folder.mkdir()
    (folder / "hello_plugin.py").write_text(HELLO_PLUGIN, encoding="utf-8")
    return folder


def test_hook_register_routes(tmp_path, hello_dir):
    """Also ``startup``/``shutdown`` and ``observe`` through a real server: the plugin is a
    file in a ``[plugins] dirs`` folder and the project is not changed for it."""
    config = tmp_path / "sarai.toml"
    config.write_text(textwrap.dedent(f"""
        [plugins]
        dirs = ["{hello_dir.as_posix()}"]
        disable = ["heuristic"]

        [server]
        max_body_bytes = 2048

        [routing]
        default_model = "small"

        [models.small]
        backend = "echo"
    """), encoding="utf-8")
    server = start_serve(config, env={**os.environ, "SARAI_ROUTER_API_KEY": KEY})
    try:
        status, _, body = _call(server.url + "/hello")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        status, _, body = _call(server.url + "/hello", key=KEY)
        assert status == 200 and json.loads(body) == {"hello": "world", "models": ["small"]}
        # The Host allowlist and the body limit hold for a plugin's route as for ours.
        status, _, _ = _call(server.url + "/hello", key=KEY, headers={"Host": "evil.example"})
        assert status == 421
        status, _, body = _call(server.url + "/hello/echo", key=KEY, data=b"x" * 2000)
        assert status == 200 and body == b"x" * 2000
        status, _, body = _call(server.url + "/hello/echo", key=KEY, data=b"x" * 2049)
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        # Chunked, with no Content-Length: counted as it arrives.
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/hello/echo", body=iter([b"x" * 1500, b"x" * 1500]),
                           headers={"Authorization": f"Bearer {KEY}"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "body_too_large"
        connection.close()
        # A plugin can't take over a route the server answers.
        status, _, body = _call(server.url + "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        # A served request: every one of its events is in the plugin's file.
        status, headers, body = _call(
            server.url + "/v1/chat/completions", key=KEY,
            data=json.dumps({"model": "auto", "messages": [
                {"role": "user", "content": "echo me please"}]}).encode(),
            headers={"Content-Type": "application/json", "x-request-id": "req-hello-1"})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == "echo me please"
    finally:
        assert server.stop() == 0, server.log()
    assert "left it out" in server.log()  # the /health route the plugin offered
    records = [json.loads(line) for line in
               (hello_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[0]["kind"] == "plugin_startup" and records[-1]["kind"] == "model_unloaded"
    assert {"kind": "plugin_shutdown"} in records
    ours = [r for r in records if r.get("data", {}).get("request_id") == "req-hello-1"]
    assert [r["kind"] for r in ours] == ["routed", "model_loading", "model_loaded",
                                         "generation_started", "generation_finished"]
    assert all(r["model"] == "small" for r in ours)
    assert ours[0]["data"]["source"] == "http"
    assert ours[-1]["data"]["completion_tokens"] == 3
    refused = [r for r in records if r["kind"] == "request_refused"]
    assert sorted((r["data"]["status"], r["data"]["code"]) for r in refused) == \
        [(413, "body_too_large"), (413, "body_too_large")]


def test_hook_startup(tmp_path, hello_dir):
    """``startup`` runs before the first request is answered, ``shutdown`` once at the end,
    after answers in flight and before the models unload."""
    config = tmp_path / "sarai.toml"
    config.write_text(textwrap.dedent(f"""
        [plugins]
        dirs = ["{hello_dir.as_posix()}"]
        disable = ["heuristic"]

        [routing]
        default_model = "small"

        [models.small]
        backend = "echo"
        pinned = true
    """), encoding="utf-8")
    server = start_serve(config, args=["--allow-unauthenticated"])
    kinds_seen = [json.loads(line)["kind"] for line in
                  (hello_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    # The pinned model loaded first, then the plugin started, all before /health answered.
    assert kinds_seen == ["model_loading", "model_loaded", "plugin_startup"]
    assert server.stop() == 0, server.log()
    kinds_seen = [json.loads(line)["kind"] for line in
                  (hello_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kinds_seen[3:] == ["plugin_shutdown", "model_unloaded"]


def test_hook_shutdown(tmp_path):
    """A plugin's ``shutdown`` that raises is logged; the server still stops cleanly and
    unloads its models."""
    folder = tmp_path / "plugs"
    folder.mkdir()
    (folder / "fails_at_exit.py").write_text(textwrap.dedent("""
        from sarai_router import hookimpl

        @hookimpl
        def shutdown(engine):
            raise RuntimeError("cannot close my file")
    """), encoding="utf-8")
    config = tmp_path / "sarai.toml"
    config.write_text(textwrap.dedent(f"""
        [plugins]
        dirs = ["{folder.as_posix()}"]
        disable = ["heuristic"]

        [routing]
        default_model = "small"

        [models.small]
        backend = "echo"
        pinned = true
    """), encoding="utf-8")
    server = start_serve(config, args=["--allow-unauthenticated"])
    assert server.stop() == 0
    log = server.log()
    assert "plugin 'fails_at_exit' raised in shutdown: RuntimeError: cannot close my file" in log


def test_hook_register_commands(tmp_path, hello_dir):
    """`sarai-router hello` from a plugins-dir plugin, listed in --help; built-in commands
    stay built in."""
    config = tmp_path / "sarai.toml"
    # A real config (no kit, no echo backend): the models' files are not needed here.
    config.write_text(textwrap.dedent(f"""
        [plugins]
        dirs = ["{hello_dir.as_posix()}"]

        [models.fast]
        path = "fast.gguf"

        [models.quality]
        path = "quality.gguf"
    """), encoding="utf-8")
    env = {**os.environ, "SARAI_ROUTER_CONFIG": str(config)}
    done = subprocess.run([SARAI_ROUTER, "hello", "--name", "plugin author"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello, plugin author\n"
    done = subprocess.run([SARAI_ROUTER, "--config", str(config), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands:")[1]
    assert "hello" in commands and "Say hello." in commands and "route" in commands
    done = subprocess.run([SARAI_ROUTER, "--config", str(config), "helo"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "No such command 'helo'" in done.stderr
