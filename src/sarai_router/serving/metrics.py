"""Prometheus metrics for a long-running router (``GET /metrics``).

Everything that happens is counted from the event stream that ``observe`` plugins see
(``Metrics.observe``, subscribed with ``Hooks.subscribe``): generations, fallbacks, model
loads and unloads, refused requests. Only ``sarai_requests`` is counted by the server when
it admits a request (the model that answers, after any fallback). Residency gauges are
read from the pool at scrape time, so they are never stale. Each ``Metrics`` has its own registry, so
two engines in one process (tests, benchmarks) never share counters.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from ..events import Event
    from ..plugins import Hooks
    from ..pool import ModelPool
    from ..types import RouteDecision

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets for small local models (tens of ms) up to 7B-class replies (tens of s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The *_created series double the output and no dashboard here uses them.
disable_created_metrics()

_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_label(reason: str) -> str:
    """A routing reason as a bounded label: its head, numbers and quoted values removed.

    ``"short emotional conversation: empathy 0.93 > 0.8 and 17 < 200 chars"`` becomes
    ``"short emotional conversation"``, so one rule is one label value whatever the input.
    """
    head = re.split(r"[:;(]", reason, maxsplit=1)[0]
    head = _NUMBER.sub("#", head)
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "…", head)
    return " ".join(head.split())[:64] or "(none)"


class PoolCollector:
    """Residency gauges (and the load queue's figures) read from the pool when scraped."""

    def __init__(self, pool: "ModelPool"):
        self.pool = pool

    def collect(self):
        residents = {r["name"]: r for r in self.pool.residents()}
        loaded = GaugeMetricFamily("sarai_model_loaded",
                                   "1 if the model is resident and loaded, else 0",
                                   labels=["model"])
        ram = GaugeMetricFamily("sarai_model_ram_mb",
                                "RAM the pool accounts for a resident model "
                                "(max of the GGUF estimate and the measured RSS growth)",
                                labels=["model", "kind"])
        queued = GaugeMetricFamily("sarai_model_queued_requests",
                                   "requests generating with or waiting for the model",
                                   labels=["model"])
        for name in self.pool.names():
            row = residents.get(name)
            loaded.add_metric([name], 1.0 if row and row["state"] == "loaded" else 0.0)
            queued.add_metric([name], float(row["queued"]) if row else 0.0)
            if row:
                ram.add_metric([name, "accounted"], row["ram_mb"])
                ram.add_metric([name, "estimated"], row["estimated_mb"])
                if row["measured_mb"] is not None:
                    ram.add_metric([name, "measured"], row["measured_mb"])
        yield loaded
        yield ram
        yield queued
        queue = self.pool.load_queue
        yield CounterMetricFamily(
            "sarai_queue_overtakes",
            "requests that used a resident model ahead of an older one waiting to load "
            "another ([cache] queue_order = \"grouped\")", value=float(queue.overtakes))
        yield GaugeMetricFamily(
            "sarai_queue_longest_overtaken_seconds",
            "the longest a waiting request had been overtaken when another went ahead of it "
            "(at most [cache] max_queue_wait_seconds)", value=queue.longest_overtaken)
        yield GaugeMetricFamily("sarai_resident_models", "models resident now",
                                value=float(len(residents)))
        yield GaugeMetricFamily("sarai_resident_ram_mb",
                                "RAM accounted to resident models, MB (the budget's view)",
                                value=sum(r["ram_mb"] for r in residents.values()))


class ObserverErrorCollector:
    """Observers that raised, read from the hooks when scraped."""

    def __init__(self, hooks: "Hooks"):
        self.hooks = hooks

    def collect(self):
        errors = CounterMetricFamily(
            "sarai_observer_errors",
            "events an observer (an observe plugin, or the server's own) raised on; the "
            "request went on", labels=["observer"])
        for name, count in sorted(self.hooks.observer_errors.items()):
            errors.add_metric([name], float(count))
        yield errors


class Metrics:
    def __init__(self, pool: "ModelPool", hooks: "Hooks"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sarai_requests", "chat requests answered (or started), by model and routing",
            ["model", "plugin", "reason"], registry=r)
        self.errors = Counter(
            "sarai_request_errors", "requests refused or failed, by HTTP status and error code",
            ["status", "code"], registry=r)
        self.tokens = Counter("sarai_tokens", "tokens processed, by model and kind",
                              ["model", "kind"], registry=r)
        self.ttft = Histogram(
            "sarai_time_to_first_token_seconds",
            "time from the start of generation to the first token (model load excluded)",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.generation = Histogram(
            "sarai_generation_seconds", "generation time per request (model load excluded)",
            ["model"], buckets=GENERATION_BUCKETS, registry=r)
        self.loads = Counter("sarai_model_loads", "model loads", ["model"], registry=r)
        self.load_failures = Counter("sarai_model_load_failures", "model loads that failed",
                                     ["model"], registry=r)
        self.load_seconds = Histogram("sarai_model_load_seconds", "model load time",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.unloads = Counter(
            "sarai_model_unloads", "model unloads, by why: expire (TTL), evict (room), unload",
            ["model", "reason"], registry=r)
        self.evictions = Counter("sarai_model_evictions",
                                 "models unloaded to make room for another", ["model"], registry=r)
        self.unverified = Counter(
            "sarai_unload_unverified",
            "unloads after which process RSS did not drop by about the model's size",
            ["model"], registry=r)
        self.queue_full = Counter("sarai_queue_full",
                                  "requests refused because the model's queue was full",
                                  ["model"], registry=r)
        self.prewarms = Counter(
            "sarai_prewarms",
            "background pre-loads by outcome: started, used, wasted (unloaded unused), skipped",
            ["model", "outcome"], registry=r)
        self.crashes = Counter(
            "sarai_backend_crashes",
            "loaded instances that died (e.g. a llama-server child killed) and were dropped; "
            "the next request loads the model again", ["model"], registry=r)
        self.fallbacks = Counter(
            "sarai_fallbacks",
            "requests answered by another model after one failed before its first token",
            ["from", "to", "reason"], registry=r)
        self.generations = Counter(
            "sarai_generations_started", "generations the models started (prompts evaluated)",
            ["model"], registry=r)
        self.dropped = Counter(
            "sarai_generations_dropped",
            "requests cancelled while queued (client gone, shutdown): the model never saw them",
            ["model"], registry=r)
        self.prefix = Counter(
            "sarai_prefix_routing",
            "requests with history to a model with balance = \"prefix\": hit (sent to the "
            "replica holding their prefix) or miss (placed least busy)",
            ["model", "outcome"], registry=r)
        self.runaway = Counter(
            "sarai_runaway_stops", "answers the runaway guard stopped for repeating themselves",
            ["model"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        r.register(PoolCollector(pool))
        r.register(ObserverErrorCollector(hooks))
        #: Events that only add one to their model's count.
        self._counted_per_model = {
            "load_failed": self.load_failures, "unload_unverified": self.unverified,
            "model_crashed": self.crashes, "queue_full": self.queue_full,
            "generation_started": self.generations, "generation_dropped": self.dropped,
            "runaway_stopped": self.runaway,
        }
        self.hooks = hooks
        hooks.subscribe(self.observe, "metrics")

    def close(self) -> None:
        """Stop counting (the server has stopped)."""
        self.hooks.unsubscribe(self.observe)

    def observe(self, event: "Event") -> None:
        """Count one event of the stream (subscribed to the engine's hooks by the server)."""
        kind, model, data = event.kind, event.model, event.data
        counter = self._counted_per_model.get(kind)
        if counter is not None:
            counter.labels(model).inc()
        elif kind == "model_loaded":
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).observe(data["load_s"])
        elif kind == "model_unloaded":
            # A shutdown's unloads count as plain unloads.
            reason = "expire" if data.get("reason") == "expire" else "unload"
            self.unloads.labels(model, reason).inc()
        elif kind == "model_evicted":
            self.unloads.labels(model, "evict").inc()
            self.evictions.labels(model).inc()
        elif kind.startswith("prewarm_"):
            self.prewarms.labels(model, kind.removeprefix("prewarm_")).inc()
        elif kind == "fallback":
            self.fallbacks.labels(data["from_model"], data["to_model"], data["reason"]).inc()
        elif kind == "generation_finished":
            self.tokens.labels(model, "prompt").inc(data["prompt_tokens"])
            self.tokens.labels(model, "completion").inc(data["completion_tokens"])
            if data["ttft_s"] is not None:
                self.ttft.labels(model).observe(data["ttft_s"])
            self.generation.labels(model).observe(data["generation_s"])
            outcome = (data.get("placement") or {}).get("prefix")
            if outcome in ("hit", "miss"):
                self.prefix.labels(model, outcome).inc()
        elif kind == "request_refused":
            self.errors.labels(str(data["status"]), data["code"]).inc()

    def request_started(self, decision: "RouteDecision") -> None:
        self.requests.labels(decision.model, decision.plugin, reason_label(decision.reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
