"""The seed's routing rule, with its thresholds and model names from ``[plugins.heuristic]``.

1. An attached image or audio is a hard constraint: it goes to a model whose
   ``modalities`` list it (the ``multimodal_model`` first), whatever else the signals say.
2. Short, emotional conversation (empathy > threshold and fewer than ``max_chars``
   characters) goes to ``conversation_model``.
3. A multimodal keyword in the text ("imagen", "photo", ...) goes to ``multimodal_model``.
4. Everything else goes to ``[routing] default_model``.

Two options, both off by default, weigh what is loaded against rules 2-4 (never rule 1):

* ``sticky_turns = N`` (hysteresis): a conversation that moved to a model stays with it for
  the next N turns; ``request.previous_models`` says which model answered the earlier turns.
* ``borderline_margin = m``: a short text whose empathy is within m of the threshold goes
  to whichever of the two candidate models is loaded (or loading) when only one is.

A need the chosen model cannot meet (tools, JSON output, logprobs, context length) is still
settled after routing by the capability check, which moves the request to a model that can.

The settings used to live in ``[routing.heuristic]``; that table still works (with a
deprecation warning) and ``[plugins.heuristic]`` wins where both set a key.
"""

from __future__ import annotations

from typing import Iterator

import attrs

from ..errors import not_configured
from ..hookspecs import hookimpl
from ..types import Route
from .signals import DEFAULT_MULTIMODAL_KEYWORDS

TABLE = "heuristic"


@attrs.frozen
class HeuristicSettings:
    """``[plugins.heuristic]``."""

    empathy_threshold: float = 0.8
    max_chars: int = 200
    conversation_model: str = "fast"
    multimodal_model: str = "quality"
    multimodal_keywords: tuple[str, ...] = DEFAULT_MULTIMODAL_KEYWORDS
    borderline_margin: float = 0.0
    sticky_turns: int = 0

    def check(self, config) -> Iterator[tuple[str, str]]:
        names = set(config.models)
        for key in ("conversation_model", "multimodal_model"):
            target = getattr(self, key)
            if names and target not in names:
                yield key, f"routes to {not_configured(target, names)}"
        if not 0.0 <= self.empathy_threshold <= 1.0:
            yield "empathy_threshold", f"must be between 0 and 1, got {self.empathy_threshold}"
        if self.max_chars < 0:
            yield "max_chars", "must be >= 0"
        room = min(self.empathy_threshold, 1.0 - self.empathy_threshold)
        if not 0.0 <= self.borderline_margin <= 1.0:
            yield "borderline_margin", f"must be between 0 and 1, got {self.borderline_margin}"
        elif self.borderline_margin and self.borderline_margin >= room:
            # Every score on one side would be "borderline": routing by residency alone.
            yield "borderline_margin", (
                f"{self.borderline_margin} reaches 0 or 1 from empathy_threshold "
                f"{self.empathy_threshold}, so every score on that side would be borderline; "
                f"keep it below {room:.2f} (0.05-0.1 is typical)")
        if self.sticky_turns < 0:
            yield "sticky_turns", "must be >= 0"


@hookimpl(trylast=True)
def register_config_tables(register):
    register(TABLE, HeuristicSettings)


def _model_for_modality(modality, preferred, models):
    if preferred in models and models[preferred].supports(modality):
        return preferred
    for name, spec in models.items():
        if spec.supports(modality):
            return name
    return None


@hookimpl(trylast=True)
def select_route(request, signals, models, config, residency):
    rules = config.plugin_config(TABLE)
    threshold, max_chars = rules["empathy_threshold"], rules["max_chars"]
    multimodal_model = rules["multimodal_model"]
    modality = signals.get("modality", "text")
    empathy = float(signals.get("empathy") or 0.0)
    chars = int(signals.get("chars") or 0)

    if modality in ("image", "audio"):  # a hard constraint: stickiness and residency yield
        capable = _model_for_modality(modality, multimodal_model, models)
        if capable is None:
            return Route(
                multimodal_model,
                f"{modality} attached, but no configured model lists {modality!r} in its "
                f"modalities; chose multimodal_model",
            )
        return Route(capable, f"{modality} attached: {capable!r} is a model that takes {modality}")

    keywords = signals.get("multimodal_keywords") or []
    if keywords:
        otherwise = Route(
            multimodal_model,
            f"multimodal request: the text mentions {', '.join(map(repr, keywords))}",
        )
    else:
        otherwise = Route(config.routing.default_model, "no rule matched: the default model")
    short = chars < max_chars
    if empathy > threshold and short:
        chosen = Route(
            rules["conversation_model"],
            f"short emotional conversation: empathy {empathy:.2f} > {threshold} "
            f"and {chars} < {max_chars} chars",
        )
    else:
        chosen = otherwise

    sticky = _sticky(request, chosen, models, rules["sticky_turns"])
    if sticky is not None:
        return sticky
    margin = rules["borderline_margin"]
    if margin > 0 and short and abs(empathy - threshold) <= margin and residency is not None:
        return _borderline(chosen, rules["conversation_model"], otherwise.model, empathy,
                           threshold, margin, residency)
    return chosen


def _sticky(request, chosen: Route, models, turns: int) -> Route | None:
    """The previous model, while it has answered no more than ``turns`` turns in a row."""
    previous = getattr(request, "previous_model", None)
    if not turns or previous is None or previous == chosen.model or previous not in models:
        return None
    run = request.previous_run
    if run > turns:
        return None
    return Route(previous, f"sticky: {previous!r} answered this conversation's last "
                           f"{run} turn{'s' if run != 1 else ''} (sticky_turns {turns}); "
                           f"the rules alone say {chosen.model!r} ({chosen.reason})")


def _borderline(chosen: Route, conversation: str, otherwise: str, empathy: float,
                threshold: float, margin: float, residency) -> Route:
    """Within ``margin`` of the threshold, the candidate already in memory, if only one is."""
    if conversation == otherwise:
        return chosen
    warm = {name: _warm(residency, name) for name in (conversation, otherwise)}
    if warm[conversation] == warm[otherwise]:
        return chosen
    resident = conversation if warm[conversation] else otherwise
    if resident == chosen.model:
        return chosen
    cold = residency.get(chosen.model)
    saving = ("" if cold is None or cold.cold_load_seconds is None
              else f", which would load cold (~{cold.cold_load_seconds:.2f} s)")
    return Route(resident, f"borderline: empathy {empathy:.2f} is within {margin} of "
                           f"{threshold} and {resident!r} is {residency[resident].state}; "
                           f"the rules alone say {chosen.model!r}{saving}")


def _warm(residency, name: str) -> bool:
    state = residency.get(name)
    return state is not None and state.state in ("loaded", "loading")
