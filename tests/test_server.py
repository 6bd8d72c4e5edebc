"""A real ``sarai-router serve`` process on 127.0.0.1, the real models, the official client.

One server for the module (loading models is the slow part). Its config: the two real
models with small contexts (quality with a TTL far longer than the module runs, so nothing
expires under a test that doesn't wait for it), a ``brief`` model expiring after BRIEF_TTL
seconds, the reaper every REAP seconds, one waiting request per model, an API key, a small
body limit, and a ``broken`` model whose file is not a GGUF (backend failure). Tests that
need a fresh server (pre-warm from an empty pool, shutdown) start their own.

Nothing here waits on wall time for a state: tests poll the server's own view (/v1/models,
/metrics, its log) with generous deadlines.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_FILE, base_toml
from sarai_router.testing import SARAI_ROUTER as SAR, ServeProcess, start_serve

API_KEY = "test-key-123"
BRIEF_TTL = 4.0
LONG_TTL = 3600.0
REAP = 0.25
MAX_BODY = 8192


class Server(ServeProcess):
    """The kit's running server, with this module's ways of talking to it."""

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def get(self, path: str, key: str | None = API_KEY) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, data: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def models(self) -> dict[str, dict]:
        status, body = self.get("/v1/models")
        assert status == 200, body
        return {row["id"]: row for row in json.loads(body)["data"]}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, body = self.get("/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def launch(folder: Path, config_text: str, *args: str) -> Server:
    """Start ``sarai-router serve`` on a free port with ``config_text``; wait for /health."""
    config = folder / "sarai.toml"
    config.write_text(config_text, encoding="utf-8")
    started = start_serve(config, args=args, echo=False, log_path=folder / "server.log",
                          env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})
    return Server(started.url, started.process, started.log_path)


def stop(srv: Server, sig: int = signal.SIGTERM) -> int:
    """Signal the server and wait for it to exit; its exit code."""
    return srv.stop(sig)


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("server")
    broken = folder / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file" * 100)
    srv = launch(folder, base_toml(
        models_dir,
        cache=f"ttl_seconds = {LONG_TTL}\nmax_loaded = 4\nreap_interval_seconds = {REAP}",
        # One thread per model: two models generating at once must not
        # oversubscribe a 2-core machine (ggml's threads spin-wait).
        fast="pinned = true\nn_threads = 1",
        quality="n_threads = 1") + f"""
[models.brief]
path = "{{models_dir}}/{FAST_FILE}"
n_ctx = 256
n_threads = 1
ttl_seconds = {BRIEF_TTL}

[models.broken]
path = "{broken.as_posix()}"
ttl_seconds = 1

