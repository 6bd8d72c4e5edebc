"""The sampling settings: the ones a model sets in ``[models.NAME]`` and a request may
override, written once (:class:`Sampling`), with their ranges and the built-in values."""

from __future__ import annotations

from typing import Any, Mapping

import attrs


@attrs.frozen(kw_only=True)
class Sampling:
    """The sampling settings, ``None`` where unset. A model's table (``config.ModelSpec``)
    holds its defaults (unset: the model file's recommendation, else ``BUILTIN_SAMPLING``);
    a request's (``backend.GenerationParams``) override them."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


#: The sampling settings a model may set in ``[models.NAME]`` and a request may override.
SAMPLING_KEYS: tuple[str, ...] = tuple(field.name for field in attrs.fields(Sampling))

#: What an in-process backend uses for a setting that neither the request, the config nor
#: the model file gives (llama-cpp-python's own defaults, except temperature, which it puts
#: at 0.2). A remote backend sends only what is set and leaves the rest to its server.
BUILTIN_SAMPLING: Mapping[str, float] = {
    "temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0,
}

#: The range of each sampling setting (the OpenAI API's where it has one).
SAMPLING_RANGES: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0), "top_k": (0, 1_000_000), "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0), "repeat_penalty": (0.0, 10.0), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def sampling_problems(values: Any) -> list[str]:
    """``key: must be ...`` for each sampling setting of ``values`` out of its range."""
    problems = []
    for key, (low, high) in SAMPLING_RANGES.items():
        value = getattr(values, key, None)
        if value is not None and not low <= value <= high:
            problems.append(f"{key}: must be between {low:g} and {high:g}, got {value}")
    return problems
