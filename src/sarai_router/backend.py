"""What a model backend provides. Backends are registered by plugins (``register_backends``)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence

import attrs

from .config import ModelSpec
from .types import AudioInput, ImageInput


class BackendError(Exception):
    """A backend could not load a model or generate; the message says which and why."""


class ContextLengthError(BackendError):
    """The request does not fit the model's context window (bad input, not a fault)."""


@attrs.frozen
class GenerationParams:
    max_tokens: int | None = None  # None: the model's configured max_tokens
    temperature: float = 0.7
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_p: float = 0.95


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class Delta:
    """One streamed piece of an answer. The last one has ``finish_reason`` and ``usage``."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class LoadedModel(Protocol):
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams,
        *,
        images: Sequence[ImageInput] = (),
        audio: AudioInput | None = None,
    ) -> Iterator[Delta]:
        """Stream the answer to ``messages``; one generation at a time per instance."""

    def close(self) -> None:
        """Release the model's memory."""


class BackendFactory(Protocol):
    #: modalities this backend can take as input at all (a model narrows it in its config)
    modalities: tuple[str, ...]

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load ``spec``'s weights; raise BackendError with a clear message on failure."""
