"""The pool's load queue on the real models: with room for one model, requests alternating
between two are grouped by model (one load serves a model's whole queue), a fairness limit
bounds how long grouping makes a request wait, and ``queue_order = "fifo"`` keeps arrival
order. Loads and generations are real (llama-cpp-python)."""

from __future__ import annotations

import threading
import time

import pytest

from sarai_router.backend import GenerationParams
from sarai_router.loading import load_config
from sarai_router.engine import Engine
from sarai_router.types import ChatRequest

pytestmark = pytest.mark.models

def two_models(write_config, **cache: str):
    """fast and quality, neither pinned, with room for one of them."""
    lines = "\n".join(f"{key} = {value}" for key, value in
                      {"max_loaded": "1", "ttl_seconds": "600", **cache}.items())
    path = write_config(cache=lines, fast="pinned = false")
    engine = Engine(load_config(path))
    engine.events = []  # type: ignore[attr-defined]
    engine.hooks.subscribe(engine.events.append, "test")  # type: ignore[attr-defined]
    return engine


def burst(engine: Engine, models: list[str]) -> list[tuple[str, float, float]]:
    """One request per entry of ``models``, sent in that order a moment apart, all at
    once; ``(model, waited until its generation started, finished)`` for each, in order."""
    results: list = [None] * len(models)
    started = time.perf_counter()

    def one(index: int, model: str) -> None:
        sent = time.perf_counter()
        request = ChatRequest.from_prompt(f"Say a word ({index}).")
        decision = engine.prepare(request, model=model, prewarm=False)
        completion = engine.stream(request, decision, GenerationParams(max_tokens=8))
        first = None
        for _ in completion:
            if first is None:
                first = time.perf_counter() - sent
        results[index] = (model, first, time.perf_counter() - started)

    threads = []
    for index, model in enumerate(models):
        thread = threading.Thread(target=one, args=(index, model))
        thread.start()
        threads.append(thread)
        # The next one is sent once this one is in the pool's queue: arrival order is
        # the order of ``models`` however slow the machine.
        deadline = time.monotonic() + 60
        while engine.pool.load_queue.issued <= index and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=600)
    assert all(r is not None for r in results), "a request did not finish"
    return results


def loads(engine: Engine) -> list[str]:
    return [event.model for event in engine.events if event.kind == "model_loaded"]


ALTERNATING = ["fast", "quality"] * 6


def test_grouped_twelve_alternating_requests_need_two_loads(write_config):
    engine = two_models(write_config)
    try:
        results = burst(engine, ALTERNATING)
    finally:
        engine.close()
    assert loads(engine) == ["fast", "quality"]
    # Every fast request answered before the first quality one started: they were grouped.
    last_fast = max(done for model, _, done in results if model == "fast")
    first_quality = min(done for model, _, done in results if model == "quality")
    assert last_fast < first_quality
    queue = engine.pool.load_queue
    assert queue.overtakes > 0
    assert 0 < queue.longest_overtaken <= queue.max_wait  # nobody past the fairness limit


def test_fifo_takes_turns(write_config):
    engine = two_models(write_config, queue_order='"fifo"')
    try:
        burst(engine, ALTERNATING[:4])
    finally:
        engine.close()
    assert loads(engine) == ALTERNATING[:4]  # arrival order: a load per request
    assert engine.pool.load_queue.overtakes == 0


def test_the_fairness_limit_stops_grouping(write_config):
    # A limit of 0: a waiting request is overtaken by nobody, as in fifo.
    engine = two_models(write_config, max_queue_wait_seconds="0")
    try:
        burst(engine, ALTERNATING[:4])
    finally:
        engine.close()
    assert loads(engine) == ALTERNATING[:4]


def test_models_resident_together_are_unaffected(write_config):
    engine = two_models(write_config, max_loaded="2")
    try:
        burst(engine, ALTERNATING[:6])
    finally:
        engine.close()
    assert sorted(loads(engine)) == ["fast", "quality"]
    assert engine.pool.load_queue.overtakes == 0  # nobody ever waited for room


def test_config_check_names_a_bad_queue_order(write_config):
    from click.testing import CliRunner

    from sarai_router.cli import cli

    path = write_config(cache='queue_order = "lifo"\nmax_queue_wait_seconds = -1')
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code != 0
    assert "cache.queue_order: must be one of 'grouped', 'fifo', got 'lifo'" in result.output
    assert "cache.max_queue_wait_seconds: must be >= 0" in result.output
