"""OpenAI's dialect as a strict client sees it: a real ``sarai-router serve``, the official
``openai`` client, and every answer checked against OpenAI's published OpenAPI schema
(``openai_spec``) and the client's own pydantic types.

Tools, JSON output and logprobs run on both default models (SmolLM2-135M as ``fast``,
Gemma-3-270M as ``quality``): what is asserted is what the grammar and the server
guarantee (shapes, schema-valid arguments and JSON, logprobs that add up to the text),
not what a 135M model decides.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import openai_spec
from conftest import base_toml
from sarai_router.testing import SARAI_ROUTER as SAR, free_port, start_serve

API_KEY = "dialect-key"
MODELS = ["fast", "quality"]
#: Characters whose UTF-8 bytes the fast model's tokenizer splits across tokens, and an
#: answer held to them (by a pattern: llama-cpp-python's schema converter writes an
#: ``enum`` or ``const`` of non-ASCII text as JSON surrogate escapes that its grammar
#: reads as other bytes).
EMOJI = "\U0001f389\U0001f973"
EMOJI_ONLY = {"type": "json_schema", "json_schema": {
    "name": "emoji", "schema": {"type": "string", "pattern": f"^{EMOJI}$"}}}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                     "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("dialect")
    config = folder / "sarai.toml"
    config.write_text(base_toml(models_dir, cache="ttl_seconds = 600\nmax_loaded = 2",
                                fast="pinned = true\nn_threads = 1",
                                quality="pinned = true\nn_threads = 1"), encoding="utf-8")
    srv = start_serve(config, args=["--api-key", API_KEY, "--allowed-host", "sarai.test"],
                      echo=False, log_path=folder / "server.log",
                      env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})

    def quality_loaded() -> bool:
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=5) as resp:
                return json.loads(resp.read())["models"]["quality"] == "loaded"
        except OSError:
            return False

    try:
        srv.wait_until(quality_loaded, 120, "the pinned quality model")
        yield srv.url, srv.port
    finally:
        srv.stop(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=300)


def create(client, **kwargs) -> tuple[dict, ChatCompletion]:
    """The raw JSON of an answer, checked against the spec and the client's types."""
    kwargs.setdefault("temperature", 0)
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    data = raw.http_response.json()
    openai_spec.check("CreateChatCompletionResponse", data)
    return data, ChatCompletion.model_validate(data)


def stream(client, **kwargs) -> list[dict]:
    kwargs.setdefault("temperature", 0)
    raw = client.chat.completions.with_raw_response.create(stream=True, **kwargs)
    chunks = []
    for line in raw.http_response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            openai_spec.check("CreateChatCompletionStreamResponse", chunk)
            ChatCompletionChunk.model_validate(chunk)
            chunks.append(chunk)
    return chunks


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- shapes ---------------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_a_plain_answer_matches_the_spec(client, model):
    data, completion = create(client, model=model, max_tokens=8, messages=ask("Hola"))
    message = data["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    assert data["system_fingerprint"] == f"sarai-0.1.0-{model}"
    assert data["choices"][0]["logprobs"] is None
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.models
def test_stream_chunks_match_the_spec(client):
    chunks = stream(client, model="fast", max_tokens=8, messages=ask("Hola"),
                    stream_options={"include_usage": True})
    assert all(isinstance(c["system_fingerprint"], str) for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_every_request_field_of_the_spec_is_honoured_or_refused():
    from sarai_router.serving.openai import KNOWN_FIELDS

    assert openai_spec.request_fields() == set(KNOWN_FIELDS)


# -- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text, tool", [("What's the weather in Paris?", WEATHER),
                                        ("What is 2 plus 3?", ADD)])