[server]
queue_size = 1
max_body_bytes = {MAX_BODY}
""", "--api-key", API_KEY)
    try:
        yield srv
    finally:
        code = stop(srv)
    log = srv.log()
    # SIGTERM is a clean shutdown: exit 0, and the shutdown is in the log.
    assert code == 0, log[-3000:]
    assert "unloaded model fast (shutdown)" in log and "Application shutdown complete" in log


def _healthy(srv: Server) -> bool:
    try:
        return srv.get("/health", key=None)[0] == 200
    except OSError:
        return False


def ask(client: openai.OpenAI, text: str, model: str = "auto", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs)


# -- answers -----------------------------------------------------------------------------


@pytest.mark.models
def test_pinned_model_loaded_at_start_and_health_is_open(server):
    status, body = server.get("/health", key=None)
    assert status == 200
    assert json.loads(body)["models"]["fast"] == "loaded"
    models = server.models()
    assert set(models) == {"auto", "fast", "quality", "brief", "broken"}
    assert models["fast"]["loaded"] and models["fast"]["pinned"]
    assert models["auto"]["loaded"]


@pytest.mark.models
def test_auto_routes_conversation_to_fast(server):
    raw = ask(server.client(), "Hola, ¿cómo estás?")
    completion = raw.parse()
    assert completion.model == "fast"
    assert raw.headers["x-sarai-model"] == "fast"
    assert raw.headers["x-sarai-route-reason"]
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens >= 1
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.models
def test_auto_routes_image_request_to_quality(server):
    raw = ask(server.client(), "Describe esta imagen, por favor")
    assert raw.parse().model == "quality"
    assert raw.headers["x-sarai-model"] == "quality"
    assert "imagen" in raw.headers["x-sarai-route-reason"]
    assert server.models()["quality"]["loaded"]


@pytest.mark.models
@pytest.mark.parametrize("model", ["fast", "quality"])
def test_explicit_model_bypasses_routing(server, model):
    # The text would route to quality; the explicit name wins.
    raw = ask(server.client(), "Describe esta imagen", model=model, seed=7, temperature=0)
    assert raw.parse().model == model
    assert raw.headers["x-sarai-route-reason"] == "model requested explicitly"


@pytest.mark.models
def test_max_tokens_and_stop_are_honoured(server):
    client = server.client()
    long = client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Count from 1 to 50."}],
        max_tokens=5, temperature=0)
    assert long.usage.completion_tokens <= 5
    assert long.choices[0].finish_reason == "length"
    # The stop string: a piece from the middle of the same answer generated without one.
    counting = [{"role": "user", "content": "Count from 1 to 50, one per line."}]
    free = client.chat.completions.create(model="fast", messages=counting, max_tokens=40,
                                          temperature=0).choices[0].message.content
    assert "\n5" in free, free
    stopped = client.chat.completions.create(model="fast", messages=counting, max_tokens=40,
                                             temperature=0, stop=["\n5"])
    text = stopped.choices[0].message.content
    assert text and "\n5" not in text, text
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 40
    assert text == free[:free.index("\n5")]  # greedy: the same answer, cut at the stop


@pytest.mark.models
def test_max_tokens_runs_over_only_to_finish_a_split_character(server):
    """What docs/serving.md says: llama-cpp-python finishes a character split over several
    tokens (this greedy answer starts with an emoji), so the cap is exceeded by up to 3."""
    answer = server.client().chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Write three emoji: 😀🎉🚀"}],
        max_tokens=1, temperature=0)
    text, used = answer.choices[0].message.content, answer.usage.completion_tokens
    assert answer.choices[0].finish_reason == "length"
    assert 1 < used <= 1 + 3, (used, text)
    assert text and not text[-1].isascii(), text


@pytest.mark.models
def test_seed_makes_answers_repeatable(server):
    """What docs/serving.md promises for a seed on llama_cpp: the same request, the same
    answer, logprob for logprob, whatever the model answered before it (the prompt is then
    in its KV cache whole, or only the chat template's opening)."""
    client = server.client()

    def seeded():
        choice = client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "Tell me a word."}],
            max_tokens=8, temperature=1.0, seed=42, logprobs=True).choices[0]
        return choice.message.content, [t.logprob for t in choice.logprobs.content]

    first = seeded()
    assert seeded() == first
    client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Name a colour, please."}],
        max_tokens=8, temperature=1.0)
    assert seeded() == first


