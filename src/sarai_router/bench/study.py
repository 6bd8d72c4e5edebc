"""The field report's benchmark, run on any configured models, plus the router's own cost.

``run_bench`` returns one JSON-able dict with every figure; the renderers turn it into a
terminal report, markdown or a plot. Sections, in the order they run:

* ``decision``: routing decisions per second with the default plugins, no model loaded;
* ``models``: per model, load time and RSS, a warm-up that is not counted, then each query
  x each iteration with a fixed seed: tok/s, latency and time to first token; the model is
  unloaded through the pool afterwards and the RSS measured again;
* ``overhead``: the same prompts through the Engine (route + pool + backend) and straight
  into ``llama_cpp.Llama.create_chat_completion(stream=True)`` on the same instance,
  interleaved, plus a third arm with a no-op logits processor (what the backend uses to
  count tokens);
* ``dual``: a traffic mix replayed through the real router vs everything to one model;
* ``speech`` (``--audio FILE``): each clip through the Engine as a spoken request: the
  speech model's load time, transcription time and real-time factor, beside the time the
  routed model then takes to answer;
* ``kpis``: targets from ``[bench]`` or options, each met or not.

Only the Engine path is product code; the direct path exists here as the yardstick.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Sequence

import attrs

from ..backend import BUILTIN_SAMPLING, GenerationParams
from ..config import Config
from ..errors import SaraiError
from ..types import ChatRequest
from .machine import _r, machine_info, mean, model_info, peak_rss_mb, percentile
from .settings import (BUILTIN_QUERIES, LONG_INPUT_CHARS, BenchError, BenchSettings, Progress,
                       Targets, evaluate_kpis)

# -- decision cost ------------------------------------------------------------------------

def measure_decisions(config: Config, seconds: float = 1.0) -> dict[str, Any]:
    """Route short and 2,000-char inputs repeatedly with every default plugin, no model loaded.

    Each decision is timed twice: on the thread's CPU clock (``p50_us``, ``p99_us``,
    ``mean_us``: what the decision costs, blind to the time the scheduler gives other
    processes, which on a busy machine dominates a wall-clock tail) and on the wall clock
    (``wall_p50_us``, ``wall_p99_us``). ``decisions_per_second`` is per core, from CPU time.
    """
    from ..router import Router

    router = Router(config)
    short = ChatRequest.from_prompt(BUILTIN_QUERIES[0])
    sentence = "Necesito ayuda con una pregunta larga sobre mi trabajo y mis planes. "
    long_text = (sentence * (LONG_INPUT_CHARS // len(sentence) + 1))[:LONG_INPUT_CHARS]
    out: dict[str, Any] = {"plugins": [row["name"] for row in router.hooks.describe()],
                           "clock": "thread CPU time (wall clock alongside)"}
    for label, request in (("short", short), ("long", ChatRequest.from_prompt(long_text))):
        for _ in range(20):  # warm regex caches and imports
            router.route(request)
        cpu: list[float] = []
        wall: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(cpu) < 100:
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            router.route(request)
            c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
            cpu.append((c1 - c0) / 1000.0)
            wall.append((w1 - w0) / 1000.0)
        total_s = sum(cpu) / 1e6
        out[label] = {
            "chars": len(request.text),
            "decisions": len(cpu),
            "decisions_per_second": round(len(cpu) / total_s, 1) if total_s else None,
            "p50_us": round(percentile(cpu, 50), 1),
            "p99_us": round(percentile(cpu, 99), 1),
            "mean_us": round(mean(cpu), 1),
            "wall_p50_us": round(percentile(wall, 50), 1),
            "wall_p99_us": round(percentile(wall, 99), 1),
            "model": router.route(request).model,
        }
    return out


# -- generations --------------------------------------------------------------------------

@attrs.define
class Run:
    """One timed generation. Latency runs from the request's start (routing included) to the end."""

    model: str
    prompt_index: int
    tokens: int
    pieces: int
    latency_s: float
    ttft_s: float | None
    load_s: float = 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.latency_s if self.latency_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "query": self.prompt_index, "tokens": self.tokens,
                "latency_s": _r(self.latency_s, 4), "ttft_s": _r(self.ttft_s, 4),
                "tokens_per_second": _r(self.tps, 2)}


