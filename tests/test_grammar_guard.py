"""Grammar work can never crash or starve the server.

A JSON schema (``response_format``, or a tool's parameters under ``tool_choice``) becomes
a llama.cpp grammar. Too large a bound overflowed llama.cpp's recursive parser (SIGSEGV:
the whole server gone), and an ambiguous pattern held the model for minutes. Here: the
limits (``grammar_limits``), the converter's mended faults (``$ref``, many optional
properties), the time bound, and a real ``serve`` on 127.0.0.1 with the real fast model
fed the reported cases and fuzzed schemas and patterns.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import base_toml
from sarai_router.default_plugins.grammar_limits import (MAX_AMBIGUITY,
                                                        MAX_OPTIONAL_PROPERTIES, MAX_REPEAT,
                                                        check_schema, pattern_shape)
from sarai_router.errors import InvalidRequest
from sarai_router.serving.openai import scrub_paths
from sarai_router.time_budget import OverBudget, TimeBudget

SAR = str(Path(sys.executable).with_name("sarai-router"))
PARAM = "response_format.json_schema.schema"


def _refused(schema) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check_schema(schema, PARAM)
    assert caught.value.param == PARAM
    return str(caught.value)


# -- limits, measured before anything is expanded --------------------------------------------


def test_a_bound_over_the_limit_is_refused_by_keyword_and_place():
    message = _refused({"type": "object", "properties": {"s": {"type": "string",
                                                               "maxLength": 20000}}})
    assert "maxLength at #/properties/s/maxLength is 20000" in message
    assert "maxItems at #/maxItems" in _refused({"type": "array", "maxItems": 100000})
    assert "minLength at #/items/minLength" in _refused({"items": {"minLength": 5000}})
    check_schema({"type": "string", "maxLength": MAX_REPEAT}, PARAM)  # the limit itself passes
    assert "maxLength at #/maxLength is 10000000000000000000...;" in _refused(
        {"maxLength": 10 ** 400})  # no float can hold it: named all the same
    assert "maxItems at #/maxItems is 1e+300" in _refused({"maxItems": 1e300})


def test_patterns_are_measured_as_the_converter_expands_them():
    assert "pattern at #/pattern repeats something 100000 times" in _refused(
        {"type": "string", "pattern": "^a{1,100000}$"})
    assert "expands to about" in _refused({"pattern": "^((a{1,50}){1,50}){1,50}$"})
    assert "variable-length parts in a row" in _refused({"pattern": "^(a?){120}a{120}$"})
    assert "may match nothing" in _refused({"pattern": "^(a?)*$"})
    assert "repeats something" in _refused({"pattern": "^a{" + "9" * 5000 + "}$"})
    assert "may match nothing" in _refused({"pattern": "^(a*)+$"})
    assert pattern_shape("^(a?){120}a{120}$").ambiguity == 120
    assert pattern_shape("^(a|aa){100}$").ambiguity == 100
    # Ordinary patterns pass.
    for pattern in (r"^\d{3}-\d{4}$", r"^(\d{1,3}\.){3}\d{1,3}$", r"^[a-z]{0,1000}$",
                    r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$", "^(ab|cd)*$",
                    f"^(a?){{{MAX_AMBIGUITY}}}$"):
        check_schema({"type": "string", "pattern": pattern}, PARAM)


def test_too_many_optional_properties_are_refused_by_name_not_as_nesting():
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                             for i in range(2000)}}
    message = _refused(many)
    assert "properties at #/properties has 2000 optional properties" in message
    assert "nested" not in message
    # Whatever "required" holds, the count is made (the converter refuses the rest).
    check_schema({"type": "object", "properties": {"a": {}}, "required": [{"x": 1}, None]},
                 PARAM)
    # Required ones do not count.
    check_schema({**many, "required": [f"p{i}" for i in range(2000 - MAX_OPTIONAL_PROPERTIES)]},
                 PARAM)


def test_every_schema_a_request_carries_is_checked_where_the_client_put_it():
    from sarai_router.backend import GenerationParams
    from sarai_router.default_plugins.grammar_limits import check_params

    fine = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    big = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "maxItems": 100000}}}}}
    with pytest.raises(InvalidRequest, match=r"^tools\[1\]\.function\.parameters: maxItems at "
                                             r"#/properties/xs/maxItems") as caught:
        check_params(GenerationParams(tools=(fine, big), tool_choice="auto"))
    assert caught.value.param == "tools[1].function.parameters"
    with pytest.raises(InvalidRequest, match="^response_format.json_schema.schema: pattern"):
        check_params(GenerationParams(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"pattern": "^(a?){99}$"}}}))
    check_params(GenerationParams(tools=(fine,), response_format={"type": "json_object"}))


def test_a_place_in_the_schema_is_not_taken_for_a_server_path():
    text = "x: $ref '#/$defs/a' points at nothing; maxLength at #/properties/s/maxLength"
    assert scrub_paths(text) == text
    assert scrub_paths("opened /home/user/models/m.gguf") == "opened <path>"


# -- the converter's faults, mended ---------------------------------------------------------


def test_refs_to_defs_resolve_wherever_they_are():
    from sarai_router.default_plugins.llama_cpp_features import schema_grammar

    chained = {"$defs": {"a": {"type": "string"}, "b": {"$ref": "#/$defs/a"}},
               "$ref": "#/$defs/b"}
    assert "root ::=" in schema_grammar(chained, PARAM)
    recursive = {"definitions": {"node": {"type": "object", "properties": {
        "next": {"$ref": "#/definitions/node"}}}}, "$ref": "#/definitions/node"}
    assert "root ::=" in schema_grammar(recursive, PARAM)
    with pytest.raises(InvalidRequest, match=r"\$ref '#/\$defs/nope' points at nothing"):
        schema_grammar({"$ref": "#/$defs/nope"}, PARAM)
    with pytest.raises(InvalidRequest, match="only local references"):
        schema_grammar({"$ref": "https://example.com/schema.json"}, PARAM)


def test_many_optional_properties_convert_in_linear_time():
    from sarai_router.default_plugins.llama_cpp_features import schema_grammar

    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                               for i in range(MAX_OPTIONAL_PROPERTIES)}}
    started = time.perf_counter()
    grammar = schema_grammar(schema, PARAM)
    # llama-cpp-python's own converter took 4.9 s for 1,000 and hit the recursion limit
    # at 2,000; a generous bound still tells the two apart.
    assert time.perf_counter() - started < 2.0
    assert grammar.count("-rest ::=") == MAX_OPTIONAL_PROPERTIES - 1


# -- the time budget ------------------------------------------------------------------------


def test_the_time_budget_trips_on_a_slow_token_and_on_the_total():
    now = [0.0]
    budget = TimeBudget(max_seconds=10, max_token_sampling_seconds=2, clock=lambda: now[0])
    budget.start()
    budget.add_sampling(0.5)
    now[0] = 9.0
    assert not budget.exceeded()
    now[0] = 10.5
    assert budget.exceeded() and "max_request_seconds" in budget.reason
    slow = TimeBudget(max_token_sampling_seconds=2)
    slow.start()
    slow.add_sampling(3.0)
    with pytest.raises(OverBudget, match="max_token_sampling_seconds"):
        slow.check()
    unbounded = TimeBudget()
    unbounded.start()
    unbounded.add_sampling(1000)
    assert not unbounded.exceeded()


# -- against a real server ------------------------------------------------------------------

#: ``bounded``: the fast model with a per-token sampling bound no grammar can meet (1 ms
#: for 49,152 candidate tokens), so the time limit must end its constrained answers.
SERVER_EXTRA = """
[server]
queue_size = 8

