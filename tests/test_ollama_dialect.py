"""The Ollama dialect's translation layer, without a server or a model: bodies to the
router's request and params, ``keep_alive`` within the server's policy, options mapped or
refused by name, and the shapes of the answers."""

from __future__ import annotations

import base64
import json

import attrs
import pytest

from sarai_router.backend import ToolCall, Usage
from sarai_router.loading import parse_config
from sarai_router.engine import Completion, Timings
from sarai_router.serving import ollama_dialect as dialect
from sarai_router.serving.embeddings import check_inputs, embedding_model, vector_base64
from sarai_router.serving.openai import ApiError, Limits
from sarai_router.types import RouteDecision

CONFIG = """
[server]
keep_alive_max_seconds = 600

[models.fast]
path = "fast.gguf"
n_ctx = 512

[models.quality]
path = "quality.gguf"
modalities = ["text", "image"]
n_ctx = 1024

[models.vectors]
path = "fast.gguf"
embedding = true
"""
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 40).decode()
WAV = base64.b64encode(b"RIFF\x24\0\0\0WAVEfmt " + b"\0" * 40).decode()


@pytest.fixture(scope="module")
def config():
    return parse_config(CONFIG, source="test.toml", base_dir=None)


LIMITS = Limits(max_tokens_cap=100, max_prompt_chars=1000)


def chat(config, **fields):
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], **fields}
    return dialect.parse_chat(body, config, LIMITS)


def refusal(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- keep_alive

@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), ("0", 0.0), ("0s", 0.0), (30, 30.0), ("30s", 30.0),
    ("5m", 300.0), ("1h30m", 600.0), (7200, 600.0), ("1.5m", 90.0), ("250ms", 0.25),
    (-1, None), ("-1", None), ("-1m", None),
])
def test_keep_alive_is_capped_and_negative_means_the_operators_ttl(value, seconds):
    assert dialect.parse_keep_alive(value, cap=600).seconds == seconds


def test_keep_alive_with_no_cap_lets_a_client_only_unload():
    assert dialect.parse_keep_alive("10m", cap=0).seconds is None
    assert dialect.parse_keep_alive(0, cap=0).unload


@pytest.mark.parametrize("value", ["forever", "5 minutes", "m", True, [], {"s": 1}, "1d",
                                   float("inf")])
def test_a_keep_alive_that_is_no_duration_is_refused_by_name(value):
    error = refusal(dialect.parse_keep_alive, value, cap=600)
    assert error.status == 400 and error.param == "keep_alive"


# -- options

def test_options_map_onto_the_generation_params(config):
    asked = chat(config, options={"num_predict": 7, "temperature": 0.2, "top_p": 0.9,
                                  "top_k": 12, "min_p": 0.1, "seed": 42,
                                  "stop": ["\n", "User:", "a", "b", "c"],
                                  "repeat_penalty": 1.3, "presence_penalty": 0.5,
                                  "frequency_penalty": -0.5, "num_ctx": 256, "mirostat": 0})
    params = asked.parsed.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p,
            params.seed, params.repeat_penalty, params.presence_penalty,
            params.frequency_penalty) == (7, 0.2, 0.9, 12, 0.1, 42, 1.3, 0.5, -0.5)
    assert params.stop == ("\n", "User:", "a", "b", "c")  # more than OpenAI's four
    assert asked.options.num_ctx == 256
    dialect.check_num_ctx(asked.options, config, "fast")  # within n_ctx 512


def test_num_predict_minus_one_is_the_models_max_tokens(config):
    assert chat(config, options={"num_predict": -1}).parsed.params.max_tokens is None