def engine_run(engine, prompt: str, index: int, params: GenerationParams,
               model: str | None = None, *, routed: bool = False) -> Run:
    """One request through the Engine: plugins decide (``routed``), else ``model`` is asked for.

    ``routed`` with a ``model`` runs the plugins' decision in full, then answers with ``model``.
    """
    from ..engine import Completion

    request = ChatRequest.from_prompt(prompt)
    started = time.perf_counter()
    decision = engine.route(request) if routed or model is None else engine.route(request, model=model)
    if routed and model is not None and decision.model != model:
        decision = attrs.evolve(decision, model=model)  # the full routing cost, a fixed model
    completion = Completion(decision=decision)
    first = None
    pieces = 0
    for _ in engine.stream(request, decision, params, completion):
        if first is None:
            first = time.perf_counter() - started
        pieces += 1
    ended = time.perf_counter()
    load = completion.timings.load_s
    return Run(model=decision.model, prompt_index=index,
               tokens=completion.usage.completion_tokens, pieces=pieces,
               latency_s=ended - started - load, ttft_s=None if first is None else first - load,
               load_s=load)


def summarize_runs(runs: Sequence[Run], n_prompts: int) -> dict[str, Any]:
    per_query = []
    for i in range(n_prompts):
        mine = [r for r in runs if r.prompt_index == i]
        if not mine:
            continue
        per_query.append({
            "query": i,
            "tokens_per_second": _r(mean(r.tps for r in mine), 2),
            "latency_s": _r(mean(r.latency_s for r in mine), 3),
            "ttft_s": _r(mean(r.ttft_s for r in mine if r.ttft_s is not None), 4),
            "tokens": _r(mean(r.tokens for r in mine), 1),
        })
    latencies = [r.latency_s for r in runs]
    return {
        "per_query": per_query,
        "mean_tokens_per_second": _r(mean(r.tps for r in runs), 2),
        "mean_latency_s": _r(mean(latencies), 3),
        "p50_latency_s": _r(percentile(latencies, 50), 3),
        "p95_latency_s": _r(percentile(latencies, 95), 3),
        "mean_ttft_s": _r(mean(r.ttft_s for r in runs if r.ttft_s is not None), 4),
        "mean_tokens": _r(mean(r.tokens for r in runs), 1),
        "runs": [r.to_dict() for r in runs],
    }


def bench_model(engine, name: str, settings: BenchSettings, params: GenerationParams,
                progress: Progress) -> dict[str, Any]:
    """Load ``name`` through the pool, warm it up, run the study, unload it; with RSS around each."""
    from ..memory import process_rss_mb

    rss_before = process_rss_mb()
    resident = engine.pool.ensure_loaded(name)
    rss_loaded = process_rss_mb()
    if settings.warmup:
        engine_run(engine, settings.queries[0], 0, params, name)
    runs = []
    for _ in range(settings.iterations):
        # Query-major within an iteration, so no query follows itself and hits the prompt cache.
        for index, prompt in enumerate(settings.queries):
            runs.append(engine_run(engine, prompt, index, params, name))
            progress(1)
    result = summarize_runs(runs, len(settings.queries))
    result["memory"] = {
        "rss_before_load_mb": round(rss_before, 1),
        "rss_after_load_mb": round(rss_loaded, 1),
        "load_delta_mb": round(rss_loaded - rss_before, 1),
        "load_s": round(resident.load_seconds, 3),
        "rss_after_run_mb": round(process_rss_mb(), 1),
        "estimated_mb": round(resident.estimated_mb, 1),
    }
    return result


def unload_model(engine, name: str, memory: dict[str, Any]) -> None:
    from ..memory import process_rss_mb

    engine.pool.unload(name)
    memory["rss_after_unload_mb"] = round(process_rss_mb(), 1)
    memory["released_mb"] = round(memory["rss_after_run_mb"] - memory["rss_after_unload_mb"], 1)


# -- router overhead ----------------------------------------------------------------------

