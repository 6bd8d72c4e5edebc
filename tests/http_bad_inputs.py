"""A corpus of bad HTTP requests and what the server must answer to each.

Data only: ``tests/test_bad_inputs.py`` sends every case, byte for byte, to a real
``sarai-router serve`` on 127.0.0.1 and checks the status, the OpenAI error shape and
``code``, that no server path or traceback is in the body, and that ``/health`` still
answers. docs/RELIABILITY.md has the tally.

Each case is ``Case(name, method, path, headers, body, status, code)``. ``headers`` are
added to the defaults (JSON content type, the API key, a loopback Host); a header set to
``None`` is left out. ``raw`` replaces the whole request (protocol-level cases). The
server's config is ``SERVER_TOML`` (the API key, limits and models named here).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

API_KEY = "corpus-key-1"
MAX_BODY = 262144
MAX_PROMPT_CHARS = 20000
MAX_TOKENS_CAP = 4096
HEADER_TIMEOUT = 2
BODY_TIMEOUT = 2
CORS_ORIGIN = "http://allowed.example"

#: [server] and the extra models of the corpus server (appended to the base config).
SERVER_TOML = f"""
[server]
queue_size = 4
max_body_bytes = {MAX_BODY}
max_prompt_chars = {MAX_PROMPT_CHARS}
max_tokens_cap = {MAX_TOKENS_CAP}
header_timeout_seconds = {HEADER_TIMEOUT}
body_timeout_seconds = {BODY_TIMEOUT}
cors_origins = ["{CORS_ORIGIN}"]

[models.broken]
path = "{{broken}}"

[models.missing]
path = "{{missing}}"

[models.vec]
path = "{{fast}}"
embedding = true
n_ctx = 64
n_threads = 1

[models.brokenvec]
path = "{{broken}}"
embedding = true