@pytest.mark.models
def test_streaming_arrives_in_pieces_and_ends_with_done(server):
    client = server.client()
    pieces, models = [], set()
    busy_at_first_piece = None
    with client.chat.completions.create(
        # A long answer (300 tokens at temperature 0), routed to fast by the default rule.
        model="auto", messages=[{"role": "user",
                                 "content": "Count from 1 to 300, separated by commas."}],
        max_tokens=300, temperature=0, seed=3, stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        usage = None
        for chunk in stream:
            models.add(chunk.model)
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if busy_at_first_piece is None:
                    # Not buffered: the first piece is here while the model still generates.
                    # (Client-side arrival times are no proof: a busy test process reads late.)
                    busy_at_first_piece = server.models()["fast"]["resident"]["users"]
    assert models == {"fast"}
    assert len(pieces) >= 3, pieces
    assert busy_at_first_piece == 1, "the first piece came only after the whole answer"
    assert usage is not None and usage.completion_tokens >= len(pieces) - 1


@pytest.mark.models
def test_raw_sse_format(server):
    req = urllib.request.Request(
        server.url + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": "fast", "stream": True, "max_tokens": 4,
                         "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-sarai-model"] == "fast"
        lines = [line.decode().rstrip("\n") for line in resp]
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


# -- lifecycle -----------------------------------------------------------------------------


@pytest.mark.models
def test_ttl_unload_seen_from_models_endpoint_without_requests(server):
    before = server.metrics()
    ask(server.client(), "hi", model="brief", max_tokens=2)
    # Loaded for the request (it may have expired again by now on a busy machine).
    assert (metric(server.metrics(), "sarai_model_loads_total", model="brief")
            == metric(before, "sarai_model_loads_total", model="brief") + 1)
    # Only GET /v1/models from here on: the reaper alone unloads it ("unloaded", not just
    # "not loaded": the unload, and its log line, are over once its close is).
    server.wait_until(lambda: server.models()["brief"]["state"] == "unloaded", BRIEF_TTL + 60,
                      "the brief model to expire")
    # Idle time as the server measured it, from the end of the generation to the unload.
    idles = [float(line.rsplit("(idle ", 1)[1].split("s)", 1)[0])
             for line in server.log().splitlines()
             if "expired model brief (idle " in line]
    assert idles and all(idle >= BRIEF_TTL for idle in idles), idles
    assert server.models()["fast"]["loaded"], "a pinned model never expires"
    samples = server.metrics()
    assert (metric(samples, "sarai_model_unloads_total", model="brief", reason="expire")
            == metric(before, "sarai_model_unloads_total", model="brief", reason="expire") + 1)
    assert metric(samples, "sarai_model_loaded", model="brief") == 0


@pytest.mark.models
def test_concurrent_requests_to_both_models_all_answered(server):
    client = server.client()
    jobs = [("fast", "Hola"), ("quality", "Hello"), ("fast", "¿Qué tal?"), ("quality", "Hi")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(
            lambda job: client.chat.completions.create(
                model=job[0], messages=[{"role": "user", "content": job[1]}], max_tokens=8),
            jobs))
    assert [r.model for r in results] == [m for m, _ in jobs]
    assert all(r.usage.completion_tokens >= 1 for r in results)


@pytest.mark.models
def test_full_queue_is_refused_with_429(server):
    client = server.client()
    barrier = threading.Barrier(6)

    def one(_):
        barrier.wait()
        try:
            client.chat.completions.create(
                model="fast", max_tokens=200, temperature=0,
                messages=[{"role": "user", "content": "Count from 1 to 100: 1, 2, 3,"}])
            return 200
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "queue_full"
            return 429

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    # queue_size = 1: one generating + one waiting; the rest are refused at once.
    assert statuses.count(200) >= 2
    assert statuses.count(429) >= 1
    assert metric(server.metrics(), "sarai_queue_full_total", model="fast") >= 1
    # The refused requests left nothing behind: the next one is answered.
    assert ask(client, "Hola").parse().model == "fast"


@pytest.mark.models
def test_prewarm_loads_quality_before_it_is_asked_for(tmp_path, models_dir):
    # A fresh server, so quality starts unloaded; a long TTL, so nothing but a request or
    # an eviction could unload it before the check.
    srv = launch(tmp_path, base_toml(models_dir, cache=f"ttl_seconds = {LONG_TTL}\nmax_loaded = 2",
                                     fast="pinned = true\nn_threads = 1", quality="n_threads = 1"))
    try:
        assert srv.models()["quality"]["state"] == "unloaded"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        # Emotional and short: answered by fast; it mentions a photo: pre-warm quality.
        raw = ask(client, "¡Muchas gracias, estoy feliz! Mira mi foto", max_tokens=1)
        assert raw.parse().model == "fast"
        # The pre-warm began at routing time: quality is loading or loaded by now, unasked.
        assert srv.models()["quality"]["state"] in ("loading", "loaded")
        assert metric(srv.metrics(), "sarai_model_queued_requests", model="quality") == 0
        srv.wait_until(lambda: srv.models()["quality"]["loaded"], 120, "the pre-warm load")
        assert ask(client, "Describe esta imagen", max_tokens=1).parse().model == "quality"
        after = srv.metrics()
        assert metric(after, "sarai_prewarms_total", model="quality", outcome="started") == 1
        assert metric(after, "sarai_prewarms_total", model="quality", outcome="used") == 1
        assert metric(after, "sarai_model_loads_total", model="quality") == 1, "loaded once"
    finally:
        assert stop(srv) == 0, srv.log()[-3000:]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.models
def test_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert server.get("/v1/models", key=None)[0] == 401
    assert server.get("/metrics", key="nope")[0] == 401
    assert server.get("/health", key=None)[0] == 200


@pytest.mark.models
def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as info:
        ask(server.client(), "hi", model="gpt-4")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.models
@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_body"),
    (b'{"model": "auto"}', 400, "invalid_value"),
    (b'{"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_value"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
     400, "invalid_value"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     400, "invalid_value"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stop": [1]}',
     400, "invalid_value"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stop": [""]}',
     400, "invalid_value"),
])
def test_bad_bodies_are_refused(server, body, status, code):
    got, answer = server.post("/v1/chat/completions", body)
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


