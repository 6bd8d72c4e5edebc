"""One routed request end to end: route, check capabilities, hold the model, stream, time it.

The CLI, the server, the chat REPL and the bench all go through ``Engine``.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Iterator

import attrs

from .backend import Delta, GenerationParams, Usage
from .config import Config
from .plugins import PluginSet
from .pool import ModelPool
from .router import Router, missing_modalities
from .types import ChatRequest, RouteDecision


class CapabilityError(Exception):
    """The chosen model cannot take what the request carries (an image, audio)."""


@attrs.define
class Timings:
    load_s: float = 0.0
    first_token_s: float | None = None  # from the start of generation, load excluded
    generation_s: float = 0.0
    total_s: float = 0.0

    def tokens_per_second(self, completion_tokens: int) -> float:
        return completion_tokens / self.generation_s if self.generation_s > 0 else 0.0


@attrs.define
class Completion:
    """Filled in while a generation streams; complete once the stream is exhausted."""

    decision: RouteDecision
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = Usage(0, 0)
    timings: Timings = attrs.field(factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.decision.model,
            "reason": self.decision.reason,
            "plugin": self.decision.plugin,
            "signals": dict(self.decision.signals),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
            },
            "timings": {
                "load_s": round(self.timings.load_s, 4),
                "first_token_s": None if self.timings.first_token_s is None
                else round(self.timings.first_token_s, 4),
                "generation_s": round(self.timings.generation_s, 4),
                "total_s": round(self.timings.total_s, 4),
                "tokens_per_second": round(
                    self.timings.tokens_per_second(self.usage.completion_tokens), 2),
            },
        }


class Engine:
    def __init__(self, config: Config, plugins: PluginSet | None = None, **pool_options: Any):
        self.config = config
        self.router = Router(config, plugins)
        self.hooks = self.router.hooks
        self.pool = ModelPool(config, self.hooks, **pool_options)

    def route(self, request: ChatRequest, model: str | None = None) -> RouteDecision:
        return self.router.route(request, model=model)

    def check_capabilities(self, decision: RouteDecision, request: ChatRequest) -> None:
        missing = missing_modalities(self.config, decision.model, request)
        if missing:
            spec = self.config.models[decision.model]
            raise CapabilityError(
                f"model {decision.model!r} cannot take {' or '.join(missing)} input: "
                f"[models.{decision.model}] modalities = {list(spec.modalities)} "
                f"(routed by {decision.plugin}: {decision.reason})"
            )

    def stream(
        self, request: ChatRequest, decision: RouteDecision, params: GenerationParams,
        completion: Completion | None = None, *, queue_limit: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text pieces; ``completion`` holds usage and timings at the end.

        ``queue_limit``: see :meth:`ModelPool.use` (the server passes ``[server] queue_size``).
        """
        self.check_capabilities(decision, request)
        completion = completion if completion is not None else Completion(decision=decision)
        started = time.perf_counter()
        was_loaded = self.pool.is_loaded(decision.model)
        with self.pool.use(decision.model, queue_limit=queue_limit) as resident:
            gen_started = time.perf_counter()
            if not was_loaded:
                completion.timings.load_s = resident.load_seconds
            pieces: list[str] = []
            delta: Delta
            deltas = resident.model.chat(
                request.messages, params, images=request.images, audio=request.audio
            )
            # Closed on the way out, so a stopped generation ends before the instance is free.
            with closing(deltas):
                for delta in deltas:
                    if delta.text:
                        if completion.timings.first_token_s is None:
                            completion.timings.first_token_s = time.perf_counter() - gen_started
                        pieces.append(delta.text)
                        yield delta.text
                    if delta.usage is not None:
                        completion.usage = delta.usage
                        completion.finish_reason = delta.finish_reason
            ended = time.perf_counter()
        completion.text = "".join(pieces)
        completion.timings.generation_s = ended - gen_started
        completion.timings.total_s = ended - started

    def complete(
        self, request: ChatRequest, params: GenerationParams = GenerationParams(),
        model: str | None = None,
    ) -> Completion:
        decision = self.route(request, model=model)
        completion = Completion(decision=decision)
        for _ in self.stream(request, decision, params, completion):
            pass
        return completion

    def prewarm_for(self, request: ChatRequest, decision: RouteDecision) -> list[str]:
        """Ask the ``prewarm_models`` plugins, and start loading what they name in the background."""
        loaded = {r["name"] for r in self.pool.residents()}
        started = []
        for name, plugin in self.hooks.prewarm_models(
            request=request, signals=decision.signals, decision=decision, loaded=loaded
        ):
            if name not in self.config.models:
                self.hooks.errors.append(
                    f"plugin {plugin!r} asked to pre-warm model {name!r}, which is not configured")
                continue
            if self.pool.prewarm(name, reason=f"asked by plugin {plugin!r}") is not None:
                started.append(name)
        return started

    def close(self) -> None:
        self.pool.close()
