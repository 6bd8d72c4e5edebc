"""Backend ``openai`` against real endpoints: ``python -m llama_cpp.server`` (the fast model,
requiring an API key), a free port where nothing listens (a real refused connection), and
a tiny HTTP server in this file that answers 500, 4xx, breaks a stream mid-way or stalls:
faults the real endpoint cannot be made to show. Then fallbacks, capabilities, redaction,
through the engine, the CLI and a real ``sarai-router serve`` process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sarai_router.backend import GenerationParams
from sarai_router.cli import cli
from sarai_router.loading import load_config
from sarai_router.default_plugins.openai import ReplicaSet, redact_url
from sarai_router.engine import Completion, Engine
from sarai_router.errors import (CapabilityError, UpstreamError, UpstreamUnavailable)
from sarai_router.testing import ServeProcess, start_serve
from sarai_router.types import ChatRequest

from conftest import FAST_FILE, UPSTREAM_KEY, UPSTREAM_KEY_ENV, free_port

WRONG_KEY_ENV = "SARAI_TEST_WRONG_KEY"
WRONG_KEY = "sk-wrong-key-77ab31"
QUERY_TOKEN = "qtok-9a8b7c6d5e"


# -- a tiny real HTTP server for the faults llama_cpp.server cannot show ------------------


class _FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self.server.seen.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        kind = self.path.strip("/").split("/")[0]
        if kind == "echo401":  # an upstream that quotes the credential it refuses
            payload = json.dumps({"error": {
                "message": f"invalid api key: {self.headers.get('authorization')}",
                "type": "invalid_request_error"}}).encode()
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if kind.startswith("s") and kind[1:].isdigit():
            payload = json.dumps({"error": {"message": f"fault server says {kind[1:]}",
                                            "type": "test"}}).encode()
            self.send_response(int(kind[1:]))
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        if kind == "midstream":
            for word in ("Hola", " mundo"):
                chunk = {"choices": [{"index": 0, "delta": {"content": word},
                                      "finish_reason": None}]}
                data = f"data: {json.dumps(chunk)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            # Gone without the last chunk: an incomplete chunked body.
            self.close_connection = True
            return
        if kind == "stall":  # headers, then nothing until the test ends
            self.server.release.wait(60)  # type: ignore[attr-defined]
            self.close_connection = True
        if kind == "pings":  # SSE keep-alive comments and never a token, for up to 20 s
            deadline = time.monotonic() + 20
            try:
                while time.monotonic() < deadline and not self.server.release.is_set():
                    data = b": ping\n\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.05)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client gave up: what the test wants
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fault_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultHandler)
    server.daemon_threads = True
    server.seen = []
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.release.set()
    server.shutdown()
    server.server_close()


# -- configs -------------------------------------------------------------------------------


def remote_toml(models_dir: Path, llama: str, dead: str, fault: str, extra: str = "") -> str:
    return f"""\
[paths]
models_dir = "{models_dir.as_posix()}"

[routing]
default_model = "remote"

[cache]
max_loaded = 12

[server]
queue_size = 64

[plugins.heuristic]
conversation_model = "remote"
multimodal_model = "remote"

[models.remote]
backend = "openai"
base_url = "{llama}"
api_key_env = "{UPSTREAM_KEY_ENV}"
n_ctx = 1024
max_tokens = 8

[models.down]
backend = "openai"
base_url = "{dead}?token={QUERY_TOKEN}"
fallbacks = ["remote"]

[models.pair]
backend = "openai"
endpoints = ["{dead}", "{llama}"]
api_key_env = "{UPSTREAM_KEY_ENV}"
max_tokens = 8

[models.fail500]
backend = "openai"
base_url = "{fault}/s503/v1"
fallbacks = ["remote"]

[models.plain500]
backend = "openai"
base_url = "{fault}/s500/v1"

[models.teapot]
backend = "openai"
base_url = "{fault}/s418/v1"
fallbacks = ["remote"]

[models.midstream]
backend = "openai"
base_url = "{fault}/midstream/v1"
fallbacks = ["remote"]

[models.stall]
backend = "openai"
base_url = "{fault}/stall/v1"
timeout_seconds = 0.5

[models.wrongkey]
backend = "openai"
base_url = "{llama}"
api_key_env = "{WRONG_KEY_ENV}"
remote_model = "whatever-upstream-calls-it"

[models.notools]
backend = "openai"
base_url = "{llama}"
api_key_env = "{UPSTREAM_KEY_ENV}"
capabilities = []
max_tokens = 8

