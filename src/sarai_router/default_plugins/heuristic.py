"""The seed's routing rule, with its thresholds and model names from ``[plugins.heuristic]``.

1. An attached image or audio is a hard constraint: it goes to a model whose
   ``modalities`` list it (the ``multimodal_model`` first), whatever else the signals say.
2. Short, emotional conversation (empathy > threshold and fewer than ``max_chars``
   characters) goes to ``conversation_model``.
3. A multimodal keyword in the text ("imagen", "photo", ...) goes to ``multimodal_model``.
4. Everything else goes to ``[routing] default_model``.

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
def select_route(request, signals, models, config):
    rules = config.plugin_config(TABLE)
    threshold, max_chars = rules["empathy_threshold"], rules["max_chars"]
    multimodal_model = rules["multimodal_model"]
    modality = signals.get("modality", "text")
    empathy = float(signals.get("empathy") or 0.0)
    chars = int(signals.get("chars") or 0)

    if modality in ("image", "audio"):
        capable = _model_for_modality(modality, multimodal_model, models)
        if capable is None:
            return Route(
                multimodal_model,
                f"{modality} attached, but no configured model lists {modality!r} in its "
                f"modalities; chose multimodal_model",
            )
        return Route(capable, f"{modality} attached: {capable!r} is a model that takes {modality}")

    if empathy > threshold and chars < max_chars:
        return Route(
            rules["conversation_model"],
            f"short emotional conversation: empathy {empathy:.2f} > {threshold} "
            f"and {chars} < {max_chars} chars",
        )

    keywords = signals.get("multimodal_keywords") or []
    if keywords:
        return Route(
            multimodal_model,
            f"multimodal request: the text mentions {', '.join(map(repr, keywords))}",
        )

    return Route(config.routing.default_model, "no rule matched: the default model")