@pytest.mark.parametrize("option, value, code", [
    ("mirostat", 2, "unsupported_parameter"), ("num_gpu", 1, "unsupported_parameter"),
    ("num_thread", 4, "unsupported_parameter"), ("typical_p", 0.9, "unsupported_parameter"),
    ("use_mmap", False, "unsupported_parameter"), ("tfs_z", 1.0, "unsupported_parameter"),
    ("bogus", 1, "unknown_parameter"), ("num_predict", 101, "invalid_value"),
    ("num_predict", 0, "invalid_value"), ("num_predict", "5", "invalid_value"),
    ("temperature", 3, "invalid_value"), ("top_k", -1, "invalid_value"),
    ("seed", 1.5, "invalid_value"), ("stop", [""], "invalid_value"),
    ("repeat_penalty", "high", "invalid_value"),
])
def test_an_option_we_cannot_honour_is_refused_by_name(config, option, value, code):
    error = refusal(chat, config, options={option: value})
    assert (error.status, error.code, error.param) == (400, code, f"options.{option}")
    assert option in error.message


def test_num_ctx_beyond_the_models_context_is_refused_naming_the_config_key(config):
    asked = chat(config, options={"num_ctx": 4096})
    error = refusal(dialect.check_num_ctx, asked.options, config, "fast")
    assert error.param == "options.num_ctx" and "[models.fast] n_ctx = 512" in error.message


def test_embeddings_take_no_sampling_options():
    error = refusal(dialect.parse_options, {"temperature": 0.5}, LIMITS, sampling=False)
    assert error.param == "options.temperature"
    assert dialect.parse_options({"num_ctx": 128}, LIMITS, sampling=False).num_ctx == 128


# -- chat and generate bodies

def test_model_names_take_the_latest_tag_and_auto(config):
    assert dialect.model_name(config, "fast:latest") == "fast"
    assert dialect.model_name(config, "auto") == "auto"
    error = refusal(dialect.model_name, config, "fast:q8")
    assert (error.status, error.code) == (404, "model_not_found")


def test_stream_is_the_default_and_no_messages_is_a_load(config):
    assert chat(config).stream is True
    assert chat(config, stream=False).stream is False
    load = dialect.parse_chat({"model": "quality"}, config, LIMITS)
    assert load.parsed is None and load.model == "quality"
    unload = dialect.parse_generate({"model": "quality", "keep_alive": 0}, config, LIMITS)
    assert unload.parsed is None and unload.keep_alive.unload


def test_format_json_and_schema_become_the_openai_response_format(config):
    assert chat(config, format="json").parsed.params.response_format == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = chat(config, format=schema).parsed.params.response_format
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema
    assert "json_schema" in chat(config, format=schema).parsed.request.needs
    assert refusal(chat, config, format="xml").param == "format"


def test_images_are_attached_with_their_type_read_from_the_bytes(config):
    asked = chat(config, model="quality", messages=[
        {"role": "user", "content": "what is this?", "images": [PNG, JPEG]}])
    images = asked.parsed.request.images
    assert [image.mime for image in images] == ["image/png", "image/jpeg"]
    assert images[0].data.startswith(b"\x89PNG")
    error = refusal(chat, config, messages=[{"role": "user", "content": "x",
                                             "images": ["@@@"]}])
    assert (error.code, error.param) == ("invalid_image_url", "messages[0].images[0]")


def test_a_wav_clip_among_the_images_goes_to_the_speech_stage(config):
    asked = chat(config, messages=[{"role": "user", "content": "listen", "images": [WAV]}])
    assert asked.parsed.request.audio is not None and not asked.parsed.request.images


