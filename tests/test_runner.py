"""The bridge that lets a sync caller compute a blocking model's tokens on its own thread
(runner.OnCaller), on its own and under Engine.stream with the kit's echo backend."""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import signal
import subprocess
import threading
import time

import pytest

from sarai_router import runner
from sarai_router.backend import GenerationParams
from sarai_router.engine import Completion, Engine
from sarai_router.streaming import Done, Generation
from sarai_router.testing import config_from_toml
from sarai_router.types import ChatRequest

from conftest import ctrl_c_as_at_a_terminal

END = object()


def start(make, take=lambda item: item, after=None):
    """Start a coroutine on the shared loop that hands ``make``'s iteration to this
    thread; return its future and the OnCaller it handed over."""
    owner = object()
    lent: queue.SimpleQueue = queue.SimpleQueue()

    async def work():
        hand = runner.lent_thread(owner)
        assert hand is not None and runner.lent_thread(object()) is None
        try:
            await runner.OnCaller(make, take, end=END).run(hand)
        finally:
            if after is not None:
                after.append("coroutine went on")
        return "went on"

    with runner.lending(owner, lent.put):
        future = runner.submit(work())
    return future, lent.get(timeout=10)


def test_the_caller_computes_the_items_on_its_own_thread():
    threads = []

    def make():
        for item in range(4):
            threads.append(threading.get_ident())
            yield item

    future, on_caller = start(make, take=lambda item: END if item == 3 else
                              None if item == 1 else item * 10)
    assert list(on_caller.items()) == [0, 20]  # 1 passed over, 3 ended it
    assert future.result(timeout=10) == "went on"
    assert threads == [threading.get_ident()] * 4


def test_an_error_of_the_iteration_is_raised_on_the_coroutine_not_the_caller():
    def make():
        yield 1
        raise ValueError("the model broke")

    future, on_caller = start(make)
    assert list(on_caller.items()) == [1]
    with pytest.raises(ValueError, match="the model broke"):
        future.result(timeout=10)


def iterating_without_end():
    """A coroutine whose endless iteration this thread has begun: ``(order, future,
    on_caller, items)``; ``order`` notes the iteration's close and the coroutine's end."""
    order: list[str] = []

    def make():
        try:
            yield from itertools.count()
        finally:
            order.append("iteration closed")

    future, on_caller = start(make, after=order)
    items = on_caller.items()
    assert next(items) == 0
    return order, future, on_caller, items


def test_a_caller_that_stops_closes_the_iteration_before_the_coroutine_goes_on():
    order, future, _, items = iterating_without_end()
    items.close()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=10)
    assert order == ["iteration closed", "coroutine went on"]


def test_a_coroutine_cancelled_meanwhile_waits_for_the_caller_to_stop():
    order, future, on_caller, items = iterating_without_end()
    future.cancel()
    deadline = time.monotonic() + 10
    while not on_caller.stop:  # the loop has cancelled the coroutine
        assert time.monotonic() < deadline, "the coroutine was never cancelled"
        time.sleep(0.01)
    time.sleep(0.05)
    assert order == []  # it waits: the caller still iterates
    assert list(items) == []  # stopped at the next item
    deadline = time.monotonic() + 10
    while len(order) < 2:
        assert time.monotonic() < deadline, "the coroutine never went on"
        time.sleep(0.01)
    assert order == ["iteration closed", "coroutine went on"]


def test_a_coroutine_cancelled_before_the_caller_took_it_up_does_not_wait_for_it():
    """Ctrl-C can stop the caller between the hand-over and its first item: the
    coroutine must not wait for an iteration that will never run."""
    began = []

    def make():
        began.append(True)
        yield 1

    order: list[str] = []
    future, on_caller = start(make, after=order)
    future.cancel()
    deadline = time.monotonic() + 10
    while order != ["coroutine went on"]:
        assert time.monotonic() < deadline, "the coroutine waits for a caller that left"
        time.sleep(0.01)
    assert list(on_caller.items()) == [] and began == []


ECHO = """
[routing]
default_model = "fast"

[plugins.heuristic]
conversation_model = "fast"
multimodal_model = "fast"

[models.fast]
backend = "echo"
max_tokens = 50
delay_seconds = 0.02  # each token takes a while: a thread computing them is seen
"""

PROMPT = ChatRequest.from_prompt("one two three four five six")


def generation_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sarai-gen-")]


def test_engine_stream_computes_a_blocking_models_tokens_on_the_callers_thread():
    engine = Engine(config_from_toml(ECHO))
    try:
        decision = engine.prepare(PROMPT, prewarm=False)
        completion = Completion(decision=decision)
        pieces = []
        for piece in engine.stream(PROMPT, decision, GenerationParams(), completion):
            pieces.append(piece)
            assert generation_threads() == []  # no thread of its own computes them
        assert "".join(pieces) == completion.text == "one two three four five six"
        assert completion.usage.completion_tokens == 6 and completion.finish_reason == "stop"

        # A server-style generation (nobody lends a thread) still gets a thread of its own.
        events: queue.SimpleQueue = queue.SimpleQueue()
        seen = []
        generation = Generation(engine, PROMPT, decision, GenerationParams(),
                                lambda event: (seen.append(generation_threads()),
                                               events.put(event)))
        generation.start()
        while not isinstance(events.get(timeout=10), Done):
            pass
        generation.join(10)
        assert any(names == ["sarai-gen-fast"] for names in seen)
    finally:
        engine.close()


def test_closing_engine_stream_early_frees_the_slot_for_the_next_request():
    engine = Engine(config_from_toml(ECHO))
    try:
        decision = engine.prepare(PROMPT, prewarm=False)
        stream = engine.stream(PROMPT, decision, GenerationParams())
        assert next(stream) == "one "
        stream.close()
        assert engine.pool.residents()[0]["active"] == 0
        again = Completion(decision=decision)
        for _ in engine.stream(PROMPT, decision, GenerationParams(max_tokens=2), again):
            pass
        assert again.text == "one two " and again.finish_reason == "length"
    finally:
        engine.close()


ECHO_PLUGIN = '''
from sarai_router.hookspecs import hookimpl
from sarai_router.testing.echo import EchoBackend


@hookimpl
def register_backends(register):
    register("echo", EchoBackend())
'''


def test_ctrl_c_in_query_while_this_thread_computes_the_tokens(tmp_path):
    """``query``'s own thread computes a blocking model's tokens: Ctrl-C there stops the
    answer cleanly (the model's iteration closed, the slot let go) and exits 130."""
    from sarai_router.testing import SARAI_ROUTER

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "echo_here.py").write_text(ECHO_PLUGIN, encoding="utf-8")
    config = tmp_path / "sarai.toml"
    config.write_text(ECHO.replace("delay_seconds = 0.02", "delay_seconds = 0.5")
                      + f'\n[plugins]\ndirs = ["{plugins}"]\n', encoding="utf-8")
    process = subprocess.Popen(
        [SARAI_ROUTER, "--config", str(config), "query", " ".join(["word"] * 40)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_as_at_a_terminal)
    try:
        assert process.stdout.read(5) == b"word "  # answering, on the main thread
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    assert out.count(b"word") < 10  # stopped mid-answer, not after it
