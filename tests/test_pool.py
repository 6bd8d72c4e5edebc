"""The model pool on the real GGUF models: pinning, lazy loads, TTL, LRU, budgets, in-use safety.

A fake clock drives idle times (``reap(now=...)`` and the pool's ``clock=``); loads and
generations are real (llama-cpp-python). The only test doubles are backends that must fail.
"""

from __future__ import annotations

import threading
import time

import pytest

from sarai_router import hookimpl
from sarai_router.backend import BackendError, GenerationParams
from sarai_router.default_plugins.llama_cpp import LlamaCppBackend
from sarai_router.loading import rebind
from sarai_router.plugins import Hooks, build_plugins
from sarai_router.pool import ModelPool, PoolError

THIRD_MODEL = """
[models.fast2]
path = "{models_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 256
max_tokens = 8
"""
UNPINNED = {"fast": "pinned = false"}


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_pool(clock):
    pools: list[ModelPool] = []

    def make(config, *plugins, **options) -> ModelPool:
        options.setdefault("clock", clock)
        plugin_set = build_plugins(config, extra=[(type(p).__name__, p) for p in plugins])
        config = rebind(config, plugin_set)  # the extra plugins' backends claim their keys
        pool = ModelPool(config, Hooks(plugin_set, config), **options)
        events: list = []
        pool.hooks.subscribe(events.append, "test")
        pool.events = events  # what the pool did, for the assertions
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def use(pool: ModelPool, name: str, clock: FakeClock | None = None, at: float | None = None):
    """One (empty) generation on ``name`` ending at ``at`` on the fake clock."""
    with pool.use(name):
        if clock is not None and at is not None:
            clock.now = at


def loaded(pool: ModelPool) -> set[str]:
    return {r["name"] for r in pool.residents() if r["state"] == "loaded"}


def kinds(pool: ModelPool) -> list[tuple[str, str]]:
    """(kind, model) of what the pool did; an unload with its reason (``model_unloaded:expire``)."""
    return [(f"{e.kind}:{e.data['reason']}" if e.kind == "model_unloaded" else e.kind, e.model)
            for e in pool.events if e.kind not in ("model_loading", "queued")]


def generate(pool: ModelPool, name: str, prompt: str = "Hi") -> str:
    with pool.use(name) as resident:
        deltas = list(resident.model.chat([{"role": "user", "content": prompt}],
                                          GenerationParams(max_tokens=2, temperature=0.0)))
    assert deltas[-1].usage is not None
    return "".join(d.text for d in deltas)


# -- pinned and lazy ------------------------------------------------------------------


@pytest.mark.models
def test_lazy_load_on_first_use_and_real_generation(make_pool, config):
    pool = make_pool(config)
    assert pool.residents() == []  # nothing loads before it is needed
    generate(pool, "quality")
    assert loaded(pool) == {"quality"}
    assert kinds(pool) == [("model_loaded", "quality")]
    generate(pool, "quality")  # the second use reuses the instance
    assert kinds(pool) == [("model_loaded", "quality")]
    [snapshot] = pool.residents()
    assert snapshot["estimated_mb"] > 100 and snapshot["load_seconds"] > 0


@pytest.mark.models
def test_pinned_model_loads_at_start_and_is_never_evicted_or_expired(make_pool, make_config, clock):
    pool = make_pool(make_config(THIRD_MODEL))
    assert pool.load_pinned() == ["fast"]
    assert loaded(pool) == {"fast"}
    use(pool, "quality", clock, at=1001)
    use(pool, "fast2", clock, at=1002)  # max_loaded = 2: quality goes, the pinned fast stays
    assert loaded(pool) == {"fast", "fast2"}
    assert ("model_evicted", "quality") in kinds(pool)
    assert pool.reap(now=clock.now + 1e6) == ["fast2"]
    assert loaded(pool) == {"fast"}