[models.fast]
path = "{{models_dir}}/{FAST_FILE}"
n_ctx = 512
max_tokens = 8
n_threads = 1
{extra}
"""


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv(WRONG_KEY_ENV, WRONG_KEY)


@pytest.fixture
def remote_config(tmp_path, models_dir, llama_cpp_server, dead_url, fault_server, keys):
    path = tmp_path / "remote.toml"
    path.write_text(remote_toml(models_dir, llama_cpp_server, dead_url, fault_server[0]),
                    encoding="utf-8")
    return path


@pytest.fixture
def engine(remote_config):
    engine = Engine(load_config(remote_config))
    yield engine
    engine.close()


def hello(text: str = "Hola, ¿qué tal?") -> ChatRequest:
    return ChatRequest.from_prompt(text)


def answer(engine: Engine, model: str, request: ChatRequest | None = None,
           max_tokens: int = 6) -> Completion:
    request = request or hello()
    decision = engine.prepare(request, model=model, prewarm=False)
    completion = Completion(decision=decision)
    for _ in engine.stream(request, decision, GenerationParams(max_tokens=max_tokens,
                                                               temperature=0), completion):
        pass
    return completion


#: Models on the fault server alone: no model file, no llama_cpp.server.
FAULT_TOML = """\
[routing]
default_model = "first"

[plugins.heuristic]
conversation_model = "first"
multimodal_model = "first"

[models.first]
backend = "openai"
base_url = "{fault}/s503/v1"
fallbacks = ["second", "third"]

[models.second]
backend = "openai"
base_url = "{fault}/s502/v1"

[models.third]
backend = "openai"
base_url = "{fault}/s500/v1"

[models.echokey]
backend = "openai"
base_url = "{fault}/echo401/v1"
api_key_env = "{key_env}"

[models.pings]
backend = "openai"
base_url = "{fault}/pings/v1"
timeout_seconds = 0.5
"""


@pytest.fixture
def fault_engine(tmp_path, fault_server, keys):
    path = tmp_path / "faults.toml"
    path.write_text(FAULT_TOML.format(fault=fault_server[0], key_env=UPSTREAM_KEY_ENV),
                    encoding="utf-8")
    engine = Engine(load_config(path))
    yield engine
    engine.close()


# -- config ----------------------------------------------------------------------------------


def test_config_check_names_each_bad_openai_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("""
[routing]
default_model = "a"
[plugins.heuristic]
conversation_model = "a"
multimodal_model = "a"
[models.a]
backend = "openai"
base_url = "ftp://example.invalid/v1"
api_key_env = "sk-123 not a name"
timeout_seconds = 0
max_concurrency = 0
capabilities = ["tools", "telepathy"]
fallbacks = ["a", "nope"]
[models.b]
backend = "openai"
base_url = "http://user:pw@127.0.0.1:9/v1"
[models.c]
backend = "openai"
""", encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "models.a.base_url: must be an http(s) URL" in out
    assert "models.a.api_key_env: must be the NAME of an environment variable" in out
    assert "models.a.timeout_seconds: must be > 0" in out
    assert "models.a.max_concurrency: must be >= 1" in out
    assert "models.a.capabilities: unknown capability 'telepathy'" in out
    assert "models.a.fallbacks[0]: a model cannot fall back to itself" in out
    assert "models.a.fallbacks[1]: unknown model 'nope'" in out
    assert "models.b.base_url: must not carry credentials" in out and "pw" not in out
    assert "models.c.base_url: required" in out


def test_config_check_refuses_a_header_that_would_split_the_request(tmp_path):
    """The relay writes configured headers as they are: a line break in a value would
    start a header of its own (or a second request), so config check refuses it."""
    path = tmp_path / "headers.toml"
    path.write_text("""
[routing]
default_model = "a"
[plugins.heuristic]
conversation_model = "a"
multimodal_model = "a"
[models.a]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
headers = { "x-team" = "blue\\r\\nx-injected: 1", "bad name" = "v", "x-fine" = "ok" }
""", encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "models.a.headers.x-team: the value must not contain a line break or NUL" in out
    assert "models.a.headers.bad name: is not a valid HTTP header name" in out
    assert "x-fine" not in out


@pytest.mark.models
def test_an_unset_api_key_env_fails_the_load_not_the_config(tmp_path, monkeypatch,
                                                            llama_cpp_server):
    monkeypatch.delenv("SARAI_TEST_NOT_SET", raising=False)
    path = tmp_path / "k.toml"
    path.write_text(f"""