@pytest.mark.models
def test_wrong_method_is_405_in_openai_shape(server):
    status, body = server.get("/v1/chat/completions")
    answer = json.loads(body)
    assert status == 405, answer
    assert answer["error"]["code"] == "method_not_allowed"
    assert "GET /v1/chat/completions" in answer["error"]["message"]


@pytest.mark.models
def test_body_size_limit(server):
    text = "x" * (MAX_BODY + 10)
    body = json.dumps({"model": "fast", "messages": [{"role": "user", "content": text}]})
    status, answer = server.post("/v1/chat/completions", body.encode())
    assert status == 413 and answer["error"]["code"] == "body_too_large"


@pytest.mark.models
def test_body_size_limit_holds_for_a_chunked_body(server):
    """No Content-Length to refuse up front: the limit must be counted while reading."""
    import http.client

    body = json.dumps({"model": "fast", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=(body[i:i + 1024] for i in range(0, len(body), 1024)),
                     headers={"Content-Type": "application/json",
                              "Authorization": f"Bearer {API_KEY}"},
                     encode_chunked=True)
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 413, answer
    assert answer["error"]["code"] == "body_too_large"
    assert str(MAX_BODY) in answer["error"]["message"]


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.models
def test_image_paths_and_remote_urls_are_refused(server):
    client = server.client()
    for url in ("/etc/passwd", "file:///etc/passwd", "http://example.com/cat.png"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="auto", messages=_image_message(url))
        assert info.value.body["code"] == "invalid_image_url"


@pytest.mark.models
def test_data_uri_image_counts_as_the_image_modality(server):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model="auto", messages=_image_message(f"data:image/png;base64,{png}"))
    # Routed as an image request; neither test model takes images, and the error says so.
    assert info.value.body["code"] == "unsupported_modality"
    assert "image" in info.value.body["message"]


@pytest.mark.models
def test_prompt_longer_than_the_context_is_400_and_the_server_survives(server):
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), "word " * 1000, model="fast")  # n_ctx is 512 here
    assert info.value.body["code"] == "context_length_exceeded"
    assert "n_ctx" in info.value.body["message"] and "'fast'" in info.value.body["message"]
    assert server.process.poll() is None
    assert ask(server.client(), "Hola").parse().model == "fast"


@pytest.mark.models
def test_a_model_file_that_fails_to_load_is_503_and_the_server_survives(server):
    with pytest.raises(openai.APIStatusError) as info:
        ask(server.client(), "hi", model="broken")
    assert info.value.status_code == 503
    assert info.value.body["code"] == "model_unavailable"
    assert "'broken'" in info.value.body["message"]
    assert ".gguf" not in info.value.body["message"]  # neither its path nor its name
    assert server.process.poll() is None
    assert ask(server.client(), "Hola").parse().model == "fast"
    assert metric(server.metrics(), "sarai_model_load_failures_total", model="broken") >= 1


@pytest.mark.models
def test_metrics_endpoint(server):
    client = server.client()
    ask(client, "Hola, ¿cómo estás?")
    ask(client, "Describe esta imagen, por favor", max_tokens=2)
    samples = server.metrics()
    assert metric(samples, "sarai_requests_total", model="fast", plugin="heuristic",
                  reason="no rule matched") >= 1
    assert metric(samples, "sarai_requests_total", model="quality", plugin="heuristic",
                  reason="multimodal request") >= 1
    for model in ("fast", "quality"):
        assert metric(samples, "sarai_tokens_total", model=model, kind="completion") >= 1
        assert metric(samples, "sarai_time_to_first_token_seconds_count", model=model) >= 1
        assert metric(samples, "sarai_generation_seconds_count", model=model) >= 1
        assert metric(samples, "sarai_model_loads_total", model=model) >= 1
        assert metric(samples, "sarai_model_load_seconds_count", model=model) >= 1
    assert metric(samples, "sarai_model_loaded", model="fast") == 1
    assert metric(samples, "sarai_resident_models") >= 1
    assert metric(samples, "sarai_resident_ram_mb") > 50
    assert metric(samples, "sarai_model_ram_mb", model="fast", kind="measured") > 0
    assert metric(samples, "process_resident_memory_bytes") > 50e6
    status, text = server.get("/metrics")
    for family in ("sarai_model_unloads_total", "sarai_model_evictions_total",
                   "sarai_unload_unverified_total", "sarai_prewarms_total",
                   "sarai_request_errors_total", "sarai_queue_full_total"):
        assert f"# TYPE {family} counter" in text.decode()