@pytest.mark.models
def test_tool_choice_required_gives_a_call_that_fits_the_schema(client, model, text, tool):
    data, completion = create(client, model=model, max_tokens=80, messages=ask(text),
                              tools=[WEATHER, ADD], tool_choice="required")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert data["choices"][0]["message"]["content"] is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    print(f"{model}: {text!r} -> {call.function.name}({call.function.arguments})")


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_a_named_tool_choice_calls_that_function(client, model):
    _, completion = create(client, model=model, max_tokens=80,
                           messages=ask("What's the weather in Madrid?"), tools=[WEATHER, ADD],
                           tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


@pytest.mark.models
def test_a_streamed_tool_call(client):
    chunks = stream(client, model="fast", max_tokens=80, messages=ask("Weather in Rome?"),
                    tools=[WEATHER], tool_choice="required")
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_weather"
    json.loads(calls[0][0]["function"]["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_tool_choice_auto_answers_with_text_or_a_valid_call(client, model):
    _, completion = create(client, model=model, max_tokens=60,
                           messages=ask("What's the weather in Paris?"), tools=[WEATHER])
    choice = completion.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        json.loads(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    print(f"{model} auto: {choice.finish_reason} {choice.message.content!r:.80}")


@pytest.mark.models
def test_tool_choice_none_answers_in_text(client):
    _, completion = create(client, model="fast", max_tokens=8, messages=ask("Hi"),
                           tools=[WEATHER], tool_choice="none")
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_a_tool_result_goes_back_to_the_model(client, model):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "22 C and sunny"},
    ]
    _, completion = create(client, model=model, max_tokens=30, messages=messages,
                           tools=[WEATHER])
    assert completion.choices[0].message.content or completion.choices[0].message.tool_calls


# -- JSON output ----------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_response_format_json_schema_gives_json_that_fits(client, model):
    _, completion = create(
        client, model=model, max_tokens=80,
        messages=ask("Invent a person. Answer with their name and age as JSON."),
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "strict": True, "schema": PERSON}})
    content = completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), PERSON)
    print(f"{model}: {content}")


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_response_format_json_object_gives_a_json_object(client, model):
    _, completion = create(client, model=model, max_tokens=80,
                           messages=ask("Describe a cat as a JSON object."),
                           response_format={"type": "json_object"})
    content = completion.choices[0].message.content
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut at max_tokens: still a JSON object's beginning
        assert content.lstrip().startswith("{")