@pytest.mark.models
def test_only_pinned_models_resident_and_limit_reached_is_a_pool_error(make_pool, make_config):
    pool = make_pool(make_config(cache="max_loaded = 1"))
    pool.load_pinned()
    with pytest.raises(PoolError) as info:
        use(pool, "quality")
    message = str(info.value)
    assert "'quality'" in message and "max_loaded = 1" in message and "fast (pinned" in message
    assert loaded(pool) == {"fast"}


# -- TTL ------------------------------------------------------------------------------


@pytest.mark.models
def test_ttl_unloads_an_idle_model_and_closes_it(make_pool, config, clock):
    pool = make_pool(config)
    with pool.use("quality") as resident:
        model = resident.model
    ended = clock.now
    assert pool.reap(now=ended + 59) == []
    assert pool.reap(now=ended + 60) == ["quality"]
    assert loaded(pool) == set()
    assert model.llama is None  # Llama.close() was called
    assert kinds(pool)[-1] == ("model_unloaded:expire", "quality")


@pytest.mark.models
def test_idle_clock_starts_when_generation_ends(make_pool, config, clock):
    pool = make_pool(config)
    start = clock.now
    with pool.use("quality"):
        clock.now = start + 100  # a 100 s generation, longer than the 60 s TTL
    assert pool.reap(now=start + 130) == []  # 130 s after the start, only 30 s idle
    assert pool.reap(now=start + 160) == ["quality"]


@pytest.mark.models
def test_per_model_ttl_overrides_the_cache_ttl(make_pool, make_config, clock):
    pool = make_pool(make_config(quality="ttl_seconds = 5"))
    use(pool, "quality")
    assert pool.reap(now=clock.now + 5) == ["quality"]


@pytest.mark.models
def test_reaper_thread_unloads_with_the_real_clock(make_pool, make_config):
    pool = make_pool(make_config(quality="ttl_seconds = 0.2"), clock=time.monotonic)
    use(pool, "quality")
    pool.start_reaper(interval=0.05)
    deadline = time.monotonic() + 5
    while pool.is_loaded("quality") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool.is_loaded("quality")


# -- LRU eviction ---------------------------------------------------------------------


@pytest.mark.models
def test_lru_eviction_under_max_loaded(make_pool, make_config, clock):
    pool = make_pool(make_config(THIRD_MODEL, **UNPINNED))
    use(pool, "fast", clock, at=1001)
    use(pool, "quality", clock, at=1002)
    use(pool, "fast", clock, at=1003)  # fast is now the most recently used
    use(pool, "fast2", clock, at=1004)
    assert loaded(pool) == {"fast", "fast2"}
    assert ("model_evicted", "quality") in kinds(pool)
    use(pool, "quality", clock, at=1005)  # now fast (1003) is older than fast2 (1004)
    assert loaded(pool) == {"fast2", "quality"}


@pytest.mark.models
def test_lru_eviction_under_ram_budget_with_real_estimates(make_pool, make_config, clock):
    # fast ~136 MB + quality ~382 MB (GGUF header estimates at n_ctx 512) exceed 450 MB.
    pool = make_pool(make_config(cache="max_loaded = 5\nram_budget_mb = 450", **UNPINNED))
    use(pool, "fast", clock, at=1001)
    use(pool, "quality", clock, at=1002)
    assert loaded(pool) == {"quality"}
    evict = [e for e in pool.events if e.kind == "model_evicted"]
    assert [e.model for e in evict] == ["fast"] and evict[0].data["by"] == "quality"
    use(pool, "fast", clock, at=1003)
    assert loaded(pool) == {"fast"}


QUALITY2 = """
[models.quality2]
path = "{models_dir}/gemma-3-270m-q4_k_m.gguf"
chat_format = "gemma"
n_ctx = 512
max_tokens = 8
"""


