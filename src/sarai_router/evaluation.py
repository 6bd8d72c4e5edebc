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
Nothing here loads a model: the cost estimate reads only GGUF headers (see
:func:`model_costs`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs

from .config import Config, ServerConfig
from .errors import AttachmentError
from .plugins import Hooks, build_plugins
from .types import (AudioInput, ChatRequest, ImageInput, Residency, ResidentInfo, _guess_mime,
                    read_attachment)

#: Where calibration's TOML snippet puts the heuristic's settings.
HEURISTIC_TABLE = "plugins.heuristic"
#: A case's image or clip is at most what ``serve`` takes in one body by default.
MAX_MEDIA_BYTES = ServerConfig().max_body_bytes


class CaseError(Exception):
    """A bad line in a case file; the message starts with ``FILE:LINE:``."""


@attrs.frozen
class Case:
    """One labelled request. ``line`` is 1-based in ``source``."""

    request: ChatRequest
    expect: str
    line: int
    source: str = ""
    kind: str = ""
    lang: str = ""
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    #: cases that share it are one conversation's turns, in file order ("" for none)
    conversation: str = ""

    @property
    def text(self) -> str:
        return self.request.text

    @property
    def media(self) -> bool:
        return bool(self.request.images) or self.request.audio is not None


# -- loading ------------------------------------------------------------------------------

def load_cases(path: str | os.PathLike[str], models: Iterable[str] | None = None) -> list[Case]:
    """Read a JSONL case file. ``models`` given: every ``expect`` must be one of them.

    Raises :class:`CaseError` naming the file and line of the first bad line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(f"{file}: file not found") from None
    except OSError as exc:
        raise CaseError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CaseError(f"{file}: not UTF-8 text (byte {exc.start}); a case file is JSONL"
                        ) from None
    known = None if models is None else sorted(models)
    cases = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cases.append(_parse_case(line, file, number, known))
    if not cases:
        raise CaseError(f"{file}: no cases (one JSON object a line)")
    return cases


def _parse_case(line: str, file: Path, number: int, known: list[str] | None) -> Case:
    where = f"{file}:{number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CaseError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise CaseError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    expect = raw.pop("expect", None)
    if not isinstance(expect, str) or not expect:
        raise CaseError(f"{where}: missing \"expect\" (the model this case should route to)")
    if known is not None and expect not in known:
        raise CaseError(f"{where}: \"expect\": unknown model {expect!r} "
                        f"(configured: {', '.join(known)})")
    prompt, messages = raw.pop("prompt", None), raw.pop("messages", None)
    if prompt is not None and messages is not None:
        raise CaseError(f"{where}: give \"prompt\" or \"messages\", not both")
    if prompt is None and messages is None:
        raise CaseError(f"{where}: missing \"prompt\" (or \"messages\")")
    if prompt is not None and not isinstance(prompt, str):
        raise CaseError(f"{where}: \"prompt\" must be a string, got {type(prompt).__name__}")
    if messages is not None:
        messages = _check_messages(messages, where)
    images = tuple(_read_image(p, file, where) for p in _path_list(raw.pop("images", None), where))
    audio_path = raw.pop("audio", None)
    if audio_path is not None and not isinstance(audio_path, str):
        raise CaseError(f"{where}: \"audio\" must be a path string")
    audio = None
    if audio_path is not None:
        data, resolved = _read_media(audio_path, file, where, "audio")
        audio = AudioInput(data=data, mime=_guess_mime(resolved, "audio/wav"), source=audio_path)
    conversation = raw.pop("conversation", "")
    if isinstance(conversation, bool) or not isinstance(conversation, (str, int)):
        raise CaseError(f"{where}: \"conversation\" must be a string or a number (an id "
                        "shared by the turns of one conversation)")
    if messages is None:
        request = ChatRequest.from_prompt(prompt, images=images, audio=audio)
    else:
        # As the server does: an assistant message's ``name`` is the model that answered it.
        answered = tuple(str(m.get("name") or "") for m in messages if m["role"] == "assistant")
        request = ChatRequest(messages=messages, images=images, audio=audio,
                              previous_models=answered if any(answered) else ())
    kind, lang = raw.pop("kind", ""), raw.pop("lang", "")
    return Case(request=request, expect=expect, line=number, source=str(file),
                kind=str(kind), lang=str(lang), extra=raw, conversation=str(conversation))


def _check_messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list) or not messages:
        raise CaseError(f"{where}: \"messages\" must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), (str, list))):
            raise CaseError(f"{where}: \"messages\"[{i}] must be an object with a string "
                            "\"role\" and a string or list \"content\"")
    if not any(m["role"] == "user" for m in messages):
        raise CaseError(f"{where}: \"messages\" has no \"user\" message to route")
    return tuple(messages)


def _path_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CaseError(f"{where}: \"images\" must be a list of path strings")
    return value


def _read_media(relative: str, file: Path, where: str, what: str) -> tuple[bytes, Path]:
    resolved = (file.parent / relative) if not Path(relative).is_absolute() else Path(relative)
    try:
        return read_attachment(resolved, MAX_MEDIA_BYTES), resolved
    except AttachmentError as exc:
        raise CaseError(f"{where}: {what} {relative!r}: {exc.problem} ({resolved}); paths are "
                        "relative to the case file's folder") from None


def _read_image(relative: str, file: Path, where: str) -> ImageInput:
    data, resolved = _read_media(relative, file, where, "image")
    return ImageInput(data=data, mime=_guess_mime(resolved, "image/png"), source=relative)


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
    if costs is None:
        costs = model_costs(config)
    from .router import RoutingError

    confusion: dict[str, Counter] = defaultdict(Counter)
    groups: dict[str, dict[str, list[int]]] = {"by_kind": defaultdict(lambda: [0, 0]),
                                                "by_lang": defaultdict(lambda: [0, 0])}
    misses, chosen_models = [], []
    pool = SimulatedPool(config, costs, reply_tokens, Hooks(router.plugins, config))
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
    source: str  # "estimate (GGUF header)" or "measured (bench report)"


def model_costs(config: Config, bench_report: Mapping[str, Any] | None = None
                ) -> dict[str, ModelCost]:
    """Per-model cost figures: measured from a ``sarai-router bench --json`` report where it
    has the model, else estimated from the GGUF header (weights and ``estimate_ram``).

    A model whose file can't be read and that the report lacks is left out.
    """
    from .gguf_info import GGUFError, estimate_ram, read_info

    measured = (bench_report or {}).get("models") or {}
    out = {}
    for name, spec in config.models.items():
        try:
            info = read_info(spec.path)
            ram = estimate_ram(info, spec.n_ctx, spec.n_batch)
            weights_gb = info.tensor_bytes / 1e9
            estimate = ModelCost(tokens_per_second=EST_BANDWIDTH_GBPS / max(weights_gb, 1e-3),
                                 load_s=weights_gb / EST_LOAD_GBPS, ram_mb=ram.total_mb,
                                 source="estimate (GGUF header)")
        except (GGUFError, OSError):
            estimate = None
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


# -- rendering ----------------------------------------------------------------------------

def render_text(report: Mapping[str, Any], *, max_misses: int | None = None) -> str:
    """A report for people: accuracy, precision/recall per model, confusion, groups, misses,
    cost."""
    lines = [f"accuracy: {report['accuracy']:.1%} ({report['correct']}/{report['cases']})", ""]
    models = report["models"]
    lines.append(_grid(["model", "expected", "chosen", "precision", "recall"],
                       [[m, r["expected"], r["chosen"], _pct(r["precision"]), _pct(r["recall"])]
                        for m, r in models.items()]))
    chosen_cols = sorted({c for row in report["confusion"].values() for c in row})
    lines += ["", "confusion (rows: expected, columns: chosen)",
              _grid(["expected \\ chosen", *chosen_cols],
                    [[e, *(row.get(c, 0) for c in chosen_cols)]
                     for e, row in report["confusion"].items()])]
    for key, title in (("by_kind", "kind"), ("by_lang", "lang")):
        table = report.get(key) or {}
        if len(table) > 1 or (table and "-" not in table):
            lines += ["", _grid([title, "cases", "right", "accuracy"],
                                [[k, v["cases"], v["correct"], _pct(v["accuracy"])]
                                 for k, v in table.items()])]
    misses = report["misses"]
    lines += ["", f"misses: {len(misses)}"]
    for miss in misses[:max_misses] if max_misses is not None else misses:
        prompt = miss["prompt"].replace("\n", " ")
        prompt = prompt if len(prompt) <= 90 else prompt[:87] + "..."
        score = ("" if miss.get("empathy") is None or "empathy" in miss["reason"]
                 else f"; empathy {miss['empathy']:.2f}")
        lines.append(f"  line {miss['line']}: expected {miss['expected']}, chose "
                     f"{miss['chosen']} ({miss['plugin']}: {miss['reason']}{score})")
        lines.append(f"    {prompt!r}")
    if max_misses is not None and len(misses) > max_misses:
        lines.append(f"  ... {len(misses) - max_misses} more (--json has them all)")
    cost = report.get("cost")
    if cost and "routed" in cost:
        lines += ["", f"estimated cost (local units; {cost['reply_tokens']} reply tokens a "
                  "request, back-to-back replay in file order):"]
        rows = []
        for label, row in cost.items():
            if isinstance(row, dict) and "requests" in row:
                loads = ", ".join(f"{m} {n}" for m, n in row["cold_loads"].items()) or "none"
                rows.append([label, row["mean_latency_s"], row["total_s"], loads,
                             row["ram_gb_s"]])
        lines.append(_grid(["strategy", "mean latency s", "total s", "cold loads", "RAM GB·s"],
                           rows))
        sources = {c["source"] for c in cost["models"].values()}
        lines.append("  model figures: " + "; ".join(
            f"{m} {c['tokens_per_second']:.1f} tok/s, load {c['load_s']:.2f} s, "
            f"{c['ram_mb']:.0f} MB" for m, c in cost["models"].items())
            + f" ({', '.join(sorted(sources))})")
    elif cost:
        lines += ["", f"estimated cost: unavailable ({cost.get('note')})"]
    residency = report.get("residency")
    if residency:
        options = ", ".join(f"{k} {v}" for k, v in residency["settings"].items())
        lines += ["", f"routing that knows what is loaded ({options}) against both off, "
                  "same replay:"]
        rows = []
        for label in ("with", "without"):
            row = residency[label]
            loads = ", ".join(f"{m} {n}" for m, n in (row["cold_loads"] or {}).items()) or "none"
            rows.append([label, _pct(row["accuracy"]), loads, row["mean_latency_s"],
                         row["total_s"]])
        lines.append(_grid(["", "accuracy", "cold loads", "mean latency s", "total s"], rows))
    return "\n".join(lines)


def render_calibration(result: Mapping[str, Any]) -> str:
    curve = result["curve"]
    models = sorted({m for row in curve for m in row["share"]})
    rows = [[r["empathy_threshold"], r["max_chars"], _pct(r["accuracy"]),
             *(_pct(r["share"][m]) for m in models), r["mean_latency_s"]] for r in curve]
    best = result["best"]
    target = result["target"] + (f" (accuracy >= {result['min_accuracy']:.0%})"
                                 if result["target"] == "latency" else "")
    latency = ("" if best["mean_latency_s"] is None
               else f", estimated mean latency {best['mean_latency_s']} s")
    current = result["current"]
    return "\n".join([
        _grid(["threshold", "max_chars", "accuracy", *(f"to {m}" for m in models),
               "mean latency s"], rows),
        "",
        f"target: {target}; best of {len(curve)} settings on {result['cases']} cases: "
        f"empathy_threshold {best['empathy_threshold']}, max_chars {best['max_chars']} "
        f"-> accuracy {best['accuracy']:.1%}{latency} "
        f"(current: {current['empathy_threshold']}, {current['max_chars']})",
        "",
        result["toml"].rstrip(),
    ])


def render_plot(curve: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Accuracy against the threshold, one line per ``max_chars``; and latency against
    accuracy. Needs matplotlib (``pip install 'sarai-router[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'sarai-router[bench]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for chars in sorted({r["max_chars"] for r in curve}):
        rows = sorted((r for r in curve if r["max_chars"] == chars),
                      key=lambda r: r["empathy_threshold"])
        left.plot([r["empathy_threshold"] for r in rows], [r["accuracy"] for r in rows],
                  marker=".", label=f"max_chars {chars}")
        if all(r["mean_latency_s"] is not None for r in rows):
            right.plot([r["mean_latency_s"] for r in rows], [r["accuracy"] for r in rows],
                       marker=".", label=f"max_chars {chars}")
    left.set_xlabel("empathy_threshold")
    left.set_ylabel("accuracy")
    left.set_title("accuracy vs threshold")
    left.legend(fontsize=7)
    right.set_xlabel("estimated mean latency per request (s)")
    right.set_ylabel("accuracy")
    right.set_title("accuracy vs latency")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _grid(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    table = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in table)


__all__ = ["Case", "CaseError", "ModelCost", "SimulatedPool", "calibrate", "evaluate",
           "heuristic_settings", "load_cases", "model_costs", "render_calibration",
           "render_plot", "render_text", "replay_cost", "residency_settings", "toml_snippet",
           "with_heuristic"]