# -- logprobs -------------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize("model", MODELS)
def test_logprobs_add_up_to_the_text(client, model):
    data, completion = create(client, model=model, max_tokens=10, messages=ask("Say hello"),
                              logprobs=True, top_logprobs=3)
    tokens = completion.choices[0].logprobs.content
    assert adds_up(tokens, completion.choices[0].message.content)
    assert len(tokens) == completion.usage.completion_tokens
    for token in tokens:
        assert token.logprob <= 0
        for each in (token, *token.top_logprobs):
            assert bytes(each.bytes).decode("utf-8", errors="replace") == each.token
        alternatives = [t.logprob for t in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # At temperature 0 the chosen token is the most likely one.
        assert token.logprob == pytest.approx(alternatives[0])


def adds_up(tokens, text: str) -> bool:
    """The tokens' bytes make up ``text``. Their ``token`` strings need not: a character
    whose UTF-8 bytes span several tokens (an emoji) is "\\ufffd" in each of them."""
    return b"".join(bytes(t.bytes) for t in tokens).decode("utf-8") == text


@pytest.mark.models
def test_logprobs_of_a_character_split_across_tokens_carry_its_bytes(client):
    """An answer held to emoji (by a JSON schema): the tokenizer splits each one's bytes
    across tokens, whose text is then "\\ufffd"; the bytes still add up to the answer."""
    data, completion = create(client, model="fast", max_tokens=24, messages=ask("Party!"),
                              logprobs=True, response_format=EMOJI_ONLY)
    text = completion.choices[0].message.content
    assert json.loads(text) == EMOJI
    tokens = completion.choices[0].logprobs.content
    assert any("\ufffd" in t.token for t in tokens)  # the case this test is about
    assert adds_up(tokens, text)
    streamed = stream(client, model="fast", max_tokens=24, messages=ask("Party!"),
                      logprobs=True, response_format=EMOJI_ONLY)
    pieces = [t for c in streamed if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    assert b"".join(bytes(t["bytes"]) for t in pieces).decode("utf-8") == text


@pytest.mark.models
def test_streamed_logprobs_come_with_their_text(client):
    chunks = stream(client, model="fast", max_tokens=10, messages=ask("Say hello"),
                    logprobs=True)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    tokens = [t["bytes"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    assert text and b"".join(bytes(t) for t in tokens).decode("utf-8") == text


# -- HTTP -----------------------------------------------------------------------------------


def _get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    headers.setdefault("Host", f"127.0.0.1:{port}")
    for key, value in headers.items():
        conn.putheader(key.replace("_", "-"), value)
    conn.endheaders()
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


@pytest.mark.models
def test_the_bearer_scheme_is_case_insensitive(server):
    _, port = server
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert _get(port, "/v1/models", Authorization=f"{scheme} {API_KEY}")[0] == 200


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("127.0.0.1", 200), ("[::1]", 200), ("app.localhost", 200),
    ("sarai.test", 200),  # --allowed-host
    ("evil.example", 421), ("sarai.test.evil.example", 421)])
@pytest.mark.models
def test_host_allowlist(server, host, status):
    _, port = server
    assert _get(port, "/health", Host=f"{host}:{port}")[0] == status


@pytest.mark.models
def test_cors_is_off_by_default(server):
    _, port = server
    status, headers, _ = _get(port, "/v1/models", Origin="https://evil.example",
                              Authorization=f"Bearer {API_KEY}")
    assert status == 200 and "access-control-allow-origin" not in headers


@pytest.mark.models
def test_request_ids(server):
    _, port = server
    _, headers, _ = _get(port, "/health")
    assert headers["x-request-id"].startswith("req_")
    _, headers, _ = _get(port, "/health", X_Request_Id="client-42")
    assert headers["x-request-id"] == "client-42"


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(tmp_path, models_dir):
    config = tmp_path / "sarai.toml"
    config.write_text(base_toml(models_dir), encoding="utf-8")
    result = subprocess.run([SAR, "--config", str(config), "serve", "--host", "0.0.0.0",
                             "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SARAI_ROUTER_API_KEY": ""})
    assert result.returncode == 2
    assert "--allow-unauthenticated" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    from sarai_router.cli.serve import is_loopback

    assert is_loopback(host) is loopback


# -- through the openai backend: sarai-router as another sarai-router's upstream -----------


@pytest.fixture(scope="module")
def relay(server, tmp_path_factory, models_dir):
    """An engine whose model ``remote`` is the dialect server's ``fast`` model, reached
    through the ``openai`` backend (which passes tools, JSON output and logprobs on)."""
    from sarai_router.loading import load_config
    from sarai_router.engine import Engine

    config = tmp_path_factory.mktemp("relay") / "sarai.toml"
    config.write_text(f"""
[paths]
models_dir = "{models_dir.as_posix()}"
[routing]
default_model = "remote"
[plugins.heuristic]
conversation_model = "remote"
multimodal_model = "remote"
[models.remote]
backend = "openai"
base_url = "{server[0]}/v1"
remote_model = "fast"
api_key_env = "SARAI_TEST_RELAY_KEY"
n_ctx = 1024
max_tokens = 80
""", encoding="utf-8")
    os.environ["SARAI_TEST_RELAY_KEY"] = API_KEY
    engine = Engine(load_config(config))
    yield engine
    engine.close()
    os.environ.pop("SARAI_TEST_RELAY_KEY", None)


def relayed(engine, text: str, **params):
    from sarai_router.backend import GenerationParams
    from sarai_router.engine import Completion
    from sarai_router.types import ChatRequest

    request = ChatRequest.from_prompt(text)
    decision = engine.prepare(request, model="remote", prewarm=False)
    completion = Completion(decision=decision)
    for _ in engine.stream(request, decision,
                           GenerationParams(**{"temperature": 0, "max_tokens": 80, **params}),
                           completion):
        pass
    return completion


@pytest.mark.models
def test_tool_calls_come_back_through_the_openai_backend(relay):
    completion = relayed(relay, "What's the weather in Paris?", tools=(WEATHER, ADD),
                         tool_choice="required")
    assert completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


@pytest.mark.models
def test_logprobs_and_json_come_back_through_the_openai_backend(relay):
    completion = relayed(relay, "Say hello", logprobs=True, top_logprobs=2, max_tokens=8)
    assert completion.logprobs
    assert adds_up(completion.logprobs, completion.text)
    for token in completion.logprobs:
        assert len(token.top) == 2
        for text, _, raw in ((token.token, token.logprob, token.bytes), *token.top):
            assert bytes(raw).decode("utf-8", errors="replace") == text
    # A character split across tokens: its bytes come through the relay too.
    completion = relayed(relay, "Party!", logprobs=True, response_format=EMOJI_ONLY)
    assert json.loads(completion.text) == EMOJI
    assert any("\ufffd" in t.token for t in completion.logprobs)
    assert adds_up(completion.logprobs, completion.text)
    completion = relayed(relay, "Invent a person as JSON.", response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(completion.text), PERSON)
