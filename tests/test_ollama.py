"""Ollama's own Python client (``ollama``) and OpenAI's embeddings call against a real
``sarai-router serve`` on 127.0.0.1 with the real models.

The server: ``fast`` pinned, ``quality`` lazy (a TTL longer than the module runs), and
``vectors``, the fast GGUF loaded for embeddings (``embedding = true``); an API key, and
``[server] keep_alive_max_seconds`` = KEEP_ALIVE_CAP. Nothing waits on wall time for a
state: tests poll the server's own view (``/api/ps``) with generous deadlines.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from pathlib import Path

import ollama
import openai
import pytest

from conftest import FAST_FILE, base_toml
from test_server import Server, launch, stop


API_KEY = "ollama-test-key"
KEEP_ALIVE_CAP = 120
SEED = {"seed": 7, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("ollama")
    srv = launch(folder, base_toml(
        models_dir,
        cache="ttl_seconds = 3600\nmax_loaded = 3\nreap_interval_seconds = 0.25",
        fast="pinned = true\nn_threads = 1", quality="n_threads = 1") + f"""
[models.vectors]
path = "{{models_dir}}/{FAST_FILE}"
n_ctx = 256
n_threads = 1
embedding = true

[server]
keep_alive_max_seconds = {KEEP_ALIVE_CAP}
""", "--api-key", API_KEY)
    try:
        yield srv
    finally:
        assert stop(srv) == 0, srv.log.read_text()[-3000:]


def client(srv: Server, key: str = API_KEY) -> ollama.Client:
    return ollama.Client(host=srv.url, headers={"authorization": f"Bearer {key}"},
                         timeout=120)


def raw(srv: Server, path: str, body: dict) -> tuple[int, dict]:
    return srv.post(path, json.dumps(body).encode(), key=API_KEY)


def loaded(srv: Server) -> dict[str, dict]:
    status, body = srv.get("/api/ps", key=API_KEY)
    assert status == 200, body
    return {row["name"]: row for row in json.loads(body)["models"]}


# -- models

@pytest.mark.models
def test_list_show_version(server):
    names = [m.model for m in client(server).list().models]
    assert names == ["auto", "fast", "quality", "vectors"]
    fast = client(server).show("fast:latest")
    assert fast.details.format == "gguf" and fast.details.family == "llama"
    assert fast.details.quantization_level == "Q4_1"
    assert "completion" in fast.capabilities and "tools" in fast.capabilities
    # The context it is loaded with ([models.fast] n_ctx), which clients send back as
    # options.num_ctx; the file's own is under sarai.
    assert fast.modelinfo["llama.context_length"] == 512
    status, shown = raw(server, "/api/show", {"model": "fast"})
    assert shown["sarai"]["trained_context_length"] > 512
    answer = client(server).chat(model="fast", options={"num_ctx": 512, "num_predict": 2},
                                 messages=[{"role": "user", "content": "hi"}])
    assert answer.done
    assert client(server).show("vectors").capabilities == ["embedding"]
    status, body = server.get("/api/version", key=API_KEY)
    assert status == 200 and json.loads(body)["version"]
    # Ollama's liveness probe, which clients such as Open WebUI send first; the key applies.
    assert server.get("/", key=API_KEY) == (200, b"Ollama is running")
    assert server.get("/", key=None)[0] == 401


@pytest.mark.models
def test_ps_shows_the_pinned_model_without_an_expiry(server):
    models = {m.model: m for m in client(server).ps().models}
    assert models["fast"].expires_at is None and models["fast"].size > 0
    assert models["fast"].context_length == 512
    assert loaded(server)["fast"]["sarai"]["pinned"] is True


# -- chat and generate

@pytest.mark.models
def test_chat_not_streamed_carries_ollamas_fields_and_our_route(server):
    answer = client(server).chat(model="auto", stream=False, options={"num_predict": 8},
                                 messages=[{"role": "user", "content": "Hola, ¿cómo estás?"}])
    assert answer.done and answer.done_reason in ("stop", "length")
    assert answer.message.role == "assistant" and answer.message.content
    assert 0 < answer.eval_count <= 8 and answer.prompt_eval_count > 0
    assert answer.total_duration >= answer.eval_duration > 0
    assert answer.created_at.endswith("Z")
    status, body = raw(server, "/api/chat", {
        "model": "auto", "stream": False, "options": {"num_predict": 4},
        "messages": [{"role": "user", "content": "Hola, ¿cómo estás?"}]})
    assert status == 200 and body["sarai"]["route"]["model"] == "fast"
    assert body["sarai"]["route"]["reason"]


@pytest.mark.models
def test_chat_streamed_matches_the_whole_answer(server):
    ask = dict(model="fast", messages=[{"role": "user", "content": "Name three colours."}],
               options={"num_predict": 12, **SEED})
    whole = client(server).chat(stream=False, **ask)
    parts = list(client(server).chat(stream=True, **ask))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason


@pytest.mark.models
def test_generate_with_system_and_options(server):
    answer = client(server).generate(model="quality", prompt="Write a long story.",
                                     system="You are brief.", options={"num_predict": 3})
    assert answer.done_reason == "length" and answer.eval_count == 3 and answer.response
    parts = list(client(server).generate(model="quality", prompt="Say hello.", stream=True,
                                         options={"num_predict": 4}))
    assert parts[-1].done and "".join(p.response for p in parts)


@pytest.mark.models
def test_format_schema_holds_the_answer_to_json(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"]}
    answer = client(server).chat(model="fast", format=schema, options={"num_predict": 40},
                                 messages=[{"role": "user", "content": "A name in JSON."}])
    assert "name" in json.loads(answer.message.content)


@pytest.mark.models
def test_errors_come_in_ollamas_shape(server):
    with pytest.raises(ollama.ResponseError) as caught:
        client(server).chat(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404 and "gpt-4" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client(server).chat(model="fast", options={"mirostat": 2},
                            messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 400 and "options.mirostat" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client(server, key="wrong").list()
    assert caught.value.status_code == 401 and isinstance(caught.value.error, str)
    status, body = server.get("/api/tags", key=None)
    assert status == 401 and set(json.loads(body)) == {"error"}


@pytest.mark.models
def test_a_spoken_clip_among_the_images_goes_through_the_speech_stage(server):
    """Ollama has no audio field: a WAV clip sent as an image is transcribed (whisper)
    and routed on what was said, as an ``input_audio`` part on /v1."""
    clip = (Path(__file__).resolve().parent / "fixtures" / "es_triste.wav").read_bytes()
    status, body = raw(server, "/api/chat", {
        "model": "auto", "stream": False, "options": {"num_predict": 4},
        "messages": [{"role": "user", "content": "",
                      "images": [base64.b64encode(clip).decode()]}]})
    assert status == 200, body
    transcript = body["sarai"]["route"]["transcript"]
    assert "triste" in transcript["text"].lower() and transcript["plugin"] == "whisper"
    assert body["sarai"]["route"]["signals"]["empathy"] > 0.5


# -- keep_alive

@pytest.mark.models
def test_keep_alive_0_unloads_a_lazy_model_but_never_a_pinned_one(server):
    client(server).generate(model="quality", prompt="hi", options={"num_predict": 2})
    assert "quality" in loaded(server)
    client(server).generate(model="quality", prompt="hi", keep_alive=0,
                            options={"num_predict": 2})
    assert "quality" not in loaded(server)
    status, body = raw(server, "/api/generate", {"model": "fast", "prompt": "hi",
                                                 "keep_alive": 0, "stream": False,
                                                 "options": {"num_predict": 2}})
    assert status == 200 and body["sarai"]["keep_alive"] == "pinned"
    assert "fast" in loaded(server)


@pytest.mark.models
def test_a_duration_is_capped_by_the_server(server):
    client(server).generate(model="quality", prompt="hi", keep_alive="10h",
                            options={"num_predict": 2})
    row = loaded(server)["quality"]
    assert row["sarai"]["keep_alive_seconds"] == KEEP_ALIVE_CAP
    expiry = {m.model: m.expires_at for m in client(server).ps().models}["quality"]
    left = (expiry - ollama_now(expiry)).total_seconds()
    assert 0 < left <= KEEP_ALIVE_CAP + 1
    client(server).generate(model="quality", prompt="hi", keep_alive=-1,
                            options={"num_predict": 2})
    assert loaded(server)["quality"]["sarai"]["keep_alive_seconds"] is None  # the TTL's


def ollama_now(sample):
    from datetime import datetime

    return datetime.now(sample.tzinfo)


@pytest.mark.models
def test_load_and_unload_without_a_prompt(server):
    answer = client(server).generate(model="quality")
    assert answer.done_reason == "load" and "quality" in loaded(server)
    answer = client(server).generate(model="quality", keep_alive=0)
    assert answer.done_reason == "unload" and "quality" not in loaded(server)


@pytest.mark.models
def test_keep_alive_0_waits_for_the_requests_in_flight(server):
    client(server).generate(model="quality")  # loaded
    started = threading.Event()
    parts: list = []

    def long_answer():
        for part in client(server).generate(model="quality", prompt="Tell a long story.",
                                            stream=True, options={"num_predict": 64}):
            started.set()
            parts.append(part)

    worker = threading.Thread(target=long_answer)
    worker.start()
    assert started.wait(120)
    status, body = raw(server, "/api/generate", {"model": "quality", "keep_alive": 0})
    in_flight = worker.is_alive()
    worker.join(120)
    assert status == 200 and in_flight
    assert body["sarai"]["keep_alive"] == "unload_pending"
    assert parts[-1].done and parts[-1].eval_count > 1  # the stream finished whole
    server.wait_until(lambda: "quality" not in loaded(server), 30, "quality unloaded")


# -- embeddings

def norm(vector) -> float:
    return math.sqrt(sum(v * v for v in vector))


@pytest.mark.models
def test_ollama_embed_and_the_legacy_endpoint(server):
    answer = client(server).embed(model="vectors", input=["hello world", "a cat on a mat"])
    first, second = answer.embeddings
    assert len(first) == len(second) > 100 and first != second
    assert abs(norm(first) - 1) < 1e-3 and answer.prompt_eval_count > 0
    again = client(server).embed(model="auto", input="hello world").embeddings[0]
    assert again == pytest.approx(first, abs=1e-5)
    legacy = client(server).embeddings(model="vectors", prompt="hello world").embedding
    assert legacy == pytest.approx(first, abs=1e-5)
    assert "vectors" in loaded(server)


@pytest.mark.models
def test_openai_embeddings_create(server):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    default = oa.embeddings.create(model="vectors", input=["hello world"])  # base64 by default
    floats = oa.embeddings.create(model="auto", input="hello world", encoding_format="float")
    ours = client(server).embed(model="vectors", input="hello world").embeddings[0]
    assert floats.data[0].embedding == pytest.approx(ours, abs=1e-5)
    assert default.data[0].embedding == pytest.approx(ours, abs=1e-5)
    assert floats.usage.prompt_tokens > 0 and floats.model == "vectors"
    tokens = oa.embeddings.create(model="vectors", input=[[1, 2, 3], [4, 5]],
                                  encoding_format="float")
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oa.embeddings.create(model="vectors", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="embedding = true"):
        oa.embeddings.create(model="fast", input="x")


def prompt_tokens(srv: Server, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = srv.get("/metrics", key=API_KEY)
    assert status == 200
    return sum(s.value for family in text_string_to_metric_families(body.decode())
               for s in family.samples if s.name == "sarai_tokens_total"
               and s.labels == {"model": model, "kind": "prompt"})


@pytest.mark.models
def test_embeddings_are_counted_like_any_request(server):
    before = prompt_tokens(server, "vectors")
    client(server).embed(model="vectors", input="count me")
    assert prompt_tokens(server, "vectors") > before


@pytest.mark.models
def test_a_chat_model_is_no_embedding_model_and_back(server):
    with pytest.raises(ollama.ResponseError) as caught:
        client(server).chat(model="vectors", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400 and "/api/embed" in caught.value.error


def test_embeddings_without_an_embedding_model_say_how_to_configure_one(tmp_path, models_dir):
    srv = launch(tmp_path, base_toml(models_dir, fast="n_threads = 1"))
    try:
        status, body = srv.post("/v1/embeddings",
                                json.dumps({"model": "auto", "input": "x"}).encode(), key=None)
        assert status == 400 and "embedding = true" in body["error"]["message"]
        status, body = srv.post("/api/embed",
                                json.dumps({"model": "auto", "input": "x"}).encode(), key=None)
        assert status == 400 and "embedding = true" in body["error"]
    finally:
        assert stop(srv) == 0


@pytest.mark.models
def test_an_openai_upstream_embedding_model_is_passed_through(server, tmp_path, models_dir,
                                                              monkeypatch):
    """A second router whose embedding model is the first one's, through the ``openai``
    backend: what it answers is the upstream's answer."""
    monkeypatch.setenv("UPSTREAM_ROUTER_KEY", API_KEY)
    front = launch(tmp_path, base_toml(models_dir, fast="n_threads = 1") + f"""
[models.remote]
backend = "openai"
base_url = "{server.url}/v1"
remote_model = "vectors"
api_key_env = "UPSTREAM_ROUTER_KEY"
embedding = true
""")
    try:
        oa = openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0)
        through = oa.embeddings.create(model="auto", input=["hello world", "a cat"],
                                       encoding_format="float")
        direct = client(server).embed(model="vectors", input=["hello world", "a cat"])
        assert through.model == "remote" and len(through.data) == 2
        for ours, theirs in zip(through.data, direct.embeddings):
            assert ours.embedding == pytest.approx(theirs, abs=1e-6)
        assert through.usage.prompt_tokens == direct.prompt_eval_count
        status, body = front.post("/api/embed", json.dumps(
            {"model": "remote", "input": "hello world"}).encode(), key=None)
        assert status == 200 and body["embeddings"][0] == pytest.approx(
            direct.embeddings[0], abs=1e-6)
    finally:
        assert stop(front) == 0