def _direct_run(llama, prompt: str, index: int, params: GenerationParams,
                with_processor: bool) -> Run:
    kwargs: dict[str, Any] = {}
    if with_processor:
        from llama_cpp import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([lambda _ids, scores: scores])
    started = time.perf_counter()
    first = None
    pieces = 0
    # ``params`` carries the same sampling the router arm uses (measure_overhead).
    for chunk in llama.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=params.max_tokens,
        seed=params.seed, stop=None, stream=True, **params.sampling(), **kwargs,
    ):
        if chunk["choices"][0].get("delta", {}).get("content"):
            if first is None:
                first = time.perf_counter() - started
            pieces += 1
    return Run(model="direct", prompt_index=index, tokens=pieces, pieces=pieces,
               latency_s=time.perf_counter() - started, ttft_s=first)


def measure_overhead(engine, name: str, settings: BenchSettings, params: GenerationParams,
                     progress: Progress) -> dict[str, Any]:
    """A/B(/C) on one loaded llama_cpp instance; arms alternate order each round.

    Throughput on every arm counts streamed text pieces over wall time from the call's
    start (routing included for the router), so the arms are measured alike. The KV cache
    is reset before every call so no arm gets another's prompt for free.
    """
    with engine.pool.use(name) as resident:
        llama = getattr(resident.model, "llama", None)
    if llama is None:
        return {"model": name, "skipped": f"model {name!r} is not a llama_cpp model"}

    def router_arm(prompt, index):
        run = engine_run(engine, prompt, index, params, name, routed=True)
        run.tokens = run.pieces
        return run

    # The direct arms sample as the router does: the model's defaults, then the built-in.
    sampled = params.with_defaults(engine.sampling_for(name)).with_defaults(BUILTIN_SAMPLING)
    arms: dict[str, Callable[[str, int], Run]] = {
        "router": router_arm,
        "direct": lambda p, i: _direct_run(llama, p, i, sampled, False),
        "direct_logits_processor": lambda p, i: _direct_run(llama, p, i, sampled, True),
    }
    order = list(arms)
    results: dict[str, list[Run]] = {arm: [] for arm in arms}
    rounds = 0
    for _ in range(settings.iterations):
        for index, prompt in enumerate(settings.queries):
            for arm in order:
                llama.reset()
                results[arm].append(arms[arm](prompt, index))
            order = order[1:] + order[:1]  # rotate who goes first
            rounds += 1
            progress(1)

    def arm_summary(runs: list[Run]) -> dict[str, Any]:
        tokens = sum(r.tokens for r in runs)
        seconds = sum(r.latency_s for r in runs)
        return {"tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_second": round(tokens / seconds, 2) if seconds else 0.0,
                "median_ttft_s": _r(statistics.median(r.ttft_s or 0.0 for r in runs), 4)}

    def pair_ratios(arm: str) -> list[float]:
        return [a.tps / b.tps for a, b in zip(results[arm], results["direct"]) if b.tps > 0]

    summaries = {arm: arm_summary(runs) for arm, runs in results.items()}
    router_ratios = pair_ratios("router")
    processor_ratios = pair_ratios("direct_logits_processor")
    ttft_diff = [a.ttft_s - b.ttft_s for a, b in zip(results["router"], results["direct"])
                 if a.ttft_s is not None and b.ttft_s is not None]
    same_output = sum(a.pieces == b.pieces for a, b in zip(results["router"], results["direct"]))
    return {
        "model": name,
        "rounds": rounds,
        "arms": summaries,
        # Headline: the median of per-round ratios, robust to a noisy neighbour hitting one round.
        "ratio": _r(statistics.median(router_ratios), 4) if router_ratios else None,
        "ratio_aggregate": _r(summaries["router"]["tokens_per_second"]
                              / summaries["direct"]["tokens_per_second"], 4)
        if summaries["direct"]["tokens_per_second"] else None,
        "logits_processor_ratio": _r(statistics.median(processor_ratios), 4)
        if processor_ratios else None,
        "ttft_diff_ms": _r(statistics.median(ttft_diff) * 1000, 2) if ttft_diff else None,
        "same_length_rounds": same_output,
    }