@pytest.mark.models
def test_a_client_that_hangs_up_stops_its_non_streamed_answer(server):
    import http.client

    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "fast", "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Count from 1 to 400: 1, 2,"}]})
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json",
                          "Authorization": f"Bearer {API_KEY}"})
    server.wait_until(lambda: server.models()["fast"]["resident"]["users"] == 1, 30,
                      "the answer to start")
    conn.sock.close()  # hang up without reading the answer
    conn.close()
    # The server notices within about half a second and stops after the current token (a
    # generous deadline: on a starved machine one token can take seconds).
    server.wait_until(lambda: "client went away; stopped its answer from fast"
                      in server.log(), 60, "the server to notice")
    server.wait_until(lambda: server.models()["fast"]["resident"]["users"] == 0, 60,
                      "the generation to stop")
    assert ask(server.client(), "Hola").parse().model == "fast"


@pytest.mark.models
def test_ctrl_c_stops_a_non_streamed_answer_with_503_and_exits_0(tmp_path, models_dir):
    srv = launch(tmp_path, base_toml(models_dir, fast="pinned = true\nn_threads = 1"))
    try:
        body = json.dumps({"model": "fast", "max_tokens": 450, "temperature": 0,
                           "messages": [{"role": "user", "content": "Count to 500: 1, 2,"}]})
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(srv.post, "/v1/chat/completions", body.encode(), None)
            srv.wait_until(lambda: srv.models()["fast"]["resident"]["users"] == 1, 30,
                           "the answer to start")
            srv.process.send_signal(signal.SIGINT)
            status, data = answer.result(timeout=60)
        # Whether the model was still reading the prompt (it stops only between tokens: the
        # grace timeout ends the handler) or already answering, the client gets the 503.
        assert status == 503, data
        assert data["error"]["code"] == "server_shutting_down"
        assert srv.process.wait(timeout=90) == 0, srv.log()[-3000:]  # one signal
        log = srv.log()
        assert "Traceback" not in log and "Application shutdown complete" in log, log[-3000:]
    finally:
        if srv.process.poll() is None:
            srv.process.kill()


@pytest.mark.models
def test_sigterm_ends_a_stream_with_the_shutdown_error_and_exits_0(tmp_path, models_dir):
    srv = launch(tmp_path, base_toml(models_dir, fast="pinned = true\nn_threads = 1"))
    try:
        request = urllib.request.Request(
            srv.url + "/v1/chat/completions", method="POST",
            data=json.dumps({"model": "fast", "stream": True, "max_tokens": 450,
                             "temperature": 0, "messages": [
                                 {"role": "user", "content": "Count to 500: 1, 2,"}]}).encode(),
            headers={"Content-Type": "application/json"})
        events, signalled = [], False
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                chunk = json.loads(line[6:]) if line[6:] != "[DONE]" else {}
                content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if content and not signalled:  # tokens are flowing: now stop the server
                    srv.process.send_signal(signal.SIGTERM)
                    signalled = True
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "server_shutting_down", events[-3:]
        assert len(events) < 450, "the answer ran to its end"
        assert srv.process.wait(timeout=90) == 0, srv.log()[-3000:]
        log = srv.log()
        assert "Traceback" not in log, log[-3000:]
        # Stopped between tokens, so the model was free to unload before the exit.
        assert "unloaded model fast (shutdown)" in log, log[-3000:]
        assert "Application shutdown complete" in log, log[-3000:]
    finally:
        if srv.process.poll() is None:
            srv.process.kill()


def test_serve_on_a_port_in_use_fails_before_loading_anything(tmp_path, models_dir):
    config = tmp_path / "sarai.toml"
    config.write_text(base_toml(models_dir), encoding="utf-8")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([SAR, "--config", str(config), "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and "loaded model" not in result.stderr


def test_serve_shares_the_cores_between_models_unless_told(make_config):
    from sarai_router.default_plugins.gguf_backend import default_threads
    from sarai_router.engine import share_cores

    config = make_config(cache="max_loaded = 2", fast="pinned = true\nn_threads = 3")
    shared = share_cores(config)
    assert shared.models["fast"].n_threads == 3  # set by the user: kept
    assert shared.models["quality"].n_threads == max(1, default_threads() // 2)
    # Divided by how many can generate side by side: min(max_loaded, number of models).
    roomy = share_cores(make_config(cache="max_loaded = 5"))
    assert roomy.models["quality"].n_threads == max(1, default_threads() // 2)
    alone = share_cores(make_config(cache="max_loaded = 1"))
    assert alone.models["quality"].n_threads == default_threads()
