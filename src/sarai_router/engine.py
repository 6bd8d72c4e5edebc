"""One routed request end to end, the same for every front end.

``Engine.prepare(request, model=None)`` is the request path: route, check that the model
can take the request, make its files present, start pre-warms. ``Engine.stream`` then
holds the model and streams the answer, timing it. The CLI, the chat REPL, the server and
the bench all go through it, and only translate its errors (all ``SaraiError``) into their
own output.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from typing import Any, Callable, Iterator

import attrs

from .backend import Delta, GenerationParams, TokenLogprob, ToolCall, Usage
from .config import Config
from .errors import CapabilityError, not_configured
from .fetch import ensure_present
from .plugins import PluginSet
from .pool import ModelPool
from .router import Router, missing_modalities
from .types import ChatRequest, RouteDecision

log = logging.getLogger(__name__)

__all__ = ["CapabilityError", "Completion", "Engine", "Timings", "share_cores"]


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
    #: the functions the model called (finish reason "tool_calls")
    tool_calls: tuple[ToolCall, ...] = ()
    #: the answer's tokens with their log probabilities, when the request asked
    logprobs: list[TokenLogprob] = attrs.field(factory=list)

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
    def __init__(self, config: Config, plugins: PluginSet | None = None, *,
                 report: Callable[[str], None] | None = None, progressbar=None,
                 **pool_options: Any):
        self.router = Router(config, plugins)
        self.config = config = self.router.config
        self.hooks = self.router.hooks
        self.pool = ModelPool(config, self.hooks, **pool_options)
        #: Where fetch progress goes (the CLI prints it; a server logs it).
        self.report = report or (lambda message: log.info("%s", message))
        self.progressbar = progressbar

    # -- the request path

    def prepare(self, request: ChatRequest, model: str | None = None, *, prewarm: bool = True,
                on_route: Callable[[RouteDecision], None] | None = None) -> RouteDecision:
        """Route ``request`` (or take ``model``), check the model can take it, make its
        files present, and start any pre-warms. Raises a ``SaraiError`` naming the problem.

        ``on_route`` hears the decision before any file is fetched (to say which model).
        """
        decision = self.route(request, model=model)
        self.check_capabilities(decision, request)
        if on_route is not None:
            on_route(decision)
        self.ensure_present(decision.model)
        if prewarm:
            try:
                self.prewarm_for(request, decision)
            except Exception:  # a pre-warm is a guess: never fail the request for it
                log.exception("pre-warm failed")
        return decision

    def start(self) -> list[str]:
        """For long-running front ends: pinned models present and loaded, reaper running."""
        pinned = [name for name, spec in self.config.models.items() if spec.pinned]
        for name in pinned:
            self.ensure_present(name)
        self.pool.load_pinned()
        self.pool.start_reaper()
        return pinned

    def ensure_present(self, name: str) -> bool:
        """Fetch ``name``'s files if its backend says they are missing and can be pulled."""
        spec = self.config.models[name]
        presence = self.hooks.backend(spec.backend).presence(spec)
        return ensure_present(spec, presence, source=self.config.source, report=self.report,
                              progressbar=self.progressbar)

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
        ``decision`` comes from :meth:`prepare`.
        """
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
                    # Before the text is yielded: a consumer reads the new logprobs with it.
                    completion.logprobs.extend(delta.logprobs)
                    if delta.text:
                        if completion.timings.first_token_s is None:
                            completion.timings.first_token_s = time.perf_counter() - gen_started
                        pieces.append(delta.text)
                        yield delta.text
                    if delta.usage is not None:
                        completion.usage = delta.usage
                        completion.finish_reason = delta.finish_reason
                        completion.tool_calls = delta.tool_calls
            ended = time.perf_counter()
        completion.text = "".join(pieces)
        completion.timings.generation_s = ended - gen_started
        completion.timings.total_s = ended - started

    def complete(
        self, request: ChatRequest, params: GenerationParams = GenerationParams(),
        model: str | None = None,
    ) -> Completion:
        decision = self.prepare(request, model=model, prewarm=False)
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
                    not_configured(name, self.config.models, f"plugin {plugin!r} asked to pre-warm"))
                continue
            if self.pool.prewarm(name, reason=f"asked by plugin {plugin!r}") is not None:
                started.append(name)
        return started

    def close(self) -> None:
        self.pool.close()


def share_cores(config: Config) -> Config:
    """``n_threads = 0`` (all cores) becomes each model's share of the cores, for a server
    that runs models side by side: cores / min(``max_loaded``, number of models).

    llama.cpp's threads spin-wait, so two generations that each take every core slow each
    other to a crawl (1 tok/s seen on 2 cores), and even alone all cores cost the server
    ~10 ms a request against ~2 ms with its share (docs/serving.md). Only models whose
    backend computes on this machine are touched, and one that sets its threads keeps them.
    """
    from .plugins import Hooks, build_plugins

    plugin_set = config.plugin_set or build_plugins(config)
    hooks = Hooks(plugin_set, config)
    side_by_side = max(1, min(config.cache.max_loaded, len(config.models)))
    share = max(1, (os.cpu_count() or 1) // side_by_side)
    models = {}
    for name, spec in config.models.items():
        backend = hooks.backend(spec.backend)
        models[name] = backend.with_threads(spec, share) if backend.uses_threads(spec) else spec
    return attrs.evolve(config, models=models)