# -- dual strategy ------------------------------------------------------------------------

def measure_dual(engine, baseline: str, settings: BenchSettings, params: GenerationParams,
                 progress: Progress) -> dict[str, Any]:
    """Replay the mix routed by the plugins and all to ``baseline``, request by request."""
    routed: list[Run] = []
    single: list[Run] = []
    decisions = [engine.route(ChatRequest.from_prompt(p)).model for p in settings.mix]
    for model in sorted(set(decisions) | {baseline}):
        engine.pool.ensure_loaded(model)
        engine_run(engine, settings.mix[0], 0, params, model)  # warm-up, not counted
    flip = False
    for _ in range(settings.mix_iterations):
        for index, prompt in enumerate(settings.mix):
            pair = [("routed", lambda: engine_run(engine, prompt, index, params, routed=True)),
                    ("single", lambda: engine_run(engine, prompt, index, params, baseline))]
            for kind, fn in (reversed(pair) if flip else pair):
                (routed if kind == "routed" else single).append(fn())
            flip = not flip
            progress(1)

    def strategy(runs: list[Run]) -> dict[str, Any]:
        latencies = [r.latency_s for r in runs]
        tokens = sum(r.tokens for r in runs)
        seconds = sum(latencies)
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.model] = counts.get(r.model, 0) + 1
        return {
            "requests": len(runs),
            "mean_latency_s": _r(mean(latencies), 3),
            "p50_latency_s": _r(percentile(latencies, 50), 3),
            "p95_latency_s": _r(percentile(latencies, 95), 3),
            "mean_ttft_s": _r(mean(r.ttft_s for r in runs if r.ttft_s is not None), 4),
            "tokens_per_second": _r(tokens / seconds, 2) if seconds else 0.0,
            "mean_tokens_per_second": _r(mean(r.tps for r in runs), 2),
            "mean_tokens": _r(tokens / len(runs), 1) if runs else 0.0,
            "share": {m: round(c / len(runs), 4) for m, c in sorted(counts.items())},
        }

    routed_s, single_s = strategy(routed), strategy(single)
    return {
        "residency": measure_residency(engine, settings, params, progress),
        "baseline_model": baseline,
        "mix": settings.mix_source,
        "prompts": len(settings.mix),
        "iterations": settings.mix_iterations,
        "routes": decisions,
        "routed": routed_s,
        "single": single_s,
        "latency_speedup": _r(single_s["mean_latency_s"] / routed_s["mean_latency_s"], 3)
        if routed_s["mean_latency_s"] else None,
        "throughput_speedup": _r(routed_s["tokens_per_second"] / single_s["tokens_per_second"], 3)
        if single_s["tokens_per_second"] else None,
    }


# -- speech -------------------------------------------------------------------------------

