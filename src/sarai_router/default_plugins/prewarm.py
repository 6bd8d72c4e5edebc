"""Default pre-warm policy: load the multimodal (quality) model early when a turn hints at it.

The seed's open item: predict which model will be needed and load it before the request
that needs it. When a request is answered by another model, the
``[plugins.heuristic] multimodal_model`` is not resident, and either

* the text mentions a multimodal keyword ("foto", "imagen", ...) yet routing chose another
  model (e.g. a short emotional message about a photo went to the conversation model), or
* the input is long (``chars >= [plugins.heuristic] max_chars``): long turns tend to lead
  to complex requests,

the quality model is loaded in the background, never evicting anything. The metrics count
how many of these guesses were used and how many were wasted (unloaded unused).
"""

from __future__ import annotations

from ..hookspecs import hookimpl


def wants_quality(signals, chars_threshold: int) -> str | None:
    """Why the signals point at the multimodal model, or ``None``."""
    keywords = signals.get("multimodal_keywords") or []
    if keywords:
        return f"mentions {', '.join(map(repr, keywords))}"
    chars = int(signals.get("chars") or 0)
    if chars >= chars_threshold:
        return f"long input ({chars} >= {chars_threshold} chars)"
    return None


@hookimpl(trylast=True)
def prewarm_models(signals, decision, loaded, models, config):
    rules = config.plugin_config("heuristic")
    target = rules.get("multimodal_model")
    if target not in models or target == decision.model or target in loaded:
        return None
    if wants_quality(signals, rules.get("max_chars", 200)) is None:
        return None
    return [target]