[routing]
default_model = "r"
[plugins.heuristic]
conversation_model = "r"
multimodal_model = "r"
[models.r]
backend = "openai"
base_url = "{llama_cpp_server}"
api_key_env = "SARAI_TEST_NOT_SET"
""", encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(cli, ["config", "check", str(path)]).exit_code == 0
    result = runner.invoke(cli, ["--config", str(path), "query", "hola"])
    assert result.exit_code == 1
    assert "SARAI_TEST_NOT_SET" in result.stderr and "not set" in result.stderr


def test_redact_url_drops_userinfo_query_and_fragment():
    assert redact_url("https://u:p@api.example.com:8443/v1?key=abc#x") == \
        "https://api.example.com:8443/v1"


# -- answers through the backend ---------------------------------------------------------------


@pytest.mark.models
def test_query_through_the_openai_backend_streams_with_usage(engine):
    completion = answer(engine, "remote")
    assert completion.decision.model == "remote"
    assert completion.text.strip()
    # llama_cpp.server sends no usage: completion tokens are the content chunks counted,
    # prompt tokens the characters / 3.
    assert 1 <= completion.usage.completion_tokens <= 6
    assert completion.usage.prompt_tokens == -(-len("Hola, ¿qué tal?") // 3)
    assert completion.finish_reason in ("stop", "length")
    assert completion.timings.first_token_s is not None


@pytest.mark.models
def test_cli_query_json_and_streamed(remote_config, caplog):
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(remote_config), "query", "--json",
                                 "--max-tokens", "4", "--temperature", "0", "Hola"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "remote" and data["text"].strip()
    assert data["usage"]["completion_tokens"] >= 1
    streamed = runner.invoke(cli, ["--config", str(remote_config), "query", "--max-tokens",
                                   "4", "--temperature", "0", "Hola"])
    assert streamed.exit_code == 0
    assert streamed.stdout.strip()
    assert "[remote]" in streamed.stderr and "tokens" in streamed.stderr


@pytest.mark.models
def test_achat_streams_on_the_event_loop(engine):
    import asyncio

    resident = engine.pool.ensure_loaded("remote")

    async def collect():
        return [d async for d in resident.model.achat(
            [{"role": "user", "content": "Hola"}], GenerationParams(max_tokens=4, temperature=0))]

    deltas = asyncio.run(collect())
    assert "".join(d.text for d in deltas).strip()
    assert deltas[-1].usage is not None and deltas[-1].finish_reason


@pytest.mark.models
def test_least_busy_replica_takes_the_next_request(engine, llama_cpp_server):
    """Two replicas (the same server under two host names): while a stream holds the first,
    the next request goes to the second."""
    import attrs

    from sarai_router.default_plugins.openai import OpenAIModel

    spec = engine.config.models["remote"]

    two = attrs.evolve(spec, settings=attrs.evolve(
        spec.settings, base_url="",
        endpoints=(llama_cpp_server, llama_cpp_server.replace("127.0.0.1", "localhost"))))
    model = OpenAIModel(two, UPSTREAM_KEY)
    params = GenerationParams(max_tokens=4, temperature=0)
    replicas = model.replicas.replicas

    async def scenario() -> None:
        first = model.achat([{"role": "user", "content": "Hola"}], params)
        await anext(first)  # a token came: the stream holds replica 0
        assert [r.inflight for r in replicas] == [1, 0]
        second = asyncio.create_task(_collect(
            model.achat([{"role": "user", "content": "Adiós"}], params)))
        while replicas[1].requests != 1:
            assert not second.done(), "the second request ended without picking a replica"
            await asyncio.sleep(0.01)
        assert replicas[1].inflight == 1 and replicas[0].requests == 1
        await first.aclose()
        assert (await asyncio.wait_for(second, 60))[-1].usage is not None
        assert [r.inflight for r in replicas] == [0, 0]

    try:
        asyncio.run(scenario())
    finally:
        model.close()


async def _collect(deltas) -> list:
    return [delta async for delta in deltas]


def test_replica_set_choice_and_cooldowns_follow_the_clock():
    now = [100.0]
    replicas = ReplicaSet(["http://a/v1", "http://b/v1"], max_cooldown=4.0,
                          clock=lambda: now[0])
    a, b = replicas.replicas
    first = replicas.pick()
    second = replicas.pick()
    assert {first, second} == {a, b}  # least busy: the idle one, not the same twice
    replicas.release(first)
    replicas.release(second)
    # Failures while it already cools down are the same outage: the cooldown stays.
    assert [replicas.failed(a, "refused") for _ in range(3)] == [1.0, 1.0, 1.0]
    cooldowns = []
    for _ in range(3):  # each probe that fails doubles it, up to max_cooldown
        now[0] += cooldowns[-1] if cooldowns else 1.0
        cooldowns.append(replicas.failed(a, "refused"))
    assert cooldowns == [2.0, 4.0, 4.0]
    assert replicas.pick() is b and replicas.pick() is b  # a cools down: b takes it all
    now[0] += 4.0
    probe = replicas.pick(exclude=[b])
    assert probe is a  # cooldown over: a is probed...
    assert replicas.pick(exclude=[b]) is None  # ...by one request at a time
    replicas.succeeded(a)
    replicas.release(a)
    assert replicas.snapshot()[0]["state"] == "healthy"


def test_the_next_request_goes_to_the_least_busy_replica_not_the_next_in_turn():
    replicas = ReplicaSet(["http://a/v1", "http://b/v1", "http://c/v1"], max_cooldown=4.0,
                          clock=lambda: 0.0)
    held = [replicas.pick(), replicas.pick()]  # two long streams hold two replicas
    idle = next(r for r in replicas.replicas if r not in held)
    for _ in range(4):  # whoever's turn it is, the idle one takes each short request
        chosen = replicas.pick()
        assert chosen is idle, [r.inflight for r in replicas.replicas]
        replicas.release(chosen)
    replicas.release(held[0])  # now two are idle: they share the requests
    assert {replicas.pick(), replicas.pick()} == {held[0], idle}


@pytest.mark.models
def test_a_dead_replica_cools_down_and_the_live_one_answers(engine):
    pair = engine.pool.ensure_loaded("pair").model
    now = [1000.0]
    pair.replicas.clock = lambda: now[0]
    dead, live = pair.replicas.replicas
    completion = answer(engine, "pair")  # the tie goes to the dead one first: refused
    assert completion.text.strip() and not completion.decision.fallbacks
    assert dead.failures == 1 and dead.requests == 1 and live.requests == 1
    health = pair.health()
    assert health["state"] == "degraded"
    assert health["endpoints"][0]["state"] == "cooling"
    assert "refused" in health["endpoints"][0]["last_error"]
    answer(engine, "pair")  # while it cools down, nothing goes to the dead one
    assert dead.requests == 1 and live.requests == 2
    now[0] += 1.0  # its 1 s cooldown is over: the next request probes it, and it fails again
    answer(engine, "pair")
    assert dead.requests == 2 and dead.failures == 2
    assert pair.replicas.snapshot()[0]["cooldown_seconds_left"] == 2.0  # doubled


# -- fallbacks ---------------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize("model,reason", [("down", "refused"), ("fail500", "http_503")])
def test_fallback_before_the_first_token(engine, model, reason):
    steps = []
    engine.hooks.subscribe(lambda event: event.kind == "fallback" and steps.append(
        (event.data["from_model"], event.data["to_model"], event.data["reason"])), "test")
    completion = answer(engine, model)
    assert completion.decision.model == "remote" and completion.text.strip()
    assert completion.decision.routed_model == model
    (step,) = completion.decision.fallbacks
    assert (step.from_model, step.to_model, step.reason) == (model, "remote", reason)
    assert steps == [(step.from_model, step.to_model, step.reason)]
    assert completion.to_dict()["fallbacks"][0]["reason"] == reason


def test_fallbacks_are_tried_in_the_order_listed(fault_engine):
    request = hello()
    decision = fault_engine.prepare(request, model="first", prewarm=False)
    completion = Completion(decision=decision)
    with pytest.raises(UpstreamUnavailable):
        for _ in fault_engine.stream(request, decision, GenerationParams(max_tokens=2),
                                     completion):
            pass
    steps = [(s.from_model, s.to_model, s.reason) for s in completion.decision.fallbacks]
    assert steps == [("first", "second", "http_503"), ("second", "third", "http_502")]


def test_an_upstream_error_that_quotes_the_key_reaches_no_one_with_it(fault_engine, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamError) as info:
        answer(fault_engine, "echokey")
    message = str(info.value)
    assert info.value.status == 401 and "invalid api key: Bearer [redacted]" in message
    assert UPSTREAM_KEY not in message and UPSTREAM_KEY not in caplog.text


def test_keep_alives_without_a_token_still_time_out(fault_engine, fault_server):
    """``: ping`` comments keep the connection busy (no read timeout ever fires), but no
    token comes: the first-token deadline (timeout_seconds) ends the wait."""
    seen = len(fault_server[1].seen)
    with pytest.raises(UpstreamUnavailable) as info:
        answer(fault_engine, "pings")
    assert fault_server[1].seen[seen][0].startswith("/pings/")  # it did reach the upstream
    assert info.value.status == 504 and info.value.reason == "timeout"
    assert "sent no token within timeout_seconds = 0.5" in str(info.value)


@pytest.mark.models
def test_no_fallback_after_a_token_was_sent(engine):
    request = hello()
    decision = engine.prepare(request, model="midstream", prewarm=False)
    completion = Completion(decision=decision)
    pieces = []
    with pytest.raises(Exception) as info:
        for piece in engine.stream(request, decision, GenerationParams(max_tokens=4),
                                   completion):
            pieces.append(piece)
    assert pieces == ["Hola", " mundo"]
    assert "stopped after 2 pieces" in str(info.value)
    assert completion.decision.model == "midstream" and not completion.decision.fallbacks


@pytest.mark.models
def test_a_4xx_is_not_a_reason_to_fall_back(engine):
    with pytest.raises(UpstreamError) as info:
        answer(engine, "teapot")
    assert info.value.status == 418 and "fault server says 418" in str(info.value)


@pytest.mark.models
def test_a_5xx_without_fallbacks_is_an_unavailable_upstream(engine):
    with pytest.raises(UpstreamUnavailable) as info:
        answer(engine, "plain500")
    assert info.value.status == 502 and info.value.reason == "http_500"
    assert "answered 500: fault server says 500" in str(info.value)


@pytest.mark.models
def test_a_cooling_endpoint_fails_fast_and_its_fallback_answers(engine):
    down = engine.pool.ensure_loaded("plain500").model
    down.replicas.clock = lambda: 50.0  # frozen: the cooldown does not end in this test
    with pytest.raises(UpstreamUnavailable):
        answer(engine, "plain500")
    with pytest.raises(UpstreamUnavailable) as info:
        answer(engine, "plain500")
    assert info.value.reason == "cooldown" and info.value.status == 503
    assert info.value.retry_after and "cooling down" in str(info.value)
    fail503 = engine.pool.ensure_loaded("fail500").model
    fail503.replicas.clock = lambda: 50.0
    answer(engine, "fail500")
    completion = answer(engine, "fail500")
    assert completion.decision.fallbacks[0].reason == "cooldown"


@pytest.mark.models
def test_timeout_before_the_first_token_is_504(engine):
    stall = engine.pool.ensure_loaded("stall").model
    (replica,) = stall.replicas.replicas
    # Another stream got a token from it while this request waited: busy, not dead.
    replica.last_token_at = time.monotonic() + 3600
    with pytest.raises(UpstreamUnavailable) as info:
        answer(engine, "stall")
    assert info.value.status == 504 and info.value.reason == "timeout"
    assert replica.failures == 0 and replica.state(stall.replicas.clock()) == "healthy"
    replica.last_token_at = 0.0  # no progress at all: it cools down
    with pytest.raises(UpstreamUnavailable):
        answer(engine, "stall")
    assert replica.failures == 1


@pytest.mark.models
def test_cli_fallback_shows_in_json_and_on_stderr(remote_config):
    runner = CliRunner()
    data = json.loads(runner.invoke(cli, ["--config", str(remote_config), "query", "--json",
                                          "--model", "down", "--max-tokens", "3",
                                          "Hola"]).stdout)
    assert data["model"] == "remote"
    assert data["fallbacks"][0]["from"] == "down" and data["fallbacks"][0]["reason"] == "refused"
    assert QUERY_TOKEN not in json.dumps(data)
    result = runner.invoke(cli, ["--config", str(remote_config), "query", "--model", "down",
                                 "--max-tokens", "3", "Hola"])
    assert "[remote] fell back from down (refused)" in result.stderr
    route = json.loads(runner.invoke(cli, ["--config", str(remote_config), "route", "--json",
                                           "Hola"]).stdout)
    assert route["fallbacks"] == [] and route["fallback_chain"] == []


# -- capabilities ------------------------------------------------------------------------------


@pytest.mark.models
def test_a_request_needing_tools_goes_to_a_model_that_offers_them(engine):
    needs = ChatRequest(messages=({"role": "user", "content": "hola"},),
                        needs=frozenset({"tools"}))
    with pytest.raises(CapabilityError) as info:
        engine.prepare(needs, model="notools", prewarm=False)
    assert "cannot take tools" in str(info.value) and "notools" in str(info.value)
    assert engine.prepare(needs, model="remote", prewarm=False).model == "remote"


#: An endpoint that claims nothing beyond text (llama_cpp models offer all three).
PLAIN_REMOTE = """
[models.plain]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
capabilities = []
"""


def test_routing_moves_a_request_the_routed_model_cannot_take(make_config):
    config = make_config(PLAIN_REMOTE + """
        fallbacks = ["remote"]

        [models.remote]
        backend = "openai"
        base_url = "http://127.0.0.1:9/v1"
        """, routing='default_model = "plain"')
    engine = Engine(config)
    try:
        needs = ChatRequest(messages=({"role": "user", "content": "hola"},),
                            needs=frozenset({"json_schema"}))
        decision = engine.prepare(needs, prewarm=False)
        assert decision.model == "remote" and decision.routed_model == "plain"
        assert "'plain' cannot take json_schema, so 'remote'" in decision.reason
    finally:
        engine.close()
    config = make_config(PLAIN_REMOTE)
    engine = Engine(config)
    try:
        # Longer than fast's n_ctx (512) by the estimate: the model with room takes it.
        long = ChatRequest.from_prompt("palabra " * 400)
        assert engine.prepare(long, prewarm=False).model == "plain"
    finally:
        engine.close()


def test_rerouting_tries_the_routed_models_fallbacks_before_the_default(tmp_path):
    path = tmp_path / "sarai.toml"
    path.write_text(PLAIN_REMOTE + """