@pytest.mark.models
def test_lru_order_under_ram_budget(make_pool, make_config, clock):
    # The pool's own estimator on the real files; a budget with room for two of the three
    # models but not for all three (max_loaded is no limit here).
    config = make_config(QUALITY2, cache="max_loaded = 5\nram_budget_mb = 1", **UNPINNED)
    estimates = {name: LlamaCppBackend().estimate_ram_mb(spec)
                 for name, spec in config.models.items()}
    assert all(mb > 50 for mb in estimates.values()), estimates
    budget = estimates["fast"] + estimates["quality"] + estimates["quality2"] / 2
    assert estimates["fast"] + estimates["quality2"] < budget < sum(estimates.values())
    pool = make_pool(make_config(QUALITY2, cache=f"max_loaded = 5\nram_budget_mb = {budget}",
                                 **UNPINNED))
    use(pool, "fast", clock, at=1001)
    use(pool, "quality", clock, at=1002)
    use(pool, "fast", clock, at=1003)  # quality is now the least recently used
    assert loaded(pool) == {"fast", "quality"}, pool.events
    use(pool, "quality2", clock, at=1004)
    assert loaded(pool) == {"fast", "quality2"}
    evictions = [e for e in pool.events if e.kind == "model_evicted"]
    assert [(e.model, e.data["by"]) for e in evictions] == [("quality", "quality2")]
    snapshots = {r["name"]: r for r in pool.residents()}
    for name, snapshot in snapshots.items():  # budgeted at the estimate, or the measure if larger
        assert snapshot["estimated_mb"] == pytest.approx(estimates[name], abs=0.1)
        assert snapshot["ram_mb"] == pytest.approx(max(estimates[name], snapshot["measured_mb"]),
                                                   abs=0.1)
    assert pool.resident_mb() <= budget


def test_model_too_big_for_the_budget_is_a_clear_pool_error(make_pool, make_config):
    pool = make_pool(make_config(cache="ram_budget_mb = 200"))
    with pytest.raises(PoolError) as info:
        use(pool, "quality")
    message = str(info.value)
    assert "'quality'" in message and "ram_budget_mb = 200" in message and "MB" in message
    assert pool.residents() == []  # refused before loading anything


# -- in use -----------------------------------------------------------------------------


class Holder:
    """Holds ``pool.use(name)`` in a thread until ``release()``."""

    def __init__(self, pool: ModelPool, name: str):
        self.entered, self.release_event, self.errors = threading.Event(), threading.Event(), []
        self.thread = threading.Thread(target=self._run, args=(pool, name), daemon=True)
        self.thread.start()
        assert self.entered.wait(30), "the holder never got the model"

    def _run(self, pool, name):
        try:
            with pool.use(name):
                self.entered.set()
                self.release_event.wait(30)
        except Exception as exc:  # pragma: no cover - reported by the test
            self.errors.append(exc)
            self.entered.set()

    def release(self):
        self.release_event.set()
        self.thread.join(30)
        assert self.errors == []


@pytest.mark.models
def test_no_unload_while_in_use(make_pool, make_config, clock):
    pool = make_pool(make_config(cache="max_loaded = 1", fast="pinned = false"), wait_seconds=0.3)
    holder = Holder(pool, "quality")
    try:
        assert pool.reap(now=clock.now + 1e6) == []
        assert pool.unload("quality") is False
        with pytest.raises(PoolError, match="max_loaded = 1"):
            use(pool, "fast")  # the only slot is busy: waits 0.3 s, then refuses
        assert loaded(pool) == {"quality"}
    finally:
        holder.release()
    assert pool.reap(now=clock.now + 1e6) == ["quality"]


@pytest.mark.models
def test_load_waits_for_a_busy_model_to_finish_then_evicts_it(make_pool, make_config):
    pool = make_pool(make_config(cache="max_loaded = 1", fast="pinned = false"), wait_seconds=30)
    holder = Holder(pool, "quality")
    timer = threading.Timer(0.3, holder.release_event.set)
    timer.start()
    started = time.monotonic()
    use(pool, "fast")
    holder.release()
    assert time.monotonic() - started >= 0.25
    assert loaded(pool) == {"fast"}
    assert ("model_evicted", "quality") in kinds(pool)


