"""Measure routing on a labelled set: accuracy, confusion, misses, cost; choose the heuristic's
thresholds from data.

A case is one JSON object per line of a JSONL file::

    {"prompt": "Me siento solo últimamente", "expect": "fast", "kind": "emotional", "lang": "es"}
    {"prompt": "¿Qué ves?", "images": ["fixtures/cat.png"], "expect": "quality"}
    {"messages": [{"role": "user", "content": "..."}], "audio": "clip.wav", "expect": "quality"}

``prompt`` or ``messages`` (OpenAI-style) is required, and ``expect`` names a configured
model. Media paths are relative to the JSONL file's folder. ``conversation`` (a string or
number) makes the cases that share it the turns of one conversation, in file order.
Other keys (``kind``, ``lang``, ``topic``, ...) are kept: ``kind`` and ``lang`` group the
accuracy.

Every case goes through the real :class:`~sarai_router.router.Router`, in file order, on a
simulated pool (:class:`SimulatedPool`): routing sees which models that pool holds, as a
server's routing sees its own, and a conversation's turns see the models that answered its
earlier turns. With the heuristic's ``borderline_margin`` and ``sticky_turns`` off (the
default) routing reads neither, and the figures are what ``sarai-router route`` decides.
Nothing here loads a model: the cost estimate reads only the model files' sizes and what
their backends estimate from them, e.g. a GGUF header (see :func:`model_costs`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from typing import Any, Callable, Mapping, Sequence

import attrs

from .config import Config
# Cases and reports live in modules of their own; they are importable from here as before.
from .evaluation_cases import Case, CaseError, load_cases
from .evaluation_report import render_calibration, render_plot, render_text
from .plugins import Hooks, build_plugins
from .types import ChatRequest, Residency, ResidentInfo

#: Where calibration's TOML snippet puts the heuristic's settings.
HEURISTIC_TABLE = "plugins.heuristic"


# -- evaluation ---------------------------------------------------------------------------

_TRANSCRIPTS: dict[tuple[str, str], Any] = {}


class _Listener:
    """Audio as ``route`` hears it: when no configured model takes audio, a clip is
    transcribed (the speech model loads once) and the case is routed on what was said."""

    def __init__(self, config: Config):
        self.config = config
        self.engine = None

    def __call__(self, request: ChatRequest) -> ChatRequest:
        if request.audio is None:
            return request
        if self.engine is None:
            from .engine import Engine

            self.engine = Engine(self.config)
        if any(self.engine.takes_audio(name) for name in self.config.models):
            return request  # a model takes the clip itself: routing sees the attachment
        # A calibration sweep evaluates the same clips many times: transcribe each once.
        key = (hashlib.sha256(request.audio.data).hexdigest(), request.audio.mime)
        transcript = _TRANSCRIPTS.get(key)
        if transcript is None:
            transcript = _TRANSCRIPTS[key] = self.engine.transcribe(
                request.audio, request, why="no configured model takes audio")
        return request.with_transcript(transcript)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def evaluate(router, cases: Sequence[Case], *, config: Config | None = None,
             costs: Mapping[str, "ModelCost"] | None = None,
             reply_tokens: int = 100, compare: bool = True) -> dict[str, Any]:
    """Route every case through ``router``, in order, and compare with its ``expect``.

    Returns a JSON-ready dict: ``accuracy``, ``cases``, ``correct``, ``confusion``
    (expected -> chosen -> count), ``models`` (precision/recall per model), ``by_kind``,
    ``by_lang``, ``misses`` (line, prompt, expected, chosen, plugin, reason) and ``cost``
    (see :func:`replay_cost`; None when no model's cost is known). When the heuristic's
    ``borderline_margin`` or ``sticky_turns`` is on (and ``compare``), ``residency``
    compares accuracy, cold loads and latency with them as set and with both off.
    """
    config = config or router.config
    models = sorted(config.models)
    for case in cases:
        if case.expect not in config.models:
            raise CaseError(f"{case.source}:{case.line}: \"expect\": unknown model "
                            f"{case.expect!r} (configured: {', '.join(models)})")
    hooks = Hooks(router.plugins, config)
    if costs is None:
        costs = model_costs(config, hooks=hooks)
    from .router import RoutingError

    confusion: dict[str, Counter] = defaultdict(Counter)
    groups: dict[str, dict[str, list[int]]] = {"by_kind": defaultdict(lambda: [0, 0]),
                                                "by_lang": defaultdict(lambda: [0, 0])}
    misses, chosen_models = [], []
    pool = SimulatedPool(config, costs, reply_tokens, hooks)
    conversations: dict[str, list[str]] = defaultdict(list)
    heard = _Listener(config)
    try:
        requests = [heard(case.request) for case in cases]
    finally:
        heard.close()
    for case, request in zip(cases, requests):
        if case.conversation:
            request = attrs.evolve(request,
                                   previous_models=tuple(conversations[case.conversation]))
        try:
            decision = router.route(request, residency=pool.residency())
            chosen, plugin, reason = decision.model, decision.plugin, decision.reason
        except RoutingError as exc:
            chosen, plugin, reason = None, "(error)", str(exc)
        chosen_models.append(chosen)
        if chosen is not None:
            pool.serve(chosen, case.text)
            if case.conversation:
                conversations[case.conversation].append(chosen)
        confusion[case.expect][chosen or "(error)"] += 1
        right = chosen == case.expect
        for key, value in (("by_kind", case.kind), ("by_lang", case.lang)):
            tally = groups[key][value or "-"]
            tally[0] += right
            tally[1] += 1
        if not right:
            misses.append({"line": case.line, "prompt": case.text, "expected": case.expect,
                           "chosen": chosen, "plugin": plugin, "reason": reason,
                           "kind": case.kind, "lang": case.lang,
                           "empathy": _signal(decision, "empathy") if chosen else None})
    correct = len(cases) - len(misses)
    report: dict[str, Any] = {
        "accuracy": round(correct / len(cases), 4) if cases else 0.0,
        "cases": len(cases),
        "correct": correct,
        "confusion": {e: dict(sorted(c.items())) for e, c in sorted(confusion.items())},
        "models": _precision_recall(confusion, models),
    }
    for key, table in groups.items():
        report[key] = {name: {"cases": n, "correct": ok, "accuracy": round(ok / n, 4)}
                       for name, (ok, n) in sorted(table.items())}
    report["misses"] = misses
    report["cost"] = replay_cost(config, cases, chosen_models, costs,
                                 reply_tokens=reply_tokens, routed=pool)
    options = residency_settings(config)
    if compare and any(options.values()):
        blind = with_heuristic(config, **dict.fromkeys(options, 0))
        from .router import Router

        without = evaluate(Router(blind, plugins=router.plugins), cases, config=blind,
                           costs=costs, reply_tokens=reply_tokens, compare=False)
        report["residency"] = {"settings": options,
                               "with": _residency_summary(report),
                               "without": _residency_summary(without)}
    return report


def _residency_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    routed = (report.get("cost") or {}).get("routed") or {}
    return {"accuracy": report["accuracy"], "correct": report["correct"],
            "cold_loads": routed.get("cold_loads"),
            "cold_loads_total": sum((routed.get("cold_loads") or {}).values()),
            "mean_latency_s": routed.get("mean_latency_s"), "total_s": routed.get("total_s"),
            "share": {m: row["chosen"] for m, row in report["models"].items()}}


def _signal(decision, name: str):
    value = decision.signals.get(name)
    return round(value, 4) if isinstance(value, float) else value


def _precision_recall(confusion: Mapping[str, Counter], models: list[str]) -> dict[str, Any]:
    out = {}
    for model in models:
        expected = sum(confusion.get(model, Counter()).values())
        chosen = sum(row.get(model, 0) for row in confusion.values())
        right = confusion.get(model, Counter()).get(model, 0)
        out[model] = {
            "expected": expected, "chosen": chosen, "correct": right,
            "precision": round(right / chosen, 4) if chosen else None,
            "recall": round(right / expected, 4) if expected else None,
        }
    return out


# -- cost estimate ------------------------------------------------------------------------

#: Effective memory bandwidth (GB/s) for the token-rate estimate: decoding on a CPU reads
#: every weight once per token, so tok/s ~ bandwidth / weights. 18 GB/s reproduces the
#: field report's figures (3B Q4: 8.9 tok/s, 7B Q4_K_M: 4.3 tok/s) within ~10 %.
EST_BANDWIDTH_GBPS = 18.0
#: Prompt processing is batched and compute-bound: assumed this many times the decode rate.
EST_PREFILL_FACTOR = 8.0
#: Load rate (GB/s of weights) for the cold-load estimate; `sarai-router bench` measured
#: 0.125 s for 0.1 GB and 0.40 s for 0.25 GB on the reference machine, so ~0.7 GB/s.
EST_LOAD_GBPS = 0.7
#: Characters per prompt token, for the prefill estimate.
CHARS_PER_TOKEN = 4.0


@attrs.frozen
class ModelCost:
    """What one request costs on a model: decode rate, load time and resident RAM."""

    tokens_per_second: float
    load_s: float
    ram_mb: float
    source: str  # "estimate (model file)" or "measured (bench report)"


def model_costs(config: Config, bench_report: Mapping[str, Any] | None = None, *,
                hooks: Hooks | None = None) -> dict[str, ModelCost]:
    """Per-model cost figures: measured from a ``sarai-router bench --json`` report where it
    has the model, else estimated: RAM as the model's backend estimates it (a GGUF
    backend reads the file's header), decode rate and load time from the size of the
    model file (its weights, give or take a header of a few MB).

    A model whose backend can't estimate its RAM (a remote one, a file that can't be read)
    and that the report lacks is left out.
    """
    hooks = hooks or Hooks(config.plugin_set or build_plugins(config), config)
    measured = (bench_report or {}).get("models") or {}
    out = {}
    for name, spec in config.models.items():
        estimate = None
        ram_mb = hooks.backend(spec.backend).estimate_ram_mb(spec)
        if ram_mb > 0 and spec.path and os.path.isfile(spec.path):
            weights_gb = os.path.getsize(spec.path) / 1e9
            estimate = ModelCost(tokens_per_second=EST_BANDWIDTH_GBPS / max(weights_gb, 1e-3),
                                 load_s=weights_gb / EST_LOAD_GBPS, ram_mb=ram_mb,
                                 source="estimate (model file)")
        row = measured.get(name)
        if row and row.get("mean_tokens_per_second"):
            memory = row.get("memory") or {}
            ram_mb = max(memory.get("load_delta_mb") or 0.0, memory.get("estimated_mb") or 0.0)
            out[name] = ModelCost(
                tokens_per_second=float(row["mean_tokens_per_second"]),
                load_s=float(memory.get("load_s") or (estimate.load_s if estimate else 0.0)),
                ram_mb=float(ram_mb or (estimate.ram_mb if estimate else 0.0)),
                source="measured (bench report)",
            )
        elif estimate is not None:
            out[name] = estimate
    return out


def request_seconds(cost: ModelCost, text: str, reply_tokens: int) -> float:
    prompt_tokens = max(1.0, len(text) / CHARS_PER_TOKEN)
    return (reply_tokens + prompt_tokens / EST_PREFILL_FACTOR) / cost.tokens_per_second


def replay_cost(config: Config, cases: Sequence[Case], chosen: Sequence[str | None],
                costs: Mapping[str, ModelCost], *, reply_tokens: int = 100,
                routed: "SimulatedPool | None" = None) -> dict[str, Any] | None:
    """Replay the cases in order on a virtual clock, as routed and as sent to each model.

    Each request takes :func:`request_seconds` (``reply_tokens`` generated) and the next
    one arrives when it ends (no think time: the clock is the sum of the work). Pinned
    models are loaded at the start; others load on first need (a cold load adds its
    ``load_s``), are unloaded when the cache hooks say they expired on that clock, and an
    unpinned one the hooks choose is evicted to respect ``max_loaded`` and the RAM budget
    (by default: after their TTL of idle time, least recently used first). RAM-GB·s
    integrates the resident models' RAM over the clock. ``routed``: the pool
    :func:`evaluate` already replayed ``chosen`` on (routing saw its state); its hooks
    serve the other plans too.
    """
    if not cases or any(m is not None and m not in costs for m in set(chosen)):
        missing = sorted({m for m in chosen if m is not None and m not in costs})
        return None if not cases else {"unknown": missing,
                                       "note": "no cost figures for " + ", ".join(missing)}
    plans: dict[str, list[str | None]] = {"routed": list(chosen)}
    for name in sorted(costs):
        plans[f"all {name}"] = [name] * len(cases)
    out: dict[str, Any] = {
        "reply_tokens": reply_tokens,
        "models": {n: attrs.asdict(c) for n, c in sorted(costs.items())},
    }
    for label, plan in plans.items():
        if label == "routed" and routed is not None:
            out[label] = routed.summary()
            continue
        pool = SimulatedPool(config, costs, reply_tokens, routed.hooks if routed else None)
        for case, model in zip(cases, plan):
            if model is not None:
                pool.serve(model, case.text)
        out[label] = pool.summary()
    return out


class SimulatedPool:
    """The model pool on a virtual clock, for :func:`evaluate` and :func:`replay_cost`.

    Requests run back to back; a model not resident loads first (``load_s``); pinned models
    are resident from the start. Which idle model is evicted (for ``max_loaded`` and the RAM
    budget) and when an idle one expires are asked of the cache hooks (``select_eviction``,
    ``model_expired``), as the real pool does, so a cache plugin's policy shows in the
    estimate; the default plugin is LRU with a TTL. A model without cost figures takes no
    time and no RAM (its state is still followed).
    """

    #: halvings of an interval to find when a model expired (far below a millisecond)
    EXPIRY_STEPS = 48

    def __init__(self, config: Config, costs: Mapping[str, ModelCost], reply_tokens: int,
                 hooks: Hooks | None = None):
        self.config, self.costs, self.reply_tokens = config, costs, reply_tokens
        self.hooks = hooks or Hooks(config.plugin_set or build_plugins(config), config)
        self.clock = 0.0
        # model -> time it was last used (LRU and TTL)
        self.resident: dict[str, float] = {name: 0.0 for name, spec in config.models.items()
                                           if spec.pinned}
        self.loaded_at: dict[str, float] = dict(self.resident)
        self.loads: Counter = Counter()
        self.latencies: list[float] = []
        self.ram_gb_s = 0.0

    def residency(self) -> Residency:
        """What routing sees now: each model loaded or unloaded, and its load time."""
        states = {name: "loaded" if name in self.resident else "unloaded"
                  for name in self.config.models}
        return Residency(states, self._cold_load)

    def _cold_load(self, name: str) -> tuple[float | None, bool]:
        cost = self.costs.get(name)
        if cost is None:
            return None, False
        return cost.load_s, cost.source.startswith("measured")

    def serve(self, model: str, text: str) -> float:
        """One request for ``model``: load it if needed, run it; its latency in seconds."""
        cost = self.costs.get(model)
        seconds = request_seconds(cost, text, self.reply_tokens) if cost else 0.0
        if model not in self.resident:
            self.loads[model] += 1
            seconds += cost.load_s if cost else 0.0
            self._make_room(model)
            self.resident[model] = self.loaded_at[model] = self.clock
        self.latencies.append(seconds)
        self._advance(self.clock + seconds, busy=model)
        self.resident[model] = self.clock
        return seconds

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        total = sum(self.latencies)
        return {
            "requests": n,
            "mean_latency_s": round(total / n, 3) if n else None,
            "total_s": round(total, 1),
            "cold_loads": dict(sorted(self.loads.items())),
            "ram_gb_s": round(self.ram_gb_s, 1),
            "mean_ram_gb": round(self.ram_gb_s / self.clock, 3) if self.clock else None,
        }

    def _ram_mb(self, model: str) -> float:
        cost = self.costs.get(model)
        return cost.ram_mb if cost else 0.0

    def _resident_gb(self) -> float:
        return sum(self._ram_mb(m) for m in self.resident) / 1024.0

    def _info(self, model: str) -> ResidentInfo:
        """What a cache plugin sees of a resident model (idle: the simulation runs one
        request at a time)."""
        cost = self.costs.get(model)
        spec = self.config.models[model]
        return ResidentInfo(
            name=model, spec=spec, state="loaded", pinned=spec.pinned, users=0, queued=0,
            ram_mb=self._ram_mb(model), estimated_mb=self._ram_mb(model), measured_mb=None,
            last_used=self.resident[model], loaded_at=self.loaded_at.get(model, 0.0),
            load_seconds=cost.load_s if cost else 0.0, prewarmed=False)

    def _expired(self, model: str, now: float) -> bool:
        return self.hooks.model_expired(resident=self._info(model), now=now,
                                        cache=self.config.cache)

    def _expiry(self, model: str, to: float) -> float | None:
        """When ``model`` expires before ``to`` (the earliest moment the hook says so, to
        integrate RAM up to it), or None. The real pool asks on a timer; here the clock
        jumps from request to request, so the moment is found by halving."""
        low = max(self.resident[model], self.clock)
        if not self._expired(model, to):
            return None
        if self._expired(model, low):
            return low
        high = to
        for _ in range(self.EXPIRY_STEPS):
            middle = (low + high) / 2
            if self._expired(model, middle):
                high = middle
            else:
                low = middle
        return high

    def _advance(self, to: float, busy: str) -> None:
        # unload what expires before ``to`` (never the model at work), integrating RAM piecewise
        models = self.config.models
        due = sorted((when, m) for m in list(self.resident)
                     if not models[m].pinned and m != busy
                     and (when := self._expiry(m, to)) is not None and when < to)
        for when, model in due:
            self.ram_gb_s += self._resident_gb() * (when - self.clock)
            self.clock = when
            del self.resident[model]
        self.ram_gb_s += self._resident_gb() * (to - self.clock)
        self.clock = to

    def _make_room(self, model: str) -> None:
        budget_mb = self.config.cache.ram_budget_mb
        spec = self.config.models[model]

        def over_mb() -> float:
            return sum(self._ram_mb(m) for m in self.resident) + self._ram_mb(model) - budget_mb

        while len(self.resident) + 1 > self.config.cache.max_loaded or over_mb() > 0:
            candidates = [self._info(m) for m in self.resident if not self.config.models[m].pinned]
            if not candidates:
                break  # the pool would refuse; the estimate just runs over
            victim = self.hooks.select_eviction(candidates=candidates,
                                                needed_mb=max(0.0, over_mb()), loading=spec)
            if victim is None:
                break  # no cache plugin chose: the pool would refuse the load
            del self.resident[victim]
            self.loaded_at.pop(victim, None)


# -- calibration --------------------------------------------------------------------------

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_MAX_CHARS = (80, 120, 160, 200, 240, 280, 320)


# These two functions are the only places here that know where the heuristic's settings
# live in a Config, so calibration follows them when they move.

def with_heuristic(config: Config, **settings: Any) -> Config:
    """``config`` with the default heuristic's settings (``[plugins.heuristic]``) replaced
    by ``settings``; the plugins already discovered for ``config`` are kept."""
    tables = dict(config.plugins.tables)
    tables["heuristic"] = {**tables.get("heuristic", {}), **settings}
    return attrs.evolve(config, plugins=attrs.evolve(config.plugins, tables=tables))


def heuristic_settings(config: Config) -> dict[str, Any]:
    """The heuristic's current ``empathy_threshold`` and ``max_chars``."""
    rules = config.plugin_config("heuristic")
    return {"empathy_threshold": rules["empathy_threshold"], "max_chars": rules["max_chars"]}