# -- ModelPool.keep_alive, on a fake clock

class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.models
def test_pool_keep_alive_replaces_the_ttl_and_never_touches_a_pinned_model(config):
    from sarai_router.plugins import Hooks
    from sarai_router.pool import ModelPool

    clock = FakeClock()
    pool = ModelPool(config, Hooks(config.plugin_set, config), clock=clock)
    try:
        pool.load_pinned()
        with pool.use("quality"):
            pass  # loaded; idle from now (the config's TTL: 60 s)
        assert pool.keep_alive("fast", 0) == "pinned" and pool.is_loaded("fast")
        assert pool.keep_alive("quality", 5) == "set"
        assert pool.expires_in("quality") == 5
        assert pool.reap(now=clock.now + 4) == []
        assert pool.reap(now=clock.now + 6) == ["quality"]  # before its 60 s TTL
        with pool.use("quality"):
            pass
        pool.keep_alive("quality", 5)
        assert pool.keep_alive("quality", None) == "set"  # the TTL again
        assert pool.reap(now=clock.now + 30) == [] and pool.expires_in("quality") == 60
        with pool.use("quality"):
            assert pool.keep_alive("quality", 0) == "unload_pending"
            assert pool.is_loaded("quality")
        assert not pool.is_loaded("quality")  # the last user left: unloaded at once
        assert pool.keep_alive("quality", 0) == "not_loaded"
        assert pool.reap(now=clock.now + 10**6) == [] and pool.is_loaded("fast")
    finally:
        pool.close()


@pytest.mark.models
def test_an_unload_by_keep_alive_says_so_in_the_event_stream(config):
    from sarai_router.plugins import Hooks
    from sarai_router.pool import ModelPool

    hooks = Hooks(config.plugin_set, config)
    events: list = []
    hooks.subscribe(events.append, "test")
    pool = ModelPool(config, hooks)
    try:
        with pool.use("quality"):
            pass
        assert pool.keep_alive("quality", 0) == "unloaded"
        unloads = [e.data["reason"] for e in events if e.kind == "model_unloaded"]
        assert unloads == ["keep_alive"]
    finally:
        pool.close()