@pytest.mark.models
def test_one_generation_at_a_time_per_instance(make_pool, config):
    pool = make_pool(config)
    holder = Holder(pool, "fast")
    second_in = threading.Event()

    def second():
        with pool.use("fast"):
            second_in.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while pool.residents()[0]["waiting"] != 1 and not second_in.is_set():
        assert time.monotonic() < deadline, "the second user never queued for the instance"
        time.sleep(0.01)
    # The second user is admitted (counted), waiting for the slot the holder keeps, not inside.
    assert not second_in.is_set(), "two generations on one instance at once"
    row = pool.residents()[0]
    assert (row["queued"], row["active"], row["waiting"]) == (2, 1, 1)
    holder.release()
    assert second_in.wait(30)
    thread.join(30)
    assert [k for k in kinds(pool) if k[0] == "model_loaded"] == [("model_loaded", "fast")]


# -- hooks -------------------------------------------------------------------------------


class CountingLlamaCpp:
    """Registers the real llama_cpp backend under its own kind and as ``llama_cpp``."""

    def __init__(self):
        self.loads: list[str] = []

    @hookimpl
    def register_backends(self, register):
        outer = self

        class Counting(LlamaCppBackend):  # the real backend, its keys and all, counting loads
            def load(self, spec):
                outer.loads.append(spec.name)
                return super().load(spec)

        register("counted", Counting())
        register("llama_cpp", Counting())  # a user plugin wins over the default


@pytest.mark.models
def test_hook_register_backends(make_pool, make_config):
    plugin = CountingLlamaCpp()
    pool = make_pool(make_config(fast='pinned = true\nbackend = "counted"'), plugin)
    assert generate(pool, "fast")  # the custom kind, a real model behind it
    generate(pool, "quality")  # kind llama_cpp, overridden by the user plugin
    assert plugin.loads == ["fast", "quality"]
    backends = pool.hooks.backends()
    assert backends["counted"][0] == backends["llama_cpp"][0] == "CountingLlamaCpp"


class FailingBackendPlugin:
    """Forces a load failure that a real model file can't show on demand."""

    @hookimpl
    def register_backends(self, register):
        class FailingBackend(LlamaCppBackend):  # takes llama_cpp's keys; its load fails
            def load(self, spec):
                raise RuntimeError("out of file handles")

        register("failing", FailingBackend())


@pytest.mark.models
def test_backend_that_fails_to_load_leaves_no_resident(make_pool, make_config):
    pool = make_pool(make_config(quality='backend = "failing"'), FailingBackendPlugin())
    with pytest.raises(BackendError) as info:
        use(pool, "quality")
    assert "'failing'" in str(info.value) and "'quality'" in str(info.value)
    assert "out of file handles" in str(info.value)
    assert pool.residents() == []
    assert kinds(pool) == [("load_failed", "quality")]
    generate(pool, "fast")  # the pool still works


def test_unregistered_backend_kind_is_a_clear_error(make_pool, make_config):
    pool = make_pool(make_config(quality='backend = "vllm"'))
    with pytest.raises(BackendError, match="no plugin registers backend 'vllm'"):
        use(pool, "quality")
    assert pool.residents() == []


class MostRecentlyUsed:
    def __init__(self):
        self.asked: list[tuple[list[str], float, str]] = []

    @hookimpl
    def select_eviction(self, candidates, needed_mb, loading):
        self.asked.append((sorted(r.name for r in candidates), needed_mb, loading.name))
        return max(candidates, key=lambda r: r.last_used).name