def residency_settings(config: Config) -> dict[str, Any]:
    """The heuristic's ``borderline_margin`` and ``sticky_turns`` (0 when it has none)."""
    rules = config.plugin_config("heuristic")
    return {"borderline_margin": rules.get("borderline_margin", 0.0),
            "sticky_turns": rules.get("sticky_turns", 0)}


def calibrate(config: Config, cases: Sequence[Case], *, target: str = "accuracy",
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
              max_chars: Sequence[int] = DEFAULT_MAX_CHARS, min_accuracy: float = 0.95,
              costs: Mapping[str, ModelCost] | None = None, reply_tokens: int = 100,
              router_factory: Callable[[Config], Any] | None = None) -> dict[str, Any]:
    """Sweep ``empathy_threshold`` x ``max_chars`` through the real router and pick one.

    ``target="accuracy"``: the highest accuracy; ties go to the lower mean latency, then to
    the setting nearest the current one. ``target="latency"``: the lowest estimated mean
    latency among settings with accuracy >= ``min_accuracy`` (the most accurate one if none
    reaches it). Returns ``curve`` (one row per setting), ``best``, ``current`` and
    ``toml`` (the snippet to paste).
    """
    if target not in ("accuracy", "latency"):
        raise ValueError(f"target must be 'accuracy' or 'latency', got {target!r}")
    from .router import Router

    if router_factory is None:
        shared = Router(config).plugins  # plugins don't depend on these settings

        def router_factory(cfg: Config) -> Router:
            return Router(cfg, plugins=shared)

    costs = model_costs(config) if costs is None else costs
    current = heuristic_settings(config)
    curve = []
    for chars in max_chars:
        for threshold in thresholds:
            trial = with_heuristic(config, empathy_threshold=float(threshold), max_chars=int(chars))
            report = evaluate(router_factory(trial), cases, config=trial, costs=costs,
                              reply_tokens=reply_tokens, compare=False)
            routed = (report["cost"] or {}).get("routed") or {}
            curve.append({
                "empathy_threshold": float(threshold), "max_chars": int(chars),
                "accuracy": report["accuracy"],
                "share": {m: round(row["chosen"] / report["cases"], 4)
                          for m, row in report["models"].items()},
                "mean_latency_s": routed.get("mean_latency_s"),
                "ram_gb_s": routed.get("ram_gb_s"),
            })

    def distance(row) -> float:
        return (abs(row["empathy_threshold"] - current["empathy_threshold"])
                + abs(row["max_chars"] - current["max_chars"]) / 1000.0)

    def latency(row) -> float:
        return row["mean_latency_s"] if row["mean_latency_s"] is not None else math.inf

    if target == "accuracy":
        best = min(curve, key=lambda r: (-r["accuracy"], latency(r), distance(r)))
    else:
        good = [r for r in curve if r["accuracy"] >= min_accuracy]
        best = (min(good, key=lambda r: (latency(r), -r["accuracy"], distance(r))) if good
                else min(curve, key=lambda r: (-r["accuracy"], latency(r), distance(r))))
    return {"target": target, "min_accuracy": min_accuracy if target == "latency" else None,
            "cases": len(cases), "current": current, "best": best, "curve": curve,
            "toml": toml_snippet(best)}


def toml_snippet(row: Mapping[str, Any]) -> str:
    return (f"[{HEURISTIC_TABLE}]\n"
            f"empathy_threshold = {row['empathy_threshold']}\n"
            f"max_chars = {row['max_chars']}\n")


__all__ = ["Case", "CaseError", "ModelCost", "SimulatedPool", "calibrate", "evaluate",
           "heuristic_settings", "load_cases", "model_costs", "render_calibration",
           "render_plot", "render_text", "replay_cost", "residency_settings", "toml_snippet",
           "with_heuristic"]
