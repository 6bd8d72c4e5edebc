"""The live lifecycle in one process, on the real models: the reaper, the bounded queue,
pre-warm, verified unload and RSS accounting.

The only test double is ``LeakyBackend``, a fault-injection backend whose ``close()``
keeps its memory, to show that an unload that frees nothing is caught.
"""

from __future__ import annotations

import threading
import time

import pytest

from sarai_router.backend import Delta, GenerationParams, Usage
from sarai_router.default_plugins import prewarm as prewarm_plugin
from sarai_router.engine import Engine
from sarai_router.hookspecs import hookimpl
from sarai_router.serving.metrics import Metrics
from sarai_router.plugins import build_plugins
from sarai_router.memory import process_rss_mb
from sarai_router.pool import QueueFull
from sarai_router.types import ChatRequest

TINY = GenerationParams(max_tokens=2, temperature=0)


@pytest.fixture
def make_engine():
    engines: list[Engine] = []

    def make(config, *plugins) -> Engine:
        plugin_set = build_plugins(config, extra=[(type(p).__name__, p) for p in plugins])
        engine = Engine(config, plugin_set)
        engine.events = []
        engine.hooks.subscribe(engine.events.append, "test")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def kinds(engine: Engine, model: str | None = None) -> list[str]:
    """What happened to ``model`` (every model: None); an unload with its reason
    (``model_unloaded:expire``); load starts and routing left out."""
    return [f"{e.kind}:{e.data['reason']}" if e.kind == "model_unloaded" else e.kind
            for e in engine.events if (model is None or e.model == model)
            and e.kind not in ("model_loading", "routed", "queued", "generation_finished")]


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    """Poll until ``predicate()`` holds; the deadline is a backstop for a busy machine (the
    per-test timeout is the other), not a measure of how long it should take."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.models
def test_reaper_unloads_an_idle_model_by_ttl_without_any_request(make_engine, make_config):
    config = make_config(cache="ttl_seconds = 60\nmax_loaded = 2\nreap_interval_seconds = 0.1",
                         quality="ttl_seconds = 0.5")
    engine = make_engine(config)
    engine.pool.load_pinned()
    engine.pool.start_reaper()
    engine.complete(ChatRequest.from_prompt("hi"), TINY, model="quality")
    # No "still loaded" check here: on a busy machine the 0.5 s TTL may pass before it.
    wait_for(lambda: "model_unloaded:expire" in kinds(engine, "quality"), "the reaper")
    assert kinds(engine, "quality") == ["model_loaded", "generation_started", "model_unloaded:expire"]
    assert not engine.pool.is_loaded("quality")
    assert engine.pool.is_loaded("fast"), "pinned models never expire"


@pytest.mark.models
def test_a_model_in_use_or_waited_for_is_never_unloaded(make_engine, make_config):
    engine = make_engine(make_config(quality="ttl_seconds = 0"))
    pool = engine.pool

    def wait_then_use():
        with pool.use("quality"):
            pass

    with pool.use("quality"):
        waiter = threading.Thread(target=wait_then_use)
        waiter.start()
        wait_for(lambda: pool.residents()[0]["queued"] == 2, "the waiter to queue")
        assert pool.reap(now=time.monotonic() + 3600) == []
        assert pool.unload("quality") is False
    waiter.join()
    assert pool.reap(now=time.monotonic() + 3600) == ["quality"]


@pytest.mark.models
def test_full_queue_raises_queue_full_at_once(make_engine, make_config):
    engine = make_engine(make_config())
    pool = engine.pool
    results: list[str] = []

    def wait_in_queue():
        with pool.use("fast", queue_limit=1):
            results.append("served")

    with pool.use("fast", queue_limit=1):
        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        wait_for(lambda: pool.residents()[0]["queued"] == 2, "the waiter to queue")
        # The holder never lets go inside this block: a refusal that waited would never
        # come, and the per-test timeout would fail the test.
        with pytest.raises(QueueFull) as info:
            with pool.use("fast", queue_limit=1):
                pass
        assert "queue_size" in str(info.value)
        with pytest.raises(QueueFull):  # queue_size = 0: nobody may wait
            with pool.use("fast", queue_limit=0):
                pass
        assert results == [], "the waiter is still queued behind the holder"
    waiter.join()
    assert results == ["served"]
    assert pool.residents()[0]["queued"] == 0
    assert kinds(engine).count("queue_full") == 2


@pytest.mark.models
def test_unload_frees_about_the_models_size(make_engine, make_config):
    engine = make_engine(make_config())
    before = process_rss_mb()
    resident = engine.pool.ensure_loaded("quality")
    loaded = process_rss_mb()
    assert resident.measured_mb and resident.measured_mb > 100
    # RSS accounting: the budget uses the larger of the estimate and what was measured.
    assert resident.ram_mb == max(resident.estimated_mb, resident.measured_mb)
    assert engine.pool.unload("quality")
    after = process_rss_mb()
    assert loaded - after >= 0.5 * resident.measured_mb, (before, loaded, after)
    assert "unload_unverified" not in kinds(engine)


class LeakyBackend:
    """Fault-injection double: loads by touching MB of memory, and ``close()`` keeps it."""

    modalities = ("text",)
    MB = 150
    kept: list[bytearray] = []

    def load(self, spec):
        memory = bytearray(self.MB * 1024 * 1024)
        memory[::4096] = b"x" * len(memory[::4096])  # touch every page: it counts in RSS
        backend = self

        class Model:
            def chat(self, messages, params, *, images=(), audio=None):
                yield Delta("ok")
                yield Delta("", finish_reason="stop", usage=Usage(1, 1))

            def close(self):
                backend.kept.append(memory)  # the leak

        return Model()

    @hookimpl
    def register_backends(self, register):
        register("leaky", self)


def test_unverified_unload_is_logged_and_counted(make_engine, make_config, tmp_path, caplog):
    fake = tmp_path / "leaky.bin"
    fake.write_bytes(b"\0")
    config = make_config(f'[models.leaky]\npath = "{fake.as_posix()}"\nbackend = "leaky"\n')
    leaky = LeakyBackend()
    engine = make_engine(config, leaky)
    metrics = Metrics(engine.pool, engine.hooks)
    try:
        resident = engine.pool.ensure_loaded("leaky")
        # No GGUF header to estimate from: the measured growth is what the budget uses.
        assert resident.estimated_mb == 0
        assert resident.ram_mb == resident.measured_mb >= 0.8 * LeakyBackend.MB
        with caplog.at_level("WARNING", logger="sarai_router.pool"):
            assert engine.pool.unload("leaky")
        assert "unload_unverified" in kinds(engine, "leaky")
        assert "freed only" in caplog.text
        assert b'sarai_unload_unverified_total{model="leaky"} 1.0' in metrics.render()
    finally:
        LeakyBackend.kept.clear()


# -- pre-warm ------------------------------------------------------------------------------


@pytest.mark.models
def test_prewarm_used(make_engine, make_config):
    engine = make_engine(make_config())
    metrics = Metrics(engine.pool, engine.hooks)
    thread = engine.pool.prewarm("quality", reason="test")
    assert thread is not None
    assert engine.pool.residents()[-1]["state"] in ("loading", "loaded"), "reserved at once"
    thread.join()
    assert engine.pool.is_loaded("quality")
    assert engine.pool.prewarm("quality") is None, "resident: nothing to do"
    completion = engine.complete(ChatRequest.from_prompt("hi"), TINY, model="quality")
    assert completion.timings.load_s == 0, "the request found the model loaded"
    assert kinds(engine, "quality") == ["model_loaded", "prewarm_started", "prewarm_used", "generation_started"]
    text = metrics.render().decode()
    assert 'sarai_prewarms_total{model="quality",outcome="used"} 1.0' in text


@pytest.mark.models
def test_prewarm_wasted_when_unloaded_unused(make_engine, make_config):
    engine = make_engine(make_config())
    engine.pool.prewarm("quality").join()
    assert engine.pool.unload("quality")
    assert kinds(engine, "quality") == ["model_loaded", "prewarm_started", "model_unloaded:unload", "prewarm_wasted"]


@pytest.mark.models
def test_prewarm_never_evicts(make_engine, make_config):
    # One slot, held by an idle, unpinned model: exactly what a request's load would evict.
    engine = make_engine(make_config(cache="ttl_seconds = 60\nmax_loaded = 1",
                                     fast="pinned = false"))
    engine.complete(ChatRequest.from_prompt("hi"), TINY, model="fast")
    [fast] = engine.pool.residents()
    assert (fast["name"], fast["state"], fast["pinned"], fast["users"]) == ("fast", "loaded",
                                                                            False, 0)
    assert engine.pool.prewarm("quality") is None
    assert engine.pool.is_loaded("fast") and not engine.pool.is_loaded("quality")
    assert kinds(engine, "quality") == ["prewarm_skipped"]
    assert "model_evicted" not in kinds(engine)
    # The same load asked for by a request does evict it: the pre-warm held back by rule.
    engine.complete(ChatRequest.from_prompt("hi"), TINY, model="quality")
    assert kinds(engine, "fast")[-1] == "model_evicted" and engine.pool.is_loaded("quality")


def test_default_prewarm_plugin_rules(make_config):
    config = make_config()
    models = config.models

    def wants(text, model, loaded=frozenset({"fast"})):
        from sarai_router.router import Router

        decision = Router(config).route(ChatRequest.from_prompt(text), model=model)
        return prewarm_plugin.prewarm_models(signals=decision.signals, decision=decision,
                                             loaded=loaded, models=models, config=config)

    assert wants("¡Muchas gracias, estoy feliz! Mira mi foto", None) == ["quality"]
    assert wants("x " * 150, "fast") == ["quality"], "long input"
    assert wants("Hola", "fast") is None
    assert wants("Mira mi foto", "quality") is None, "already the answering model"
    assert wants("Mira mi foto", "fast", frozenset({"fast", "quality"})) is None


@pytest.mark.models
def test_hook_prewarm_models(make_engine, make_config):
    seen = {}

    class Morning:
        @hookimpl
        def prewarm_models(self, request, decision, loaded):
            seen.update(text=request.text, model=decision.model, loaded=set(loaded))
            return ["quality", "nope"] if "buenos días" in request.text.lower() else None

    engine = make_engine(make_config(), Morning())
    engine.pool.load_pinned()
    request = ChatRequest.from_prompt("Buenos días")
    decision = engine.route(request)
    started = engine.prewarm_for(request, decision)
    assert started == ["quality"]
    assert seen == {"text": "Buenos días", "model": "fast", "loaded": {"fast"}}
    assert any("'nope'" in e and "not configured" in e for e in engine.hooks.errors)
    wait_for(lambda: engine.pool.is_loaded("quality"), "the pre-warm")
    assert engine.prewarm_for(request, decision) == [], "resident: not again"