@pytest.mark.models
def test_hook_select_eviction(make_pool, make_config, clock):
    plugin = MostRecentlyUsed()
    pool = make_pool(make_config(THIRD_MODEL, **UNPINNED), plugin)
    use(pool, "fast", clock, at=1001)
    use(pool, "quality", clock, at=1002)
    use(pool, "fast2", clock, at=1003)
    assert loaded(pool) == {"fast", "fast2"}  # MRU evicted quality; LRU would evict fast
    assert plugin.asked == [(["fast", "quality"], 0.0, "fast2")]


class EvictNothingKnown:
    @hookimpl
    def select_eviction(self, candidates):
        return "not-a-resident"


@pytest.mark.models
def test_select_eviction_naming_a_non_candidate_is_skipped_for_the_next_plugin(make_pool,
                                                                             make_config):
    pool = make_pool(make_config(cache="max_loaded = 1", fast="pinned = false"),
                     EvictNothingKnown())
    use(pool, "fast")
    use(pool, "quality")  # the bad answer is logged and skipped; the default LRU evicts fast
    assert loaded(pool) == {"quality"}
    assert any("'not-a-resident'" in error and "select_eviction" in error
               for error in pool.hooks.errors)


class ExpireOnlyQuality:
    def __init__(self):
        self.asked: list[str] = []

    @hookimpl
    def model_expired(self, resident, now, cache):
        self.asked.append(resident.name)
        return resident.name == "quality"  # at once, ignoring the TTL; never anything else


@pytest.mark.models
def test_hook_model_expired(make_pool, make_config, clock):
    plugin = ExpireOnlyQuality()
    pool = make_pool(make_config(THIRD_MODEL), plugin)
    pool.load_pinned()
    use(pool, "quality")
    assert pool.reap(now=clock.now) == ["quality"]  # 0 s idle, the plugin says go
    use(pool, "fast2")
    assert pool.reap(now=clock.now + 1e6) == []  # the plugin keeps fast2 past its TTL
    assert "fast" not in plugin.asked  # pinned models are never asked about
    holder = Holder(pool, "fast2")
    try:
        plugin.asked.clear()
        pool.reap(now=clock.now)
        assert plugin.asked == []  # nor are models in use
    finally:
        holder.release()


# -- unloading outside the lock, cancelled waiters, threads ----------------------------------


class SlowCloseLlamaCpp:
    """The real llama_cpp backend under kind ``slow_close``, whose close() waits for the test
    to let it go: a test double only for the timing of a close, which a real model does in
    tens of milliseconds (too quick to look at what the pool does meanwhile)."""

    def __init__(self):
        self.closing = threading.Event()
        self.release = threading.Event()
        self.order: list[tuple[str, str]] = []

    @hookimpl
    def register_backends(self, register):
        outer = self

        class SlowClose(LlamaCppBackend):
            def load(self, spec):
                outer.order.append(("load", spec.name))
                model = super().load(spec)
                real_close = model.close

                def close():
                    outer.closing.set()
                    assert outer.release.wait(60), "the test never released the close"
                    real_close()
                    outer.order.append(("closed", spec.name))

                model.close = close
                return model

        register("slow_close", SlowClose())


