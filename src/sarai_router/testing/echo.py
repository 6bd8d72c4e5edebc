"""The ``echo`` backend: a test backend that answers with the last user message, token by
token. For routing and plugin tests only: the testing kit registers it, never the defaults.

A token is a word with the spaces after it (``"hello world"`` streams ``"hello "``,
``"world"``). ``max_tokens`` (the request's, else the model's) cuts the answer, finish
reason ``"length"``; otherwise it ends with ``"stop"``. Usage counts the same tokens:
the prompt's (every message's words) and the answer's. Its keys in ``[models.NAME]``:
``delay_seconds`` (a pause before each token, to hold a request open) and
``concurrency`` (generations one instance takes at once, default 1).
"""

from __future__ import annotations

import re
import time
from typing import Any, Iterator, Mapping, Sequence

import attrs

from ..backend import Backend, Capabilities, Delta, GenerationParams, Usage
from ..hookspecs import hookimpl

__all__ = ["ECHO_BACKEND", "EchoBackend", "EchoModel", "EchoSettings", "echo_plugin", "tokens"]

ECHO_BACKEND = "echo"
_TOKEN = re.compile(r"\S+\s*|\s+")


def tokens(text: str) -> list[str]:
    """``text`` as the echo backend streams it: words, each with the spaces after it."""
    return _TOKEN.findall(text)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, Mapping) and part.get("type") == "text")
    return ""


@attrs.frozen
class EchoSettings:
    delay_seconds: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    concurrency: int = attrs.field(default=1, validator=attrs.validators.ge(1))


class EchoModel:
    """A loaded echo model: no file, no weights, the same answer every time."""

    def __init__(self, max_tokens: int, delay_seconds: float = 0.0):
        self.max_tokens = max_tokens
        self.delay_seconds = delay_seconds
        self.closed = False

    def chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
             images=(), audio=None) -> Iterator[Delta]:
        users = [m for m in messages if m.get("role") == "user"]
        answer = tokens(_text(users[-1].get("content")) if users else "")
        limit = params.max_tokens or self.max_tokens
        prompt_tokens = sum(len(tokens(_text(m.get("content")))) for m in messages)
        sent = 0
        for piece in answer[:limit]:
            if params.stop_check is not None and params.stop_check():
                break
            if self.delay_seconds:
                time.sleep(self.delay_seconds)
            sent += 1
            yield Delta(piece)
        finish = "length" if sent < len(answer) else "stop"
        yield Delta("", finish_reason=finish, usage=Usage(prompt_tokens, sent))

    def close(self) -> None:
        self.closed = True


class EchoBackend(Backend):
    settings_class = EchoSettings

    def load(self, spec) -> EchoModel:
        settings = spec.settings or EchoSettings()
        return EchoModel(spec.max_tokens, settings.delay_seconds)

    def concurrency(self, spec) -> int:
        return (spec.settings or EchoSettings()).concurrency

    def capabilities(self, spec) -> Capabilities:
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx)


class _EchoPlugin:
    """The plugin that registers the ``echo`` backend."""

    @hookimpl
    def register_backends(self, register) -> None:
        register(ECHO_BACKEND, EchoBackend())


echo_plugin = _EchoPlugin()
