"""What ``bench`` measures and against what: the built-in queries and mix, its settings,
the targets (KPIs) and their verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs

from ..config import BenchConfig
from ..errors import SaraiError

#: Five conversational queries, Spanish and English, as in the field report's study.
BUILTIN_QUERIES: tuple[str, ...] = (
    "Hola, ¿cómo estás? Hoy me siento un poco cansado y necesito hablar con alguien.",
    "Thank you so much for listening yesterday. I'm feeling much better today.",
    "Estoy preocupado por mi examen de mañana, ¿me das algún consejo para calmarme?",
    "I'm a bit lonely tonight. Can you tell me something nice about your day?",
    "¡Muchas gracias! Me alegra mucho haber terminado por fin mi proyecto.",
)

#: The default traffic mix: the five conversational queries, three plain questions and
#: two that mention an image, so the default rules send about 80 % to the fast model.
BUILTIN_MIX: tuple[str, ...] = BUILTIN_QUERIES + (
    "What is a good recipe for a quick vegetarian dinner?",
    "¿Cuál es la diferencia entre un río y un arroyo?",
    "Give me three ideas for a weekend trip near the mountains.",
    "Describe what you would expect to see in a photo of a busy market at night.",
    "Explica qué muestra un diagrama de flujo de un proceso de compra en línea.",
)

LONG_INPUT_CHARS = 2000


class BenchError(SaraiError):
    """The bench cannot run as asked (a bad option, an unusable model); the message says why."""


@attrs.frozen
class Targets:
    """KPI targets. A range is met at or above its lower bound; the upper is the expected ceiling."""

    tps_min: float
    tps_max: float | None
    p50_seconds: float
    speedup_min: float
    speedup_max: float | None
    ram_mb: float
    overhead_ratio: float
    rtf_max: float = 0.5
    decision_p99_ms: float = 5.0

    @classmethod
    def from_config(cls, bench: BenchConfig) -> "Targets":
        return cls(bench.target_tps_min, bench.target_tps_max, bench.target_p50_seconds,
                   bench.target_speedup_min, bench.target_speedup_max, bench.target_ram_mb,
                   bench.target_overhead_ratio, bench.target_rtf_max,
                   bench.target_decision_p99_ms)


def parse_range(text: str) -> tuple[float, float | None]:
    """``"7-15"`` -> (7.0, 15.0); ``"7"`` -> (7.0, None). Raise ValueError on anything else."""
    parts = text.strip().split("-")
    if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
        raise ValueError(f"{text!r} is not a number or a range like 7-15")
    try:
        low = float(parts[0])
        high = float(parts[1]) if len(parts) == 2 else None
    except ValueError:
        raise ValueError(f"{text!r} is not a number or a range like 7-15") from None
    if low < 0 or (high is not None and high < low):
        raise ValueError(f"{text!r}: the range must be non-negative and low-high")
    return low, high


def read_mix(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Prompts from a JSONL file: each line a string, or an object with ``prompt`` or ``text``."""
    prompts: list[str] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text"))
        if not isinstance(item, str) or not item.strip():
            raise BenchError(f'{path}:{number}: expected a string or {{"prompt": "..."}}, '
                             f"got {line.strip()[:60]}")
        prompts.append(item)
    if not prompts:
        raise BenchError(f"{path}: no prompts (one JSON string or {{\"prompt\": ...}} per line)")
    return tuple(prompts)


@attrs.frozen
class BenchSettings:
    models: tuple[str, ...]
    queries: tuple[str, ...] = BUILTIN_QUERIES
    iterations: int = 3
    max_tokens: int = 100
    seed: int = 42
    temperature: float = 0.7
    warmup: bool = True
    mix: tuple[str, ...] = BUILTIN_MIX
    mix_source: str = "built-in"
    mix_iterations: int = 1
    baseline_model: str | None = None  # dual strategy: None = the slowest model measured
    overhead_model: str | None = None  # None = the first llama_cpp model benched
    overhead: bool = True
    dual: bool = True
    decision_seconds: float = 1.0
    command: str = ""
    #: Audio clips for the speech section: (label, bytes).
    audio: tuple[tuple[str, bytes], ...] = ()
    #: the dual replay's residency arms run (set when [plugins.heuristic] turns them on)
    residency: bool = False


Progress = Callable[[int], None]



# -- KPIs ---------------------------------------------------------------------------------

def evaluate_kpis(report: Mapping[str, Any], targets: Targets) -> list[dict[str, Any]]:
    models = report["models"]
    rows: list[dict[str, Any]] = []

    def at_least(name, value, low, high, unit, source):
        if value is None:
            return
        target = f">= {low:g}{unit}" if high is None else f"{low:g}-{high:g}{unit}"
        note = "above the range" if high is not None and value > high else ""
        rows.append({"kpi": name, "value": value, "target": target, "met": value >= low,
                     "note": note, "source": source})

    def at_most(name, value, high, unit, source):
        if value is None:
            return
        rows.append({"kpi": name, "value": value, "target": f"<= {high:g}{unit}",
                     "met": value <= high, "note": "", "source": source})

    if models:
        fastest = max(models, key=lambda n: models[n]["mean_tokens_per_second"])
        at_least("fast model throughput (tok/s)", models[fastest]["mean_tokens_per_second"],
                 targets.tps_min, targets.tps_max, "", f"models.{fastest}")
        if len(models) > 1:
            at_least("speedup fastest vs slowest (x)", models[fastest]["speedup"],
                     targets.speedup_min, targets.speedup_max, "x", f"models.{fastest}.speedup")
    dual = report.get("dual")
    if dual:
        at_most("P50 latency, routed traffic (s)", dual["routed"]["p50_latency_s"],
                targets.p50_seconds, " s", "dual.routed")
    elif models:
        fastest = max(models, key=lambda n: models[n]["mean_tokens_per_second"])
        at_most("P50 latency, fast model (s)", models[fastest]["p50_latency_s"],
                targets.p50_seconds, " s", f"models.{fastest}")
    at_most("peak RSS (MB)", report["memory"]["peak_rss_mb"], targets.ram_mb, " MB",
            "memory.peak_rss_mb")
    overhead = report.get("overhead")
    if overhead and overhead.get("ratio") is not None:
        at_least("router/direct tok/s ratio", overhead["ratio"], targets.overhead_ratio, None,
                 "", "overhead.ratio")
    speech = report.get("speech")
    if speech and speech.get("real_time_factor") is not None:
        at_most("speech to text real-time factor", speech["real_time_factor"],
                targets.rtf_max, "", "speech.real_time_factor")
    decision = report.get("decision") or {}
    for key, label in (("short", "short input"), ("long", "2,000 chars")):
        if key in decision:
            at_most(f"routing decision p99, {label} (ms CPU)",
                    round(decision[key]["p99_us"] / 1000.0, 4), targets.decision_p99_ms, " ms",
                    f"decision.{key}.p99_us")
    return rows