def measure_speech(engine, settings: BenchSettings, params: GenerationParams,
                   progress: Progress) -> dict[str, Any]:
    """Each clip as a spoken request (no typed text) through the Engine: transcribed,
    routed on what was said, answered. The speech model's load is timed apart (the first
    call pays it); a warm-up transcription is not counted unless ``--no-warmup``."""
    from ..engine import Completion
    from ..types import AudioInput

    clips = []
    load_s = None
    plugin = None
    for label, data in settings.audio:
        request = ChatRequest(messages=({"role": "user", "content": ""},),
                              audio=AudioInput(data=data, source=label))
        if settings.warmup:
            warm = engine.transcribe(request.audio, request)
            load_s = warm.load_seconds if load_s is None else load_s
        runs = []
        for _ in range(settings.iterations):
            decision = engine.decide(request)
            engine.ensure_present(decision.model)
            transcript = decision.transcript
            if transcript is None:
                raise BenchError(f"{label}: the routed model {decision.model!r} takes audio "
                                 "itself; nothing was transcribed to measure")
            if load_s is None:
                load_s = transcript.load_seconds
            plugin = transcript.plugin
            completion = Completion(decision=decision)
            for _ in engine.stream(request, decision, params, completion):
                pass
            runs.append((transcript, completion))
            progress(1)
        seconds = [t.seconds - t.load_seconds for t, _ in runs]
        generation = [c.timings.generation_s for _, c in runs]
        tokens = sum(c.usage.completion_tokens for _, c in runs)
        first, last = runs[0][0], runs[-1]
        clips.append({
            "clip": label,
            "duration_s": _r(first.duration, 3),
            "language": first.language,
            "language_probability": _r(first.language_probability, 3),
            "text": first.text,
            "model": last[1].decision.model,
            "reason": last[1].decision.reason,
            "transcriptions": len(runs),
            "mean_transcribe_s": _r(mean(seconds), 3),
            "min_transcribe_s": _r(min(seconds), 3),
            "real_time_factor": _r(mean(seconds) / first.duration, 3) if first.duration else None,
            "mean_generation_s": _r(mean(generation), 3),
            "tokens_per_second": _r(tokens / sum(generation), 2) if sum(generation) else None,
            "load_s": _r(max(c.timings.load_s for _, c in runs), 3),
        })
    total_audio = sum(c["duration_s"] for c in clips)
    total_transcribe = sum(c["mean_transcribe_s"] for c in clips)
    settings_used = dict(engine.config.plugin_config("whisper"))
    return {
        "plugin": plugin,
        "settings": settings_used,
        "load_s": _r(load_s, 3),
        "clips": clips,
        "real_time_factor": _r(total_transcribe / total_audio, 3) if total_audio else None,
    }


def measure_residency(engine, settings: BenchSettings, params: GenerationParams,
                      progress: Progress) -> dict[str, Any]:
    """The mix routed with the heuristic's ``borderline_margin``/``sticky_turns`` as
    configured and with both off, each arm from the same pool (every unpinned model
    unloaded first), counting the pool's load events; latency includes the loads.

    The mix is replayed as one conversation: each request carries the models that
    answered the arm's earlier requests (``previous_models``), not their text. Skipped
    (with a note) when both options are off.
    """
    from ..engine import Completion
    from ..evaluation import residency_settings, with_heuristic
    from ..router import Router

    try:
        options = residency_settings(engine.config)
    except (KeyError, SaraiError):
        options = {}
    if not any(options.values()):
        return {"skipped": "borderline_margin and sticky_turns are off in [plugins.heuristic]"}
    blind = Router(with_heuristic(engine.config, **dict.fromkeys(options, 0)),
                   plugins=engine.router.plugins, residency=engine.pool.residency)
    arms = {"with": engine.router, "without": blind}
    out: dict[str, Any] = {"settings": options, "cache": {
        "max_loaded": engine.config.cache.max_loaded,
        "pinned": sorted(n for n, spec in engine.config.models.items() if spec.pinned)}}
    for label, router in arms.items():
        for row in engine.pool.residents():
            if not row["pinned"]:
                engine.pool.unload(row["name"])
        events: list[Any] = []
        engine.hooks.subscribe(events.append, "study")
        runs: list[Run] = []
        answered: list[str] = []
        kinds: list[str] = []  # each decision's reason up to its colon ("sticky", ...)
        try:
            for _ in range(settings.mix_iterations):
                for index, prompt in enumerate(settings.mix):
                    request = ChatRequest.from_prompt(prompt, previous_models=tuple(answered))
                    started = time.perf_counter()
                    decision = router.route(request)
                    kinds.append(decision.reason.split(":", 1)[0])
                    completion = Completion(decision=decision)
                    first = None
                    for _piece in engine.stream(request, decision, params, completion):
                        if first is None:
                            first = time.perf_counter() - started
                    runs.append(Run(model=completion.decision.model, prompt_index=index,
                                    tokens=completion.usage.completion_tokens, pieces=0,
                                    latency_s=time.perf_counter() - started, ttft_s=first,
                                    load_s=completion.timings.load_s))
                    answered.append(completion.decision.model)
                    progress(1)
        finally:
            engine.hooks.unsubscribe(events.append)
        loads: dict[str, int] = {}
        for event in events:
            if event.kind == "model_loaded":
                loads[event.model] = loads.get(event.model, 0) + 1
        latencies = [r.latency_s for r in runs]  # loads included
        out[label] = {
            "requests": len(runs),
            "load_events": loads,
            "load_events_total": sum(loads.values()),
            "load_s": _r(sum(r.load_s for r in runs), 3),
            "mean_latency_s": _r(mean(latencies), 3),
            "p50_latency_s": _r(percentile(latencies, 50), 3),
            "p95_latency_s": _r(percentile(latencies, 95), 3),
            "mean_ttft_s": _r(mean(r.ttft_s for r in runs if r.ttft_s is not None), 4),
            "models": answered,
            "reasons": kinds,
        }
    return out


