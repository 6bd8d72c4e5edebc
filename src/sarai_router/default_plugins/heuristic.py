"""The seed's routing rule, with its thresholds and model names from ``[routing.heuristic]``.

1. An attached image or audio is a hard constraint: it goes to a model whose
   ``modalities`` list it (the ``multimodal_model`` first), whatever else the signals say.
2. Short, emotional conversation (empathy > threshold and fewer than ``max_chars``
   characters) goes to ``conversation_model``.
3. A multimodal keyword in the text ("imagen", "photo", ...) goes to ``multimodal_model``.
4. Everything else goes to ``[routing] default_model``.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..types import Route


def _model_for_modality(modality, preferred, models):
    if preferred in models and models[preferred].supports(modality):
        return preferred
    for name, spec in models.items():
        if spec.supports(modality):
            return name
    return None


@hookimpl(trylast=True)
def select_route(request, signals, models, config):
    rules = config.routing.heuristic
    modality = signals.get("modality", "text")
    empathy = float(signals.get("empathy") or 0.0)
    chars = int(signals.get("chars") or 0)

    if modality in ("image", "audio"):
        capable = _model_for_modality(modality, rules.multimodal_model, models)
        if capable is None:
            return Route(
                rules.multimodal_model,
                f"{modality} attached, but no configured model lists {modality!r} in its "
                f"modalities; chose multimodal_model",
            )
        return Route(capable, f"{modality} attached: {capable!r} is a model that takes {modality}")

    if empathy > rules.empathy_threshold and chars < rules.max_chars:
        return Route(
            rules.conversation_model,
            f"short emotional conversation: empathy {empathy:.2f} > {rules.empathy_threshold} "
            f"and {chars} < {rules.max_chars} chars",
        )

    keywords = signals.get("multimodal_keywords") or []
    if keywords:
        return Route(
            rules.multimodal_model,
            f"multimodal request: the text mentions {', '.join(map(repr, keywords))}",
        )

    return Route(config.routing.default_model, "no rule matched: the default model")
