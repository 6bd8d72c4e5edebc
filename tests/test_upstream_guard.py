"""The ``openai`` backend (and so ``llama_server``, which uses it) against upstreams that
misbehave: garbage, an oversized line, a web page, a cut stream, tokens past
``max_tokens``, a stream that never ends, a key echoed back.

The upstream is ``bad_upstream.BadUpstream``: a real HTTP server on 127.0.0.1 forced to
misbehave (a test double, clearly one). Each case must end in a clear error or a bounded
answer, through the sync path (the CLI's) and the async one (the server's); the server
side of the same cases is in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bad_upstream import PROBE_KEY, TRICKLE_SECONDS, BadUpstream, key_fragments
from conftest import UPSTREAM_KEY_ENV
from sarai_router.backend import GenerationParams
from sarai_router.loading import load_config
from sarai_router.default_plugins.openai import MAX_SSE_LINE_BYTES, Redactor, _upstream_message
from sarai_router.engine import Completion, Engine
from sarai_router.errors import BackendError, UpstreamError, UpstreamUnavailable
from sarai_router.types import ChatRequest

BEFORE_FIRST_TOKEN = ("garbage", "longline", "html", "notjson", "empty", "cutearly")


@pytest.fixture(scope="module")
def upstream():
    server = BadUpstream()
    yield server
    server.close()


def _toml(models_dir, upstream: BadUpstream) -> str:
    models = "".join(f"""
[models.{name}]
backend = "openai"
base_url = "{upstream.base_url(name)}"
api_key_env = "{UPSTREAM_KEY_ENV}"
max_tokens = 8
timeout_seconds = 5
total_timeout_seconds = 2
""" for name in ("garbage", "longline", "html", "notjson", "empty", "cutearly", "cut",
                 "trickle", "keepalive", "silent", "echo300", "echo1000", "midecho", "fine",
                 "hangup", "kept"))
    return f"""\
[paths]
models_dir = "{models_dir.as_posix()}"

[routing]
default_model = "fine"

[plugins.heuristic]
conversation_model = "fine"
multimodal_model = "fine"