def in_thread(fn, *args):
    """Run ``fn`` in a thread; return (thread, result dict with 'value' or 'error')."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # pragma: no cover - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def wait_state(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.models
def test_unload_closes_outside_the_lock_and_a_reload_waits_for_the_close(make_pool,
                                                                         make_config):
    plugin = SlowCloseLlamaCpp()
    pool = make_pool(make_config(quality='backend = "slow_close"'), plugin)
    generate(pool, "quality")
    unloader, _ = in_thread(pool.unload, "quality")
    try:
        assert plugin.closing.wait(60)
        # The close is under way and will not end until released. Another model's request
        # and status reads (what /health and /metrics do) go on meanwhile: neither waits
        # for the pool lock, which a close under the lock would hold.
        reader, seen = in_thread(lambda: (generate(pool, "fast"),
                                          {r["name"]: r["state"] for r in pool.residents()}))
        reader.join(120)
        assert not reader.is_alive(), "a status read or another model waited for the close"
        _, states = seen["value"]
        assert states == {"quality": "unloading", "fast": "loaded"}
        assert not pool.is_loaded("quality")
        # A request for the model being closed waits for the close, then loads it again.
        reloader, reloaded = in_thread(generate, pool, "quality")
        wait_state(lambda: any(r["name"] == "quality" and r["state"] == "unloading"
                               and r["queued"] == 1 for r in pool.residents()),
                   "the reload to wait on the closing instance")
        assert plugin.order == [("load", "quality")], "nothing loads while the old one closes"
    finally:
        plugin.release.set()
    unloader.join(60)
    reloader.join(120)
    assert "error" not in reloaded, reloaded
    assert plugin.order == [("load", "quality"), ("closed", "quality"), ("load", "quality")]
    assert [k for k in kinds(pool) if k[1] == "quality"] == [
        ("model_loaded", "quality"), ("model_unloaded:unload", "quality"),
        ("model_loaded", "quality")]


@pytest.mark.models
def test_a_cancelled_waiter_leaves_the_queue_without_using_the_model(make_pool, config):
    pool = make_pool(config)
    holder = Holder(pool, "fast")
    cancel = threading.Event()
    entered = threading.Event()

    def wait_for_fast():
        with pool.use("fast", cancel=cancel):
            entered.set()

    waiter, result = in_thread(wait_for_fast)
    wait_state(lambda: pool.residents()[0]["queued"] == 2, "the waiter to queue")
    cancel.set()
    pool.wake()
    waiter.join(30)
    assert not waiter.is_alive(), "the cancelled waiter is still queued"
    assert type(result.get("error")).__name__ == "Cancelled"
    assert not entered.is_set()
    row = pool.residents()[0]
    assert (row["queued"], row["users"], row["active"]) == (1, 1, 1)  # only the holder
    holder.release()
    generate(pool, "fast")  # the slot it never took is free for the next one


@pytest.mark.models
def test_prompt_threads_follow_n_threads(make_pool, make_config):
    pool = make_pool(make_config(quality="n_threads = 1"))
    with pool.use("quality") as resident:
        params = resident.model.llama.context_params
        # n_threads_batch evaluates prompts: left alone it takes every core, which undoes
        # the server's share of the cores for every prompt.
        assert (params.n_threads, params.n_threads_batch) == (1, 1)


# -- slots on an event loop ---------------------------------------------------------------


def test_a_waiter_cancelled_as_a_slot_reaches_it_passes_the_slot_on(make_pool, make_config):
    """The holder lets go, which hands the slot to the waiter; the waiter is cancelled
    before it wakes (its client left). The slot must go on to the next request, not be lost
    with the cancelled waiter (which would make every later request wait forever)."""
    import asyncio

    pool = make_pool(make_config("""
        [models.remote]
        backend = "openai"
        base_url = "http://127.0.0.1:9/v1"
        max_concurrency = 1
        """), clock=time.monotonic)

    async def scenario() -> None:
        holder = pool.use("remote")
        resident = await holder.__aenter__()
        entered = []

        async def waiter() -> None:
            async with pool.use("remote"):
                entered.append("waiter")

        task = asyncio.create_task(waiter())
        while not resident.waiters:
            await asyncio.sleep(0)
        # No await between these two: the slot is on its way when the cancel comes.
        await holder.__aexit__(None, None, None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert entered == []
        async def next_request() -> None:
            async with pool.use("remote"):
                entered.append("next")

        # A lost slot: the next request would wait forever.
        await asyncio.wait_for(next_request(), 30)
        assert entered == ["next"]
        assert resident.active == 0 and resident.users == 0 and not resident.waiters

    asyncio.run(scenario())