[models.bounded]
path = "{fast}"
n_ctx = 512
max_tokens = 64
n_threads = 1
max_token_sampling_seconds = 0.001
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    from conftest import FAST_FILE

    folder = tmp_path_factory.mktemp("grammar")
    config = folder / "sarai.toml"
    config.write_text(base_toml(models_dir, fast="pinned = true\nn_threads = 1",
                                quality="n_threads = 1")
                      + SERVER_EXTRA.format(fast=(models_dir / FAST_FILE).as_posix()),
                      encoding="utf-8")
    port = _free_port()
    log = folder / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([SAR, "--config", str(config), "serve", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail("the server exited:\n" + log.read_text()[-3000:], pytrace=False)
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the server did not start:\n" + log.read_text()[-3000:], pytrace=False)
        time.sleep(0.2)
    yield url, process, log
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def _chat(url: str, timeout: float = 120, **fields):
    body = {"model": "fast", "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _plain_is_served(url: str, process) -> None:
    assert process.poll() is None, "the server died"
    answer = _chat(url, max_tokens=4, messages=[{"role": "user", "content": "hola"}])
    assert answer.status_code == 200, answer.text


def _tool(parameters) -> list:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


#: The reported crashes and the DoS pattern: (fields of the request, the keyword named).
REPORTED = [
    ({"response_format": _schema_format({"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 20000}}, "required": ["s"]})}, "maxLength"),
    ({"response_format": _schema_format({"type": "string", "pattern": "^a{1,100000}$"})},
     "pattern"),
    ({"tools": _tool({"type": "object", "properties": {"xs": {
        "type": "array", "items": {"type": "integer"}, "maxItems": 100000}}}),
      "tool_choice": "required"}, "maxItems"),
    ({"response_format": _schema_format({"type": "string",
                                         "pattern": "^(a?){120}a{120}$"})}, "pattern"),
    ({"response_format": _schema_format({"type": "string",
                                         "pattern": "^(a?){240}a{240}$"})}, "pattern"),
]


@pytest.mark.models
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["auto", "fast"])
def test_the_reported_schemas_get_a_400_naming_the_keyword(server, model, stream):
    url, process, _log = server
    for fields, keyword in REPORTED:
        started = time.monotonic()
        answer = _chat(url, model=model, stream=stream, **fields)
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()["error"]
        assert error["code"] == "invalid_value"
        assert f"{keyword} at #/" in error["message"], error
        assert time.monotonic() - started < 10
        assert process.poll() is None
    _plain_is_served(url, process)


@pytest.mark.models
def test_a_refused_grammar_does_not_flood_the_log(server):
    url, process, log = server
    before = log.stat().st_size
    body = _schema_format({"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 15000}}, "required": ["s"]})
    assert _chat(url, response_format=body).status_code == 400
    assert log.stat().st_size - before < 4000  # llama.cpp's own dump was about 120 KB


@pytest.mark.models
def test_refs_to_defs_are_answered(server):
    url, process, _log = server
    schema = {"$defs": {"word": {"type": "string", "maxLength": 8},
                        "pair": {"type": "object", "properties": {"a": {"$ref": "#/$defs/word"}},
                                 "required": ["a"]}},
              "$ref": "#/$defs/pair"}
    answer = _chat(url, response_format=_schema_format(schema), max_tokens=32)
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert content.lstrip().startswith("{")


@pytest.mark.models
def test_a_constrained_answer_past_its_time_bound_ends_with_length_and_frees_the_model(server):
    url, process, _log = server
    for fields in ({"response_format": _schema_format({"type": "object", "properties": {
            "s": {"type": "string"}}, "required": ["s"]})},
                   {"tools": _tool({"type": "object", "properties": {"q": {"type": "string"}},
                                    "required": ["q"]}), "tool_choice": "required"}):
        answer = _chat(url, model="bounded", **fields)
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["choices"][0]["finish_reason"] == "length", data
        assert data["sarai"]["stopped_by"] == "time_limit", data
        assert data["usage"]["completion_tokens"] <= 2
    streamed = _chat(url, model="bounded", stream=True, response_format=_schema_format(
        {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}))
    assert streamed.status_code == 200, streamed.text
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
            and c["choices"][0].get("finish_reason")] == ["length"]
    assert any(c.get("sarai", {}).get("stopped_by") == "time_limit" for c in chunks), chunks
    assert streamed.text.rstrip().endswith("data: [DONE]")
    answer = _chat(url, model="bounded", max_tokens=4)  # unconstrained: no grammar to wait on
    assert answer.status_code == 200, answer.text
    _plain_is_served(url, process)


@pytest.mark.models
def test_a_plain_request_is_not_held_behind_the_worst_grammar_request(server):
    """The worst grammar the limits let through (the most ambiguity allowed) runs, with
    max_tokens 128; a plain request sent meanwhile must be answered within 30 s."""
    url, process, _log = server
    worst = _schema_format({"type": "string",
                            "pattern": f"^(a?){{{MAX_AMBIGUITY}}}a{{{MAX_AMBIGUITY}}}$"})
    result = {}

    def heavy():
        result["heavy"] = _chat(url, response_format=worst, max_tokens=128, timeout=300)

    worker = threading.Thread(target=heavy)
    worker.start()
    time.sleep(1.0)
    started = time.monotonic()
    plain = _chat(url, max_tokens=8, messages=[{"role": "user", "content": "hola"}],
                  timeout=120)
    waited = time.monotonic() - started
    worker.join(300)
    assert plain.status_code == 200, plain.text
    assert waited < 30, f"the plain request waited {waited:.1f} s"
    assert result["heavy"].status_code == 200, result["heavy"].text
    print(f"\nplain request answered in {waited:.1f} s behind the worst allowed grammar")


# -- fuzz: schemas and patterns -------------------------------------------------------------

# Large bounds are drawn often: they are where llama.cpp broke (nesting past ~18,600 levels
# overflowed its parser's stack), and a lower bound stays small so the nesting is kept.
_BOUNDS = st.sampled_from([1, 2, 7, 64, 1000, 1001, 20000, 100000])
_LOW = st.sampled_from([0, 1, 3])
_ATOMS = st.sampled_from(["a", "b", ".", r"\d", r"\w", "[a-z]", "[^x]", "(a|b)", "(ab|a)",
                          r"\\", "x"])
_QUANTIFIERS = st.one_of(
    st.sampled_from(["", "?", "*", "+"]),
    st.builds(lambda n: f"{{{n}}}", _BOUNDS),
    st.builds(lambda m, n: f"{{{m},{max(m, n)}}}", _LOW, _BOUNDS),
    st.builds(lambda n: f"{{{n},}}", _BOUNDS))


@st.composite
def patterns(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        atom = draw(_ATOMS)
        if draw(st.booleans()):
            inner = "".join(draw(_ATOMS) + draw(_QUANTIFIERS)
                            for _ in range(draw(st.integers(1, 3))))
            atom = f"({inner})"
        parts.append(atom + draw(_QUANTIFIERS))
    return "^" + "".join(parts) + "$"


_LEAVES = st.one_of(
    st.builds(lambda n, m: {"type": "string", "maxLength": n, "minLength": min(m, n)},
              _BOUNDS, _LOW),
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns()),
    st.just({"type": "integer", "minimum": -5, "maximum": 10 ** 6}),
    st.just({"type": "number"}), st.just({"type": "boolean"}), st.just({"enum": ["a", 1, None]}),
    st.just({"$ref": "#/$defs/word"}),
    # junk where a schema is expected: a clean 400, never a 500
    st.sampled_from([{"$ref": 5}, {"type": ["string", 7]}, {"pattern": 5}, {"enum": 5},
                     {"type": "object", "properties": {"a": {}}, "required": [{"x": 1}]},
                     {"maxLength": 10 ** 30}, {"pattern": "^(a"}, {"pattern": "[z-a]"}]))


def _extend(children):
    return st.one_of(
        st.builds(lambda items, n, m: {"type": "array", "items": items, "maxItems": n,
                                       "minItems": m}, children, _BOUNDS, _LOW),
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": sorted(props)[:req]},
                  st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), children,
                                  min_size=1, max_size=4), st.integers(0, 4)),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(children, min_size=1, max_size=3)))


SCHEMAS = st.builds(lambda body: {"$defs": {"word": {"type": "string", "maxLength": 6}},
                                  **body}, st.recursive(_LEAVES, _extend, max_leaves=6))


@pytest.mark.models
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(schema=SCHEMAS, as_tool=st.booleans())
def test_fuzzed_schemas_get_200_or_a_clean_4xx_and_the_server_lives(server, schema, as_tool):
    url, process, _log = server
    if as_tool:
        fields = {"tools": _tool({"type": "object", "properties": {"v": schema},
                                  "required": ["v"]}), "tool_choice": "required"}
    else:
        fields = {"response_format": _schema_format(schema)}
    started = time.monotonic()
    answer = _chat(url, max_tokens=8, timeout=60, **fields)
    assert answer.status_code == 200 or 400 <= answer.status_code < 500, \
        (answer.status_code, answer.text[:300], json.dumps(schema)[:300])
    if answer.status_code != 200:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in error["message"]
    assert time.monotonic() - started < 30, json.dumps(schema)[:300]
    assert process.poll() is None, json.dumps(schema)[:300]


@pytest.mark.models
def test_after_the_fuzz_a_plain_request_is_served(server):
    url, process, _log = server
    _plain_is_served(url, process)