def test_tool_calls_get_ids_and_tool_messages_answer_them_by_name(config):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    asked = chat(config, tools=[tool], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": {}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_name": "get_time"},
    ])
    messages = asked.parsed.request.messages
    calls = messages[1]["tool_calls"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2]["tool_call_id"] == calls[1]["id"]
    assert messages[3]["tool_call_id"] == calls[0]["id"]
    assert asked.parsed.params.tools[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("field, value", [("suffix", "x"), ("template", "{{ .Prompt }}"),
                                          ("context", [1, 2]), ("raw", True)])
def test_generate_refuses_what_it_cannot_do_by_name(config, field, value):
    error = refusal(dialect.parse_generate, {"model": "fast", "prompt": "hi", field: value},
                    config, LIMITS)
    assert (error.code, error.param) == ("unsupported_parameter", field)


def test_generate_puts_the_system_prompt_first(config):
    asked = dialect.parse_generate({"model": "fast", "prompt": "hi", "system": "be brief"},
                                   config, LIMITS)
    assert [m["role"] for m in asked.parsed.request.messages] == ["system", "user"]


def test_think_and_unknown_fields_are_refused_by_name(config):
    assert refusal(chat, config, think=True).param == "think"
    chat(config, think=False)
    assert refusal(chat, config, keep_warm=True).code == "unknown_parameter"


# -- answers

def _completion(**changes):
    decision = RouteDecision(model="fast", reason="r", plugin="p", signals={})
    return Completion(decision=decision, usage=Usage(11, 5),
                      timings=Timings(load_s=0.5, first_token_s=0.1, generation_s=0.4,
                                      total_s=1.0), **changes)


def test_durations_are_nanoseconds_from_the_timings():
    assert dialect.durations(_completion()) == {
        "total_duration": 1_000_000_000, "load_duration": 500_000_000,
        "prompt_eval_count": 11, "prompt_eval_duration": 100_000_000, "eval_count": 5,
        "eval_duration": 300_000_000}


def test_tool_calls_come_back_with_arguments_as_objects():
    calls = dialect.tool_calls([ToolCall("call_1", "f", '{"x": 1}')])
    assert calls == [{"id": "call_1", "function": {"index": 0, "name": "f",
                                                   "arguments": {"x": 1}}}]
    assert dialect.done_reason(_completion(finish_reason="tool_calls")) == "stop"
    assert dialect.done_reason(_completion(finish_reason="length")) == "length"


def test_timestamps_are_rfc3339_utc():
    assert dialect.timestamp(0) == "1970-01-01T00:00:00.000000Z"


@pytest.mark.parametrize("name, level", [("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
                                         ("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),
                                         ("model-f16.gguf", "F16"), ("plain.gguf", "")])
def test_quantization_from_the_file_name(name, level):
    assert dialect.quantization(name) == level


# -- embeddings

def test_auto_embeddings_pick_the_embedding_model_and_a_chat_model_is_refused(config):
    assert embedding_model(config, "auto").model == "vectors"
    assert embedding_model(config, "vectors:latest").model == "vectors"
    error = refusal(embedding_model, config, "fast")
    assert error.status == 400 and "'vectors'" in error.message


def test_auto_embeddings_without_an_embedding_model_say_how_to_configure_one():
    plain = parse_config('[models.fast]\npath = "fast.gguf"\n[models.quality]\n'
                         'path = "q.gguf"\n', source="t.toml", base_dir=None)
    error = refusal(embedding_model, plain, "auto")
    assert error.status == 400 and "embedding = true" in error.message


def test_embedding_inputs():
    assert check_inputs("a", 100) == ["a"]
    assert check_inputs([1, 2, 3], 100) == [[1, 2, 3]]
    assert check_inputs([[1], [2, 3]], 100) == [[1], [2, 3]]
    for bad in ([], "", ["a", ""], [[-1]], [1.5], {"a": 1}, [True]):
        assert refusal(check_inputs, bad, 100).status == 400
    assert refusal(check_inputs, "x" * 101, 100).code == "context_length_exceeded"
    assert refusal(check_inputs, [1, 2], 100, tokens=False).status == 400


def test_base64_vectors_are_little_endian_float32():
    import struct

    raw = base64.b64decode(vector_base64([1.0, -0.5]))
    assert struct.unpack("<2f", raw) == (1.0, -0.5)


def test_a_default_model_that_only_embeds_is_a_config_error():
    from sarai_router.errors import ConfigError

    with pytest.raises(ConfigError, match="embedding model"):
        parse_config('[routing]\ndefault_model = "v"\n[models.v]\npath = "f.gguf"\n'
                     'embedding = true\n[models.quality]\npath = "q.gguf"\n',
                     source="t.toml", base_dir=None)


def test_keep_alive_is_frozen_data():
    assert attrs.has(dialect.KeepAlive)
