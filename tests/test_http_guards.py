"""Request validation, the Host guard and the API key, without a model: ``serve``'s real app
through Starlette's test client (no socket, no model load).

The bad-input corpus (``http_bad_inputs.py``) runs here too, every case a refusal decided
before any model is touched; ``test_bad_inputs.py`` sends the whole corpus, byte for byte,
to a real ``serve`` process with the real models.
"""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from conftest import FAST_FILE, base_toml
from http_bad_inputs import API_KEY, CASES, SERVER_TOML, chat
from sarai_router.loading import load_config
from sarai_router.serving import create_app
from sarai_router.serving.openai import ApiError, Limits, parse_chat_body

#: Cases answered only once a model is loaded (its tokenizer counts the prompt, its
#: vocabulary checks a grammar or a schema's limits, or the load itself fails):
#: test_bad_inputs.py sends them to a server with the real models. A new case that needs a
#: model fails here with the load guard's message: add it.
NEED_A_MODEL = {
    "a model whose GGUF header is junk", "a model whose file is missing", "prompt over n_ctx",
    "schema with a dangling $ref", "$ref to a missing $defs entry", "$ref to a remote schema",
    "2,000 optional properties", "ambiguous pattern (a?){120}a{120} (held the model 124 s)",
    "ambiguous pattern (a?){240}a{240}", "embeddings token outside the vocabulary",
    "maxLength 15000 (llama.cpp dumped 120 KB)", "maxLength 20000 (overflowed llama.cpp's parser)",
    "maxLength 20000 streamed", "maxLength of 400 digits", "pattern a{1,100000}",
    "pattern bound of 5,000 digits", "pattern repeating what may match nothing",
    "pattern whose nested repetitions multiply", "tool with maxItems 100000, required",
    "tool with maxItems 100000, required, streamed",
    # the language is checked by the speech plugin, which loads its model first
    "transcription in a language Whisper does not know"}
#: The OpenAI API's cases (Ollama's /api/* answer in Ollama's own error shape).
#: The cases that need a misbehaving upstream server are run against one in
#: test_bad_inputs.py; here their models point nowhere.
REFUSALS = [c for c in CASES if c.raw is None and c.name not in NEED_A_MODEL
            and not c.path.startswith("/api/") and not c.name.startswith("upstream ")]

#: A test double, clearly one: a backend that claims no tools, JSON output or logprobs
#: (no real backend here lacks them).
TEXT_ONLY_DOUBLE = '''
from sarai_router import hookimpl
from sarai_router.backend import Capabilities
from sarai_router.default_plugins.llama_cpp import LlamaCppBackend


class TextOnlyDouble(LlamaCppBackend):
    def capabilities(self, spec):
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx)


@hookimpl
def register_backends(register):
    register("textonly_double", TextOnlyDouble())
'''


@pytest.fixture(scope="module")
def app(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("guards")
    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / "textonly_double.py").write_text(TEXT_ONLY_DOUBLE, encoding="utf-8")
    config = folder / "sarai.toml"
    server = SERVER_TOML.format(broken=(folder / "broken.gguf").as_posix(),
                                missing=(folder / "gone.gguf").as_posix(),
                                fast=(models_dir / FAST_FILE).as_posix(),
                                # The misbehaving-upstream models are not reached here.
                                upstream="http://127.0.0.1:9")
    config.write_text(
        base_toml(models_dir) + f'\n[plugins]\ndirs = ["{plugins.as_posix()}"]\n'
        + server.replace("[server]\n", '[server]\nallowed_hosts = ["sarai.test"]\n', 1),
        encoding="utf-8")
    # No lifespan (the client is not entered): no pinned model loads, no reaper starts.
    return create_app(load_config(config), api_key=API_KEY, load_pinned=False)


@pytest.fixture
def client(app):
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


def send(client: TestClient, method: str, path: str, body: bytes = b"", **headers):
    defaults = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    defaults.update({k.lower(): v for k, v in headers.items()})
    return client.request(method, path, content=body or None,
                          headers={k: v for k, v in defaults.items() if v is not None})


def refused(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert "Traceback" not in response.text and ".gguf" not in response.text
    return error


@pytest.mark.parametrize("case", REFUSALS, ids=[c.name for c in REFUSALS])
def test_a_bad_request_is_refused_before_any_model(client, case):
    response = send(client, case.method, case.path, case.body, **case.headers)
    refused(response, case.status, case.code)


# -- the API key -----------------------------------------------------------------------------


def test_the_api_key_is_needed_everywhere_but_health(client):
    for path in ("/v1/models", "/v1/models/fast", "/metrics"):
        refused(send(client, "GET", path, authorization=None), 401, "invalid_api_key")
        assert send(client, "GET", path).status_code == 200, path
    error = refused(send(client, "POST", "/v1/chat/completions", chat(),
                         authorization=f"Bearer {API_KEY}x"), 401, "invalid_api_key")
    assert API_KEY not in json.dumps(error)
    assert send(client, "GET", "/health", authorization=None).status_code == 200


# -- the Host guard --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost", "[::1]:9",
                                  "app.localhost", "sarai.test", "SARAI.test:443"])
def test_loopback_and_allowed_hosts_get_in(client, host):
    assert send(client, "GET", "/v1/models", host=host).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "sarai.test.evil",
                                  "127.0.0.1.nip.io", "evil.example:8000"])
def test_other_hosts_are_refused_before_the_key_is_checked(client, host):
    refused(send(client, "GET", "/v1/models", host=host), 421, "invalid_host")
    refused(send(client, "GET", "/v1/models", host=host, authorization=None), 421,
            "invalid_host")
    refused(send(client, "POST", "/v1/chat/completions", chat(), host=host), 421,
            "invalid_host")


# -- validation ------------------------------------------------------------------------------


def test_max_tokens_up_to_the_cap_is_accepted_and_past_it_refused():
    limits = Limits(max_tokens_cap=100)
    for key in ("max_tokens", "max_completion_tokens"):
        body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], key: 100}
        assert parse_chat_body(body, limits).params.max_tokens == 100
        with pytest.raises(ApiError) as info:
            parse_chat_body({**body, key: 101}, limits)
        assert info.value.status == 400 and "max_tokens_cap = 100" in str(info.value)