[models.saved]
backend = "openai"
base_url = "{upstream.base_url("garbage")}"
fallbacks = ["fine"]
{models}"""


@pytest.fixture
def engine(tmp_path, models_dir, upstream, monkeypatch):
    monkeypatch.setenv(UPSTREAM_KEY_ENV, PROBE_KEY)
    path = tmp_path / "bad.toml"
    path.write_text(_toml(models_dir, upstream), encoding="utf-8")
    engine = Engine(load_config(path))
    yield engine
    engine.close()


def run_sync(engine: Engine, model: str, max_tokens: int = 8) -> Completion:
    request = ChatRequest.from_prompt("hola")
    decision = engine.prepare(request, model=model, prewarm=False)
    completion = Completion(decision=decision)
    for _ in engine.stream(request, decision, GenerationParams(max_tokens=max_tokens),
                           completion):
        pass
    return completion


def run_async(engine: Engine, model: str, max_tokens: int = 8) -> Completion:
    request = ChatRequest.from_prompt("hola")
    decision = engine.prepare(request, model=model, prewarm=False)
    completion = Completion(decision=decision)

    async def go():
        async for _ in engine.astream(request, decision,
                                      GenerationParams(max_tokens=max_tokens), completion):
            pass

    asyncio.run(go())
    return completion


RUNNERS = {"sync": run_sync, "async": run_async}


@pytest.mark.parametrize("path", RUNNERS)
def test_a_connection_closed_unanswered_is_sent_once_more(engine, upstream, path):
    """An upstream that closes a connection without a byte of answer (llama-server does so
    to a kept-alive one) never saw the request: it goes once more, and is answered."""
    before = upstream.requests.get("hangup", 0)
    completion = RUNNERS[path](engine, "hangup")
    assert completion.text == "Hola" and completion.finish_reason == "stop"
    assert upstream.requests["hangup"] - before == 2


def test_answers_in_turn_share_one_kept_alive_connection(engine, upstream):
    """A complete answer's connection serves the next request (one client per event loop;
    the sync path's requests run on one shared loop, as the server's do on its own)."""
    before = upstream.connections.get("kept", 0)
    completions = [run_sync(engine, "kept") for _ in range(2)]
    assert [c.text for c in completions] == ["Hola", "Hola"]
    assert upstream.requests["kept"] >= 2 and upstream.connections["kept"] - before == 1


@pytest.mark.parametrize("path", RUNNERS)
@pytest.mark.parametrize("model", BEFORE_FIRST_TOKEN)
def test_a_bad_stream_before_the_first_token_is_a_502_never_an_empty_answer(engine, model,
                                                                            path):
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as caught:
        RUNNERS[path](engine, model)
    assert caught.value.status == 502 and caught.value.reason == "invalid_stream"
    assert f"model {model!r}" in str(caught.value)
    assert time.monotonic() - started < 5  # a 20 MB line is refused at 1 MiB, not read whole
    # The model's next request is served normally (the endpoint cools down; the fine one
    # is not touched by it).
    assert run_sync(engine, "fine").text == "Hola"


def test_the_oversized_line_is_named(engine):
    with pytest.raises(UpstreamUnavailable) as caught:
        run_async(engine, "longline")
    assert f"longer than {MAX_SSE_LINE_BYTES} bytes" in str(caught.value)


@pytest.mark.parametrize("path", RUNNERS)
def test_a_garbage_upstream_lets_the_fallback_answer(engine, path):
    completion = RUNNERS[path](engine, "saved")
    assert completion.text == "Hola" and completion.decision.model == "fine"
    step = completion.decision.fallbacks[0]
    assert (step.from_model, step.reason) == ("saved", "invalid_stream")


@pytest.mark.parametrize("path", RUNNERS)
def test_a_stream_cut_after_the_first_token_is_an_error_not_a_complete_answer(engine, path):
    with pytest.raises(BackendError) as caught:
        RUNNERS[path](engine, "cut")
    assert not isinstance(caught.value, UpstreamUnavailable)  # too late for a fallback
    assert "stopped after 1 pieces" in str(caught.value)
    assert "without a finish reason or [DONE]" in str(caught.value)


@pytest.mark.parametrize("path", RUNNERS)
def test_max_tokens_is_enforced_against_an_upstream_that_ignores_it(engine, upstream, path):
    closed = upstream.closed.get("trickle", 0)
    started = time.monotonic()
    completion = RUNNERS[path](engine, "trickle", max_tokens=3)
    elapsed = time.monotonic() - started
    assert completion.pieces == [" tok"] * 3
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    # Ended at the 4th token (the first one past max_tokens), not at a timeout.
    assert elapsed < 4 * TRICKLE_SECONDS + 1.5
    deadline = time.monotonic() + 3
    while upstream.closed.get("trickle", 0) == closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.closed.get("trickle", 0) > closed, "the upstream connection stays open"


# The sync path is the async one run on the shared loop: a silent upstream is cut at the
# total time on both (a blocking read once ended only at timeout_seconds).
@pytest.mark.parametrize("model,path", [("keepalive", "sync"), ("keepalive", "async"),
                                        ("silent", "sync"), ("silent", "async")])
def test_the_total_time_is_bounded_whatever_the_upstream_sends(engine, model, path):
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        RUNNERS[path](engine, model)
    elapsed = time.monotonic() - started
    assert "total_timeout_seconds = 2" in str(caught.value)
    assert 2 <= elapsed < 3.5, elapsed


@pytest.mark.parametrize("path", RUNNERS)
@pytest.mark.parametrize("model,error", [("echo300", UpstreamUnavailable),
                                         ("echo1000", UpstreamError),
                                         ("midecho", BackendError)])
def test_no_part_of_a_key_straddling_a_cut_reaches_the_error(engine, model, error, path):
    with pytest.raises(error) as caught:
        RUNNERS[path](engine, model)
    message = str(caught.value)
    assert "[redacted]" in message or "[reda" in message, message[-200:]
    assert not key_fragments(message, PROBE_KEY), message


@pytest.mark.parametrize("cut", [300, 1000])
@pytest.mark.parametrize("offset", range(-12, 3))
def test_redaction_comes_before_every_cut(cut, offset):
    """Every position of the key across each cut, the text and the JSON forms."""
    key = "sk-probe-0123456789abcdef"
    text = "x" * (cut + offset) + key + " tail"
    redact = Redactor([key])
    for raw in (text.encode(), ('{"error": {"message": "%s"}}' % text).encode()):
        message = _upstream_message(raw, redact)
        assert not key_fragments(message, key, shortest=4), (cut, offset, message[-40:])


def test_sse_lines_survive_any_split_and_refuse_what_is_not_text():
    from sarai_router.default_plugins.openai import _BadStream, _SSELines

    stream = "data: á\r\n\r\n: ping\ndata: [DONE]\n\n".encode()
    for size in (1, 2, 3, 7, len(stream)):
        lines = _SSELines()
        got = [line for start in range(0, len(stream), size)
               for line in lines.feed(stream[start:start + size])] + lines.end()
        assert got == ["data: á", "", ": ping", "data: [DONE]", ""], size
    with pytest.raises(_BadStream, match="not UTF-8"):
        _SSELines().feed(b"data: \xff\n")
    lines = _SSELines()
    with pytest.raises(_BadStream, match="longer than"):
        for _ in range(MAX_SSE_LINE_BYTES // 4096 + 1):
            lines.feed(b"a" * 4096)