[models.textonly]
backend = "textonly_double"
path = "{{fast}}"
n_ctx = 512
max_tokens = 8
"""


class Case(NamedTuple):
    name: str
    method: str
    path: str
    headers: dict[str, str | None]
    body: bytes
    status: int
    code: str
    raw: bytes | None = None


def chat(**fields: Any) -> bytes:
    """A valid chat body with ``fields`` changed (a value of ``...`` removes the field)."""
    body: dict[str, Any] = {"model": "fast", "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hi"}]}
    for key, value in fields.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode()


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A ``response_format`` holding ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def say(*messages: Any, **fields: Any) -> bytes:
    return chat(messages=list(messages), **fields)


USER = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def ochat(**fields: Any) -> bytes:
    """A valid Ollama ``/api/chat`` body with ``fields`` changed (``...`` removes one)."""
    body: dict[str, Any] = {"model": "fast", "stream": False, "options": {"num_predict": 2},
                            "messages": [{"role": "user", "content": "hi"}]}
    for key, value in fields.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode()


def ochat_options(**options: Any) -> bytes:
    return ochat(options={"num_predict": 2, **options})


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


LOAD, UNLOAD, ROUTE = "/admin/models/load", "/admin/models/unload", "/admin/route"


def admin(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _post(name: str, body: bytes, status: int, code: str, path: str = "/v1/chat/completions",
          **headers: str | None) -> Case:
    return Case(name, "POST", path, {k.replace("_", "-"): v for k, v in headers.items()},
                body, status, code)


def _get(name: str, path: str, status: int, code: str, **headers: str | None) -> Case:
    return Case(name, "GET", path, {k.replace("_", "-"): v for k, v in headers.items()},
                b"", status, code)


def _raw(name: str, request: bytes, status: int, code: str) -> Case:
    return Case(name, "RAW", "", {}, b"", status, code, raw=request)


def _nested(levels: int, open_: str = "[", close: str = "]") -> bytes:
    return f'{{"model": "fast", "messages": {open_ * levels}{close * levels}}}'.encode()


CASES: list[Case] = [
    # -- routes and methods
    _get("unknown path", "/nope", 404, "not_found"),
    _post("unknown POST path", chat(), 404, "not_found", path="/v1/nope"),
    Case("DELETE chat", "DELETE", "/v1/chat/completions", {}, b"", 405, "method_not_allowed"),
    Case("PUT models", "PUT", "/v1/models", {}, b"{}", 405, "method_not_allowed"),
    _get("GET chat", "/v1/chat/completions", 405, "method_not_allowed"),
    _post("POST models", chat(), 405, "method_not_allowed", path="/v1/models"),
    _post("POST health", b"{}", 405, "method_not_allowed", path="/health"),
    _get("unknown model row", "/v1/models/gpt-4", 404, "model_not_found"),
    _get("NUL in the model name", "/v1/models/%00", 404, "model_not_found"),
    _get("8 KB path", "/" + "a" * 8000, 404, "not_found"),
    # -- the API key
    _get("no key", "/v1/models", 401, "invalid_api_key", authorization=None),
    _get("wrong key", "/v1/models", 401, "invalid_api_key", authorization="Bearer nope"),
    _get("basic auth", "/v1/models", 401, "invalid_api_key", authorization="Basic dXNlcjpwdw=="),
    _get("bearer without a token", "/v1/models", 401, "invalid_api_key", authorization="Bearer"),
    _post("chat without a key", chat(), 401, "invalid_api_key", authorization=None),
    # -- Host (DNS rebinding)
    _get("foreign Host", "/v1/models", 421, "invalid_host", host="evil.example"),
    _get("foreign Host with a port", "/health", 421, "invalid_host", host="evil.example:8000"),
    _post("foreign Host on chat", chat(), 421, "invalid_host", host="localhost.evil.example"),
    Case("CORS preflight from another origin", "OPTIONS", "/v1/chat/completions", {
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "authorization": None}, b"", 400, "cors_refused"),
    Case("OPTIONS that is no preflight", "OPTIONS", "/v1/models", {}, b"", 405,
         "method_not_allowed"),
    # -- content type (a web page can send these without a CORS preflight)
    _post("text/plain", chat(), 415, "unsupported_media_type", content_type="text/plain"),
    _post("form", b"model=fast", 415, "unsupported_media_type",
          content_type="application/x-www-form-urlencoded"),
    _post("multipart", chat(), 415, "unsupported_media_type",
          content_type="multipart/form-data; boundary=x"),
    _post("no content type", chat(), 415, "unsupported_media_type", content_type=None),
    _post("JSON in latin-1", chat(), 415, "unsupported_media_type",
          content_type="application/json; charset=latin-1"),
    # -- the body as JSON
    _post("empty body", b"", 400, "invalid_json"),
    _post("broken JSON", b"{not json", 400, "invalid_json"),
    _post("a list", b"[1, 2]", 400, "invalid_body"),
    _post("null", b"null", 400, "invalid_body"),
    _post("a string", b'"hello"', 400, "invalid_body"),
    _post("NaN", chat().replace(b'"max_tokens": 2', b'"temperature": NaN'), 400, "invalid_json"),
    _post("Infinity", chat().replace(b'"max_tokens": 2', b'"max_tokens": Infinity'), 400,
          "invalid_json"),
    _post("not UTF-8", b'{"model": "\xff\xfe"}', 400, "invalid_json"),
    _post("lone surrogate in content", b'{"model": "fast", "messages": [{"role": "user", '
          b'"content": "\\ud800"}]}', 400, "invalid_json"),
    _post("lone surrogate in a key", b'{"\\udfff": 1}', 400, "invalid_json"),
    _post("2k nested lists", _nested(2000), 400, "invalid_json"),
    _post("100k nested lists", _nested(100_000), 400, "invalid_json"),
    _post("2k nested objects", b'{"model": "fast", "messages": ' + b'{"a": ' * 2000 + b"1"
          + b"}" * 2001, 400, "invalid_json"),
    _post("trailing garbage", chat() + b" x", 400, "invalid_json"),
    _post("5000-digit number", chat().replace(b'"max_tokens": 2', b'"max_tokens": '
                                              + b"9" * 5000), 400, "invalid_json"),
    _post("body over the limit", chat(messages=[{"role": "user", "content": "x" * MAX_BODY}]),
          413, "body_too_large"),
    # -- model and messages
    _post("no model", chat(model=...), 400, "invalid_value"),
    _post("model a number", chat(model=123), 400, "invalid_value"),
    _post("empty model", chat(model=""), 400, "invalid_value"),
    _post("unknown model", chat(model="gpt-4"), 404, "model_not_found"),
    _post("no messages", chat(messages=...), 400, "invalid_value"),
    _post("empty messages", chat(messages=[]), 400, "invalid_value"),
    _post("messages a string", chat(messages="hi"), 400, "invalid_value"),
    _post("message a number", say(1), 400, "invalid_value"),
    _post("unknown role", say({"role": "wizard", "content": "x"}), 400, "invalid_value"),
    _post("legacy function role", say({"role": "function", "name": "f", "content": "x"}), 400,
          "unsupported_value"),
    _post("content a number", say({"role": "user", "content": 42}), 400, "invalid_value"),
    _post("file content part", say({"role": "user", "content": [
        {"type": "file", "file": {"file_id": "f"}}]}), 400, "invalid_value"),
    _post("text part without text", say({"role": "user", "content": [{"type": "text"}]}), 400,
          "invalid_value"),
    _post("image in a system message", say({"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}]}, USER), 400, "invalid_value"),
    _post("image from a local path", say({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}), 400, "invalid_image_url"),
    _post("image from file://", say({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}), 400,
          "invalid_image_url"),
    _post("image from the web", say({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}), 400,
          "invalid_image_url"),
    _post("image data not base64", say({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}), 400,
          "invalid_image_url"),
    _post("audio not base64", say({"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}), 400,
          "invalid_audio"),
    _post("audio in ogg", say({"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}]}), 400,
          "invalid_value"),
    _post("unknown message field", say({"role": "user", "content": "x", "mood": "happy"}), 400,
          "unknown_parameter"),
    _post("tool message without id", say(USER, {"role": "assistant", "tool_calls": [CALL]},
                                         {"role": "tool", "content": "sunny"}), 400,
          "invalid_value"),
    _post("tool message answering nothing", say(USER, {"role": "tool", "tool_call_id": "call_9",
                                                       "content": "sunny"}), 400,
          "invalid_value"),
    _post("tool call of an unknown type", say(USER, {"role": "assistant", "tool_calls": [
        {**CALL, "type": "custom"}]}), 400, "unsupported_value"),
    _post("tool call arguments an object", say(USER, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": {"city": "Paris"}}}]}), 400,
          "invalid_value"),
    _post("assistant with nothing", say(USER, {"role": "assistant", "content": None}), 400,
          "invalid_value"),
    _post("assistant legacy function_call", say(USER, {
        "role": "assistant", "content": None,
        "function_call": {"name": "f", "arguments": "{}"}}), 400, "unsupported_parameter"),
    # -- fields: unknown, refused, out of range
    _post("unknown field", chat(foo=1), 400, "unknown_parameter"),
    _post("llama.cpp's top_k", chat(top_k=40), 400, "unknown_parameter"),
    _post("n = 2", chat(n=2), 400, "unsupported_value"),
    _post("n = 0", chat(n=0), 400, "invalid_value"),
    _post("stream a string", chat(stream="yes"), 400, "invalid_value"),
    _post("stream_options without stream", chat(stream_options={"include_usage": True}), 400,
          "invalid_value"),
    _post("unknown stream option", chat(stream=True, stream_options={"x": 1}), 400,
          "unknown_parameter"),
    _post("empty stop string", chat(stop=[""]), 400, "invalid_value"),
    _post("five stop strings", chat(stop=list("abcde")), 400, "invalid_value"),
    _post("stop a number", chat(stop=[1]), 400, "invalid_value"),
    _post("negative max_tokens", chat(max_tokens=-1), 400, "invalid_value"),
    _post("a billion max_tokens", chat(max_tokens=1_000_000_000), 400, "invalid_value"),
    _post("max_tokens a string", chat(max_tokens="10"), 400, "invalid_value"),
    _post("max_completion_tokens over the cap", chat(max_completion_tokens=MAX_TOKENS_CAP + 1),
          400, "invalid_value"),
    _post("temperature 3", chat(temperature=3), 400, "invalid_value"),
    _post("temperature a string", chat(temperature="hot"), 400, "invalid_value"),
    _post("top_p 1.5", chat(top_p=1.5), 400, "invalid_value"),
    _post("presence_penalty 5", chat(presence_penalty=5), 400, "invalid_value"),
    _post("frequency_penalty a string", chat(frequency_penalty="x"), 400, "invalid_value"),
    _post("seed a float", chat(seed=1.5), 400, "invalid_value"),
    _post("logprobs a string", chat(logprobs="yes"), 400, "invalid_value"),
    _post("top_logprobs without logprobs", chat(top_logprobs=2), 400, "invalid_value"),
    _post("21 top_logprobs", chat(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    _post("logit_bias", chat(logit_bias={"50256": -100}), 400, "unsupported_parameter"),
    _post("audio output", chat(audio={"voice": "alloy", "format": "wav"}), 400,
          "unsupported_parameter"),
    _post("audio modality", chat(modalities=["text", "audio"]), 400, "unsupported_value"),
    _post("predicted output", chat(prediction={"type": "content", "content": "x"}), 400,
          "unsupported_parameter"),
    _post("reasoning_effort", chat(reasoning_effort="high"), 400, "unsupported_parameter"),
    _post("verbosity", chat(verbosity="low"), 400, "unsupported_parameter"),
    _post("web search", chat(web_search_options={}), 400, "unsupported_parameter"),
    _post("legacy functions", chat(functions=[{"name": "f"}]), 400, "unsupported_parameter"),
    _post("legacy function_call", chat(function_call="auto"), 400, "unsupported_parameter"),
    _post("store", chat(store=True), 400, "unsupported_value"),
    _post("flex service tier", chat(service_tier="flex"), 400, "unsupported_value"),
    _post("metadata with 17 keys", chat(metadata={str(i): "v" for i in range(17)}), 400,
          "invalid_value"),
    _post("user a number", chat(user=5), 400, "invalid_value"),
    # -- tools and response_format
    _post("tools an object", chat(tools={"a": 1}), 400, "invalid_value"),
    _post("custom tool", chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), 400,
          "unsupported_value"),
    _post("tool name with a space", chat(tools=[{"type": "function", "function": {
        "name": "get weather"}}]), 400, "invalid_value"),
    _post("the same tool twice", chat(tools=[TOOL, TOOL]), 400, "invalid_value"),
    _post("tool parameters a string", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": "city"}}]), 400, "invalid_value"),
    _post("tool_choice without tools", chat(tool_choice="required"), 400, "invalid_value"),
    _post("tool_choice naming an unknown function", chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "nope"}}), 400, "invalid_value"),
    _post("tool_choice sometimes", chat(tools=[TOOL], tool_choice="sometimes"), 400,
          "invalid_value"),
    _post("allowed_tools tool_choice", chat(tools=[TOOL], tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}), 400,
          "unsupported_value"),
    _post("response_format xml", chat(response_format={"type": "xml"}), 400, "invalid_value"),
    _post("json_schema without a name", chat(response_format={
        "type": "json_schema", "json_schema": {"schema": {"type": "object"}}}), 400,
          "invalid_value"),
    _post("json_schema schema a string", chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}), 400,
          "invalid_value"),
    _post("response_format unknown key", chat(response_format={
        "type": "json_object", "schema": {}}), 400, "unknown_parameter"),
    _post("tools and JSON output together", chat(tools=[TOOL], tool_choice="required",
                                                 response_format={"type": "json_object"}), 400,
          "unsupported_parameter"),
    _post("schema with a dangling $ref", chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "$ref": "#/definitions/nope"}}}), 400, "invalid_value"),
    # -- schemas whose grammar would crash or starve llama.cpp (refused by keyword and place)
    _post("maxLength 20000 (overflowed llama.cpp's parser)", chat(
        model="auto", response_format=_schema({"type": "object", "properties": {
            "s": {"type": "string", "maxLength": 20000}}, "required": ["s"]})), 400,
          "invalid_value"),
    _post("maxLength 20000 streamed", chat(
        model="auto", stream=True, response_format=_schema({"type": "object", "properties": {
            "s": {"type": "string", "maxLength": 20000}}, "required": ["s"]})), 400,
          "invalid_value"),
    _post("maxLength 15000 (llama.cpp dumped 120 KB)", chat(response_format=_schema({
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 15000}}})), 400,
          "invalid_value"),
    _post("pattern a{1,100000}", chat(model="auto", response_format=_schema({
        "type": "string", "pattern": "^a{1,100000}$"})), 400, "invalid_value"),
    _post("tool with maxItems 100000, required", chat(
        model="auto", tool_choice="required", tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"xs": {
                "type": "array", "items": {"type": "integer"}, "maxItems": 100000}}}}}]),
          400, "invalid_value"),
    _post("tool with maxItems 100000, required, streamed", chat(
        model="auto", stream=True, tool_choice="required", tools=[{
            "type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"xs": {"type": "array",
                                                        "maxItems": 100000}}}}}]),
          400, "invalid_value"),
    _post("ambiguous pattern (a?){120}a{120} (held the model 124 s)", chat(
        max_tokens=128, response_format=_schema({"type": "string",
                                                 "pattern": "^(a?){120}a{120}$"})), 400,
          "invalid_value"),
    _post("ambiguous pattern (a?){240}a{240}", chat(response_format=_schema({
        "type": "string", "pattern": "^(a?){240}a{240}$"})), 400, "invalid_value"),
    _post("pattern repeating what may match nothing", chat(response_format=_schema({
        "type": "string", "pattern": "^(a?)*$"})), 400, "invalid_value"),
    _post("pattern whose nested repetitions multiply", chat(response_format=_schema({
        "type": "string", "pattern": "^((a{1,50}){1,50}){1,50}$"})), 400, "invalid_value"),
    _post("2,000 optional properties", chat(response_format=_schema({
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}})),
          400, "invalid_value"),
    _post("$ref to a missing $defs entry", chat(response_format=_schema({
        "$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/b"})), 400, "invalid_value"),
    _post("maxLength of 400 digits", chat(response_format=_schema({
        "type": "string", "maxLength": 10 ** 400})), 400, "invalid_value"),
    _post("pattern bound of 5,000 digits", chat(response_format=_schema({
        "type": "string", "pattern": "^a{" + "9" * 5000 + "}$"})), 400, "invalid_value"),
    _post("$ref to a remote schema", chat(response_format=_schema({
        "$ref": "https://example.com/schema.json"})), 400, "invalid_value"),
    # -- what the models can take
    _post("prompt over max_prompt_chars", say({"role": "user",
                                               "content": "x" * (MAX_PROMPT_CHARS + 1)}), 400,
          "context_length_exceeded"),
    _post("prompt over n_ctx", say({"role": "user", "content": "word " * 1000}), 400,
          "context_length_exceeded"),
    _post("image for a text model", say({"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": PNG}}]}), 400, "unsupported_modality"),
    _post("tools for a model without them", chat(model="textonly", tools=[TOOL]), 400,
          "unsupported_parameter"),
    _post("logprobs for a model without them", chat(model="textonly", logprobs=True), 400,
          "unsupported_parameter"),
    _post("JSON output for a model without it", chat(
        model="textonly", response_format={"type": "json_object"}), 400,
          "unsupported_parameter"),
    _post("a model whose GGUF header is junk", chat(model="broken"), 503, "model_unavailable"),
    _post("a model whose file is missing", chat(model="missing"), 503, "model_unavailable"),
    # -- Ollama's dialect: errors as {"error": "..."}, the code in x-sarai-error-code
    _get("unknown /api path", "/api/nope", 404, "not_found"),
    _get("GET /api/chat", "/api/chat", 405, "method_not_allowed"),
    _post("POST /api/tags", b"{}", 405, "method_not_allowed", path="/api/tags"),
    _get("/api/tags without a key", "/api/tags", 401, "invalid_api_key", authorization=None),
    _post("/api/chat from a foreign Host", ochat(), 421, "invalid_host", path="/api/chat",
          host="evil.example"),
    _post("/api/chat as text/plain", ochat(), 415, "unsupported_media_type", path="/api/chat",
          content_type="text/plain"),
    _post("/api/chat empty body", b"", 400, "invalid_json", path="/api/chat"),
    _post("/api/chat a list", b"[]", 400, "invalid_body", path="/api/chat"),
    _post("/api/chat over the body limit", ochat(messages=[
        {"role": "user", "content": "x" * MAX_BODY}]), 413, "body_too_large", path="/api/chat"),
    _post("/api/chat no model", ochat(model=...), 400, "invalid_value", path="/api/chat"),
    _post("/api/chat unknown model", ochat(model="llama3"), 404, "model_not_found",
          path="/api/chat"),
    _post("/api/chat unknown tag", ochat(model="fast:q8"), 404, "model_not_found",
          path="/api/chat"),
    _post("/api/chat messages a string", ochat(messages="hi"), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat unknown field", ochat(keep_warm=True), 400, "unknown_parameter",
          path="/api/chat"),
    _post("/api/chat unknown message field", ochat(messages=[
        {"role": "user", "content": "hi", "mood": "x"}]), 400, "unknown_parameter",
          path="/api/chat"),
    _post("/api/chat image not base64", ochat(messages=[
        {"role": "user", "content": "hi", "images": ["@@@"]}]), 400, "invalid_image_url",
          path="/api/chat"),
    _post("/api/chat image in an assistant message", ochat(messages=[
        USER, {"role": "assistant", "content": "x", "images": ["AAAA"]}]), 400,
          "invalid_value", path="/api/chat"),
    _post("/api/chat tool message answering nothing", ochat(messages=[
        USER, {"role": "tool", "content": "sunny", "tool_name": "f"}]), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat tool call arguments as text", ochat(messages=[
        USER, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{}"}}]}]), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat stream a string", ochat(stream="yes"), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat think", ochat(think=True), 400, "unsupported_parameter", path="/api/chat"),
    _post("/api/chat format xml", ochat(format="xml"), 400, "invalid_value", path="/api/chat"),
    _post("/api/chat format with a dangling $ref", ochat(format={"$ref": "#/nope"}), 400,
          "invalid_value", path="/api/chat"),
    _post("/api/chat format with maxLength 20000", ochat(format={
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}}), 400,
          "invalid_value", path="/api/chat"),
    _post("/api/chat format with an ambiguous pattern", ochat(format={
        "type": "string", "pattern": "^(a?){120}a{120}$"}), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat options a list", ochat(options=[1]), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat unknown option", ochat_options(num_beams=4), 400, "unknown_parameter",
          path="/api/chat"),
    _post("/api/chat mirostat", ochat_options(mirostat=2), 400, "unsupported_parameter",
          path="/api/chat"),
    _post("/api/chat num_thread", ochat_options(num_thread=8), 400, "unsupported_parameter",
          path="/api/chat"),
    _post("/api/chat num_predict over the cap", ochat_options(num_predict=MAX_TOKENS_CAP + 1),
          400, "invalid_value", path="/api/chat"),
    _post("/api/chat temperature 3", ochat_options(temperature=3), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat num_ctx over the model's", ochat_options(num_ctx=1 << 20), 400,
          "unsupported_parameter", path="/api/chat"),
    _post("/api/chat keep_alive forever", ochat(keep_alive="forever"), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat keep_alive a boolean", ochat(keep_alive=True), 400, "invalid_value",
          path="/api/chat"),
    _post("/api/chat prompt over max_prompt_chars", ochat(messages=[
        {"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}]), 400,
          "context_length_exceeded", path="/api/chat"),
    _post("/api/chat prompt over n_ctx", ochat(messages=[
        {"role": "user", "content": "word " * 1000}]), 400, "context_length_exceeded",
          path="/api/chat"),
    _post("/api/chat image for a text model", ochat(messages=[
        {"role": "user", "content": "what?", "images": [PNG.split(",")[1]]}]), 400,
          "unsupported_modality", path="/api/chat"),
    _post("/api/chat tools for a model without them", ochat(model="textonly", tools=[TOOL]),
          400, "unsupported_parameter", path="/api/chat"),
    _post("/api/chat to an embedding model", ochat(model="vec"), 400, "unsupported_value",
          path="/api/chat"),
    _post("/api/chat a model whose GGUF header is junk", ochat(model="broken"), 503,
          "model_unavailable", path="/api/chat"),
    _post("/api/generate prompt a number", body(model="fast", prompt=1), 400, "invalid_value",
          path="/api/generate"),
    _post("/api/generate context", body(model="fast", prompt="hi", context=[1, 2]), 400,
          "unsupported_parameter", path="/api/generate"),
    _post("/api/generate raw", body(model="fast", prompt="hi", raw=True), 400,
          "unsupported_parameter", path="/api/generate"),
    _post("/api/generate suffix", body(model="fast", prompt="def f(", suffix="):"), 400,
          "unsupported_parameter", path="/api/generate"),
    _post("/api/generate template", body(model="fast", prompt="hi", template="{{.Prompt}}"),
          400, "unsupported_parameter", path="/api/generate"),
    _post("/api/generate images without a prompt", body(model="fast", images=["AAAA"]), 400,
          "invalid_value", path="/api/generate"),
    _post("/api/generate a missing model file", body(model="missing", prompt="hi",
                                                     stream=False), 503,
          "model_unavailable", path="/api/generate"),
    _post("/api/show no model", b"{}", 400, "invalid_value", path="/api/show"),
    _post("/api/show unknown model", body(model="llama3"), 404, "model_not_found",
          path="/api/show"),
    _post("/api/show unknown field", body(model="fast", template=True), 400,
          "unknown_parameter", path="/api/show"),
    _post("/api/embed with a chat model", body(model="fast", input="x"), 400,
          "not_an_embedding_model", path="/api/embed"),
    _post("/api/embed input a number", body(model="vec", input=1), 400, "invalid_value",
          path="/api/embed"),
    _post("/api/embed token ids", body(model="vec", input=[1, 2]), 400, "invalid_value",
          path="/api/embed"),
    _post("/api/embed an empty string in the list", body(model="vec", input=["a", ""]), 400,
          "invalid_value", path="/api/embed"),
    _post("/api/embed dimensions", body(model="vec", input="x", dimensions=8), 400,
          "unsupported_parameter", path="/api/embed"),
    _post("/api/embed a sampling option", body(model="vec", input="x",
                                               options={"temperature": 1}), 400,
          "unsupported_parameter", path="/api/embed"),
    _post("/api/embed truncate a string", body(model="vec", input="x", truncate="no"), 400,
          "invalid_value", path="/api/embed"),
    _post("/api/embed too long without truncate", body(model="vec", input="word " * 200,
                                                       truncate=False), 400,
          "context_length_exceeded", path="/api/embed"),
    _post("/api/embed a broken embedding model", body(model="brokenvec", input="x"), 503,
          "model_unavailable", path="/api/embed"),
    _post("/api/embeddings prompt a number", body(model="vec", prompt=5), 400,
          "invalid_value", path="/api/embeddings"),
    _post("/api/embeddings with input", body(model="vec", prompt="x", input="y"), 400,
          "unknown_parameter", path="/api/embeddings"),
    # -- /v1/embeddings
    _get("GET /v1/embeddings", "/v1/embeddings", 405, "method_not_allowed"),
    _post("embeddings without a key", body(model="vec", input="x"), 401, "invalid_api_key",
          path="/v1/embeddings", authorization=None),
    _post("embeddings no model", body(input="x"), 400, "invalid_value", path="/v1/embeddings"),
    _post("embeddings unknown model", body(model="text-embedding-3-small", input="x"), 404,
          "model_not_found", path="/v1/embeddings"),
    _post("embeddings with a chat model", body(model="fast", input="x"), 400,
          "not_an_embedding_model", path="/v1/embeddings"),
    _post("embeddings no input", body(model="vec"), 400, "invalid_value",
          path="/v1/embeddings"),
    _post("embeddings input an object", body(model="vec", input={"a": 1}), 400,
          "invalid_value", path="/v1/embeddings"),
    _post("embeddings empty list", body(model="vec", input=[]), 400, "invalid_value",
          path="/v1/embeddings"),
    _post("embeddings empty string", body(model="vec", input=""), 400, "invalid_value",
          path="/v1/embeddings"),
    _post("embeddings negative token", body(model="vec", input=[[1, -2]]), 400,
          "invalid_value", path="/v1/embeddings"),
    _post("embeddings token outside the vocabulary", body(model="vec", input=[[1, 10**9]]),
          400, "invalid_value", path="/v1/embeddings"),
    _post("embeddings 2049 inputs", body(model="vec", input=["a"] * 2049), 400,
          "invalid_value", path="/v1/embeddings"),
    _post("embeddings over max_prompt_chars", body(model="vec", input=["x" * 15000] * 2),
          400, "context_length_exceeded", path="/v1/embeddings"),
    _post("embeddings dimensions", body(model="vec", input="x", dimensions=8), 400,
          "unsupported_parameter", path="/v1/embeddings"),
    _post("embeddings int8 encoding", body(model="vec", input="x", encoding_format="int8"),
          400, "invalid_value", path="/v1/embeddings"),
    _post("embeddings unknown field", body(model="vec", input="x", truncate=True), 400,
          "unknown_parameter", path="/v1/embeddings"),
    _post("embeddings user a number", body(model="vec", input="x", user=5), 400,
          "invalid_value", path="/v1/embeddings"),
    _post("embeddings from a broken embedding model", body(model="brokenvec", input="x"),
          503, "model_unavailable", path="/v1/embeddings"),
    # -- the admin API (residency control, the routing playground, the event stream)
    _get("admin status without a key", "/admin/models", 401, "invalid_api_key",
         authorization=None),
    _get("event stream without a key", "/admin/events", 401, "invalid_api_key",
         authorization=None),
    _post("load without a key", admin(model="quality"), 401, "invalid_api_key", path=LOAD,
          authorization=None),
    _get("the page from a foreign Host", "/ui", 421, "invalid_host", host="evil.example"),
    _get("event stream from a foreign Host", "/admin/events", 421, "invalid_host",
         host="evil.example"),
    _post("load as text/plain", admin(model="quality"), 415, "unsupported_media_type",
          path=LOAD, content_type="text/plain"),
    _post("unload as a form", b"model=quality", 415, "unsupported_media_type", path=UNLOAD,
          content_type="application/x-www-form-urlencoded"),
    _get("GET load", LOAD, 405, "method_not_allowed"),
    Case("DELETE unload", "DELETE", UNLOAD, {}, b"", 405, "method_not_allowed"),
    _post("POST the status", b"{}", 405, "method_not_allowed", path="/admin/models"),
    _post("POST the page", b"{}", 405, "method_not_allowed", path="/ui"),
    _get("unknown admin path", "/admin/nope", 404, "not_found"),
    _post("load with broken JSON", b"{", 400, "invalid_json", path=LOAD),
    _post("load a list", b'["quality"]', 400, "invalid_body", path=LOAD),
    _post("load without a model", b"{}", 400, "invalid_value", path=LOAD),
    _post("load model a number", admin(model=5), 400, "invalid_value", path=LOAD),
    _post("load an empty name", admin(model=""), 400, "invalid_value", path=LOAD),
    _post("load with an unknown field", admin(model="quality", force=True), 400,
          "unknown_parameter", path=LOAD),
    _post("load an unknown model", admin(model="gpt-4"), 404, "model_not_found", path=LOAD),
    _post("load a model whose file is missing", admin(model="missing"), 503,
          "model_unavailable", path=LOAD),
    _post("load a model whose GGUF header is junk", admin(model="broken"), 503,
          "model_unavailable", path=LOAD),
    _post("unload a pinned model", admin(model="fast"), 409, "model_pinned", path=UNLOAD),
    _post("unload an unknown model", admin(model="gpt-4"), 404, "model_not_found",
          path=UNLOAD),
    _post("unload timeout negative", admin(model="quality", timeout_seconds=-1), 400,
          "invalid_value", path=UNLOAD),
    _post("unload timeout a string", admin(model="quality", timeout_seconds="soon"), 400,
          "invalid_value", path=UNLOAD),
    _post("unload timeout a day", admin(model="quality", timeout_seconds=86400), 400,
          "invalid_value", path=UNLOAD),
    _post("unload timeout true", admin(model="quality", timeout_seconds=True), 400,
          "invalid_value", path=UNLOAD),
    _post("route without messages", chat(messages=...), 400, "invalid_value", path=ROUTE),
    _post("route an unknown model", chat(model="gpt-4"), 404, "model_not_found", path=ROUTE),
    _post("route with an unknown field", chat(foo=1), 400, "unknown_parameter", path=ROUTE),
    _post("route a prompt over max_prompt_chars", say(
        {"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}), 400,
          "context_length_exceeded", path=ROUTE),
    _post("route a body over the limit", chat(messages=[
        {"role": "user", "content": "x" * MAX_BODY}]), 413, "body_too_large", path=ROUTE),
    _post("route audio (the playground transcribes nothing)", say({"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}), 400,
          "unsupported_value", path=ROUTE),
    _post("route an image for a text model", say({"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": PNG}}]}), 400, "unsupported_modality",
          path=ROUTE),
    # -- the protocol
    _raw("1 MB header", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
         + b"a" * (1 << 20) + b"\r\n\r\n", 431, "headers_too_large"),
    _raw("garbage request line", b"HELLO THERE\r\n\r\n", 400, "invalid_http_request"),
    _raw("HTTP/1.1 without Host", b"GET /health HTTP/1.1\r\n\r\n", 400, "invalid_http_request"),
    _raw("chunked body over the limit", b"POST /v1/chat/completions HTTP/1.1\r\n"
         b"Host: 127.0.0.1\r\nAuthorization: Bearer " + API_KEY.encode()
         + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"%x\r\n" % 8192 + b"x" * 8192 + b"\r\n" for _ in range(40))
         + b"0\r\n\r\n", 413, "body_too_large"),
    _raw("body shorter than its Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n"
         b"Host: 127.0.0.1\r\nAuthorization: Bearer " + API_KEY.encode()
         + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{", 408,
         "request_timeout"),
]