fallbacks = ["backup"]

[models.backup]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"

[models.general]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"

[routing]
default_model = "general"

[plugins.heuristic]
conversation_model = "general"
multimodal_model = "plain"
""", encoding="utf-8")
    engine = Engine(load_config(path))
    request = ChatRequest(messages=({"role": "user", "content": "What is in this photo?"},),
                          needs=frozenset({"json_schema"}))
    try:
        decision = engine.prepare(request, prewarm=False)
    finally:
        engine.close()
    assert decision.routed_model == "plain"  # the keyword rule chose it; it can't take JSON
    assert decision.model == "backup", decision.reason


def test_no_model_can_take_it_names_what_is_missing(make_config):
    config = make_config(PLAIN_REMOTE + """
        [models.plain2]
        backend = "openai"
        base_url = "http://127.0.0.1:9/v1"
        capabilities = ["tools"]

        [routing]
        default_model = "plain"

        [plugins.heuristic]
        conversation_model = "plain"
        multimodal_model = "plain2"
        """, base=False)
    engine = Engine(config)
    try:
        request = ChatRequest(messages=({"role": "user", "content": "hola"},),
                              needs=frozenset({"logprobs"}))
        with pytest.raises(CapabilityError) as info:
            engine.prepare(request, model=None, prewarm=False)
    finally:
        engine.close()
    message = str(info.value)
    assert "cannot take logprobs" in message and "no other configured model can either" in message
    assert info.value.missing == ("logprobs",)


# -- the server ------------------------------------------------------------------------------


class Router(ServeProcess):
    """A real ``sarai-router serve`` subprocess with the remote config."""

    def post(self, body: dict, stream: bool = False):
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120)

    def models(self) -> dict:
        rows = httpx.get(self.url + "/v1/models", timeout=30).json()["data"]
        return {row["id"]: row for row in rows}

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0


@pytest.fixture(scope="module")
def router(tmp_path_factory, models_dir, llama_cpp_server, fault_server):
    folder = tmp_path_factory.mktemp("router")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = folder / "sarai.toml"
    config.write_text(remote_toml(models_dir, llama_cpp_server, dead, fault_server[0]),
                      encoding="utf-8")
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1", UPSTREAM_KEY_ENV: UPSTREAM_KEY,
           WRONG_KEY_ENV: WRONG_KEY}
    started = start_serve(config, global_args=["-v"], echo=False, env=env, timeout=60,
                          log_path=folder / "router.log")
    srv = Router(started.url, started.process, started.log_path)
    try:
        yield srv
    finally:
        code = srv.stop(timeout=15)
    assert code in (0, -15), srv.log()[-3000:]


def _wait(predicate, what: str, timeout: float = 60, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f"; log:\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.05)


def chat_body(model: str, text: str = "Hola", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "temperature": 0, **extra}


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.mark.models
def test_server_answers_through_the_remote_model(router):
    response = router.post(chat_body("remote"))
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "remote" and data["choices"][0]["message"]["content"].strip()
    assert data["usage"]["completion_tokens"] >= 1
    streamed = router.post(chat_body("remote", stream=True,
                                     stream_options={"include_usage": True}))
    events = sse_events(streamed)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.strip() == data["choices"][0]["message"]["content"].strip()
    assert events[-1]["usage"]["completion_tokens"] >= 1
    row = router.models()["remote"]
    assert row["loaded"] is True and row["health"]["state"] == "healthy"
    assert row["health"]["endpoints"][0]["requests"] >= 2


@pytest.mark.models
@pytest.mark.parametrize("stream", [False, True])
def test_server_fallback_header_trace_and_metric(router, stream):
    def count(reason: str) -> float:
        return router.metric("sarai_fallbacks_total",
                             **{"from": "down", "to": "remote", "reason": reason})

    before = {reason: count(reason) for reason in ("refused", "cooldown")}
    response = router.post(chat_body("down", stream=stream))
    assert response.status_code == 200, response.text
    assert response.headers["x-sarai-model"] == "remote"
    # refused, or cooldown when an earlier request's refusal still cools the endpoint down
    header = response.headers["x-sarai-fallback"]
    reason = header.rpartition("reason=")[2]
    assert header == f"from=down;to=remote;reason={reason}" and reason in before
    if stream:
        assert all(e["model"] == "remote" for e in sse_events(response))
    else:
        data = response.json()
        assert data["model"] == "remote"
        assert data["sarai"]["route"]["fallbacks"][0]["reason"] == reason
    assert count(reason) == before[reason] + 1
    assert QUERY_TOKEN not in response.text


@pytest.mark.models
def test_server_passes_an_upstream_4xx_through(router):
    response = router.post(chat_body("wrongkey"))
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "upstream_unauthorized" and "refused the request (401)" in error["message"]
    teapot = router.post(chat_body("teapot"))
    assert teapot.status_code == 418 and "fault server says 418" in teapot.json()["error"]["message"]


@pytest.mark.models
def test_server_5xx_and_timeout_without_fallback(router):
    response = router.post(chat_body("plain500"))
    assert response.status_code in (502, 503)  # 503 while a previous failure cools it down
    assert response.json()["error"]["code"] == "upstream_unavailable"
    stalled = router.post(chat_body("stall"))
    assert stalled.status_code == 504 and stalled.json()["error"]["code"] == "upstream_timeout"


@pytest.mark.models
def test_server_mid_stream_failure_is_an_error_event_not_a_fallback(router):
    response = router.post(chat_body("midstream", stream=True))
    assert response.status_code == 200
    assert response.headers["x-sarai-model"] == "midstream"
    assert "x-sarai-fallback" not in response.headers
    events = sse_events(response)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if e.get("choices")) == "Hola mundo"
    # The error, then a last chunk that says the answer was cut.
    assert "stopped after 2 pieces" in events[-2]["error"]["message"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["sarai"] == {"stopped_by": "error"}


@pytest.mark.models
def test_no_credential_reaches_a_client_or_the_log(router):
    bodies = [router.post(chat_body(m)).text for m in ("remote", "down", "wrongkey", "plain500")]
    bodies.append(httpx.get(router.url + "/v1/models", timeout=30).text)
    log = router.log()
    for secret in (UPSTREAM_KEY, WRONG_KEY, QUERY_TOKEN):
        assert all(secret not in body for body in bodies), secret
        assert secret not in log, secret


@pytest.fixture
def inproc_router(remote_config):
    """``serve``'s app and uvicorn in this process (a thread), on a free port: its threads
    and log records are visible to the test."""
    import uvicorn

    from sarai_router.serving import create_app

    app = create_app(load_config(remote_config), load_pinned=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    srv = Router(f"http://127.0.0.1:{port}", None, None)  # type: ignore[arg-type]
    _wait(lambda: server.started, "the in-process server", timeout=30)
    yield srv
    server.should_exit = True
    thread.join(30)


@pytest.mark.models
def test_many_concurrent_streams_need_no_thread_each(inproc_router):
    """32 streams at once to a remote model (the upstream answers one at a time, so most
    wait on it): every one answers, and no generation thread exists meanwhile."""
    n = 32
    results: list[bool] = []

    def one() -> None:
        with httpx.stream("POST", inproc_router.url + "/v1/chat/completions",
                          json=chat_body("remote", stream=True), timeout=300) as response:
            results.append(response.status_code == 200
                           and "[DONE]" in "".join(response.iter_text()))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    _wait(lambda: (inproc_router.models()["remote"]["health"] or {"endpoints": [
        {"inflight": 0}]})["endpoints"][0]["inflight"] >= n // 2,
          "the streams to reach the upstream", timeout=120)
    generation_threads = [t.name for t in threading.enumerate()
                          if t.name.startswith("sarai-gen")]
    for thread in threads:
        thread.join(300)
    assert results.count(True) == n
    assert generation_threads == []


@pytest.mark.models
def test_no_credential_in_any_log_record(inproc_router, remote_config, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = [inproc_router.post(chat_body(m)).text
              for m in ("remote", "down", "wrongkey", "pair", "plain500")]
    runner = CliRunner()
    for model in ("down", "wrongkey"):
        result = runner.invoke(cli, ["--config", str(remote_config), "query", "--model", model,
                                     "--max-tokens", "2", "Hola"])
        bodies += [result.stdout, result.stderr]
    assert any("refused" in record.getMessage() for record in caplog.records)
    for secret in (UPSTREAM_KEY, WRONG_KEY, QUERY_TOKEN):
        assert all(secret not in body for body in bodies), secret
        assert all(secret not in record.getMessage() for record in caplog.records), secret


@pytest.mark.models
def test_a_client_that_leaves_closes_the_upstream_stream(router):
    with httpx.stream("POST", router.url + "/v1/chat/completions",
                      json=chat_body("remote", stream=True, max_tokens=200),
                      timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # one token arrived: hang up
    _wait(lambda: router.models()["remote"]["health"]["endpoints"][0]["inflight"] == 0
          and router.models()["remote"]["resident"]["users"] == 0,
          "the upstream stream to close")


@pytest.mark.models
def test_models_list_probes_remote_endpoints(remote_config):
    result = CliRunner().invoke(cli, ["--config", str(remote_config), "models", "list",
                                      "--json"])
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert rows["remote"]["health"]["endpoints"][0]["state"] == "up"
    assert rows["down"]["health"]["endpoints"][0]["state"] == "refused"
    assert QUERY_TOKEN not in result.stdout
    assert rows["pair"]["concurrency"] == 32  # max_concurrency 16 x 2 endpoints
    text = CliRunner().invoke(cli, ["--config", str(remote_config), "models", "list"]).stdout
    assert "refused" in text and "up" in text


# -- the pool on an event loop -------------------------------------------------------------


def test_async_slots_go_to_waiters_in_order_and_none_is_lost(make_config):
    """One slot (max_concurrency 1), five waiters, one of which leaves, and a newcomer that
    arrives right after a release: the slot goes to the waiters in order, never to the
    newcomer first, and it is free at the end."""
    import asyncio

    from sarai_router.errors import QueueFull
    from sarai_router.plugins import Hooks
    from sarai_router.pool import ModelPool

    config = make_config("""
        [models.remote]
        backend = "openai"
        base_url = "http://127.0.0.1:9/v1"
        max_concurrency = 1
        """)
    pool = ModelPool(config, Hooks(config.plugin_set, config))

    async def scenario() -> list[int]:
        order: list[int] = []
        holder = pool.use("remote")
        resident = await holder.__aenter__()

        async def waiter(i: int) -> None:
            async with pool.use("remote"):
                order.append(i)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
        while len(resident.waiters) < 5:
            await asyncio.sleep(0)
        with pytest.raises(QueueFull):  # 1 using + 5 waiting: past concurrency + queue 5
            async with pool.use("remote", queue_limit=5):
                pass
        tasks[2].cancel()
        await holder.__aexit__(None, None, None)
        late = asyncio.create_task(waiter(99))
        await asyncio.gather(*tasks, late, return_exceptions=True)
        assert resident.slots.acquire(blocking=False)  # free again
        resident.slots.release()
        assert resident.users == 0 and resident.queued == 0 and not resident.waiters
        return order

    try:
        assert asyncio.run(scenario()) == [0, 1, 3, 4, 99]
    finally:
        pool.close()


@pytest.mark.models
def test_bench_concurrency_through_serve_and_direct(remote_config):
    """The command runs end to end: `serve` as a child, the endpoint directly, paired
    requests; it prints figures (their values are the bench's business, not this test's)."""
    result = CliRunner().invoke(cli, ["--config", str(remote_config), "bench-concurrency",
                                      "remote", "--concurrency", "2", "--requests", "4",
                                      "--max-tokens", "2", "--pairs", "2", "--rounds", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["requests"] == 4 and data["rounds"] == 2
    for target in ("router", "direct"):
        assert data[target]["errors"] == 0 and data[target]["tokens"] >= 4
        assert data[target]["ttft_s"]["p50"] is not None
    # Reported, not judged: 8 short answers can cost the router less than one tick of
    # the kernel's CPU accounting (10 ms), so 0 is a possible reading.
    assert data["router"]["router_cpu_ms_per_request"] >= 0
    assert data["router"]["router_cpu_ms_per_token"] >= 0
    assert data["overhead"]["pairs"] == 2 and data["overhead"]["errors"] == 0
    assert UPSTREAM_KEY not in result.stdout