# -- the whole study ----------------------------------------------------------------------

def planned_steps(settings: BenchSettings) -> int:
    per_model = len(settings.queries) * settings.iterations
    steps = per_model * len(settings.models)
    if settings.overhead:
        steps += per_model
    if settings.dual:
        steps += len(settings.mix) * settings.mix_iterations
        if settings.residency:
            steps += 2 * len(settings.mix) * settings.mix_iterations
    steps += len(settings.audio) * settings.iterations
    return steps


def run_bench(config: Config, settings: BenchSettings, targets: Targets,
              progress: Progress = lambda n: None) -> dict[str, Any]:
    from ..engine import Engine
    from ..memory import process_rss_mb

    report: dict[str, Any] = {
        "command": settings.command,
        "machine": machine_info(),
        "settings": {
            "models": list(settings.models), "queries": list(settings.queries),
            "iterations": settings.iterations, "max_tokens": settings.max_tokens,
            "seed": settings.seed, "temperature": settings.temperature,
            "warmup": settings.warmup, "mix": settings.mix_source,
            "mix_iterations": settings.mix_iterations,
            "audio": [label for label, _ in settings.audio],
        },
        "model_files": {name: model_info(config, name) for name in settings.models},
        "targets": attrs.asdict(targets),
    }
    started = time.perf_counter()
    report["decision"] = measure_decisions(config, settings.decision_seconds)
    params = GenerationParams(max_tokens=settings.max_tokens, temperature=settings.temperature,
                              seed=settings.seed)
    engine = Engine(config)
    rss_start = process_rss_mb()
    try:
        models: dict[str, Any] = {}
        for name in settings.models:
            models[name] = bench_model(engine, name, settings, params, progress)
            if settings.overhead and name == overhead_model(config, settings):
                report["overhead"] = measure_overhead(engine, name, settings, params, progress)
            unload_model(engine, name, models[name]["memory"])
        if models:
            slowest = min(models.values(), key=lambda m: m["mean_tokens_per_second"])
            for result in models.values():
                base = slowest["mean_tokens_per_second"]
                result["speedup"] = _r(result["mean_tokens_per_second"] / base, 3) if base else None
        report["models"] = models
        if settings.audio:
            report["speech"] = measure_speech(engine, settings, params, progress)
        if settings.dual and models:
            baseline = settings.baseline_model or min(
                models, key=lambda n: models[n]["mean_tokens_per_second"])
            report["dual"] = measure_dual(engine, baseline, settings, params, progress)
        report["memory"] = {
            "rss_at_start_mb": round(rss_start, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "per_model": {n: m["memory"] for n, m in models.items()},
        }
    finally:
        engine.close()
    report["memory"]["rss_at_end_mb"] = round(process_rss_mb(), 1)
    report["kpis"] = evaluate_kpis(report, targets)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["machine"]["load_average_end"] = None if load is None else [round(x, 2) for x in load]
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def direct_peer(config: Config, name: str) -> str | None:
    """The engine ``name`` can be measured against when called directly, if any.

    The bench is where the router meets its yardsticks, so it knows backends by name.
    """
    return "llama-cpp-python" if config.models[name].backend == "llama_cpp" else None


def overhead_model(config: Config, settings: BenchSettings) -> str | None:
    """The model to measure overhead on: chosen, else the first benched model with a peer."""
    if settings.overhead_model:
        return settings.overhead_model
    for name in settings.models:
        if direct_peer(config, name) is not None:
            return name
    return None


