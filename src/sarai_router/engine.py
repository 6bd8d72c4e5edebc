"""One routed request end to end, the same for every front end.

``Engine.prepare(request, model=None)`` is the request path: transcribe audio that no
model can take, route, check that the model can take the request, make its files present,
start pre-warms. ``Engine.astream`` then holds the model and streams the answer, timing
it: the one generation path, on an event loop. The server iterates it on its own loop; the
CLI, the chat REPL, the bench and eval reach it through ``Engine.stream``, which runs it on
the shared loop of :mod:`runner`. All of them only translate its errors (all
``SaraiError``) into their own output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from contextlib import AsyncExitStack, aclosing, contextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import attrs

from . import runner
from .backend import (Backend, GenerationParams, blocking_chat, model_deltas,
                      model_sampling)
from .completion import Completion, Timings
from .config import Config, ModelSpec
from .errors import (BackendError, CapabilityError, InstanceDead, PoolError, QueueFull,
                     SaraiError, TranscriptionUnavailable, UpstreamUnavailable, not_configured)
from .answer import Answer
from .events import begin_request
from .fetch import ensure_present
from .plugins import PluginSet
from .pool import ModelPool
from .router import EXPLICIT_PLUGIN, Router
from .runaway import RunawayGuard
from .time_budget import TimeBudget
from .types import AudioInput, ChatRequest, FallbackStep, RouteDecision, Transcript

log = logging.getLogger(__name__)

__all__ = ["CapabilityError", "Completion", "Engine", "Timings", "share_cores"]


class Engine:
    def __init__(self, config: Config, plugins: PluginSet | None = None, *,
                 report: Callable[[str], None] | None = None, progressbar=None,
                 **pool_options: Any):
        self.router = Router(config, plugins)
        self.config = config = self.router.config
        self.hooks = self.router.hooks
        self.pool = ModelPool(config, self.hooks, **pool_options)
        # Routing sees what this engine's pool holds (select_route's ``residency``).
        self.router.residency_provider = self.pool.residency
        #: Where fetch progress goes (the CLI prints it; a server logs it).
        self.report = report or (lambda message: log.info("%s", message))
        self.progressbar = progressbar
        self._sampling: dict[str, dict[str, Any]] = {}

    # -- the request path

    def prepare(self, request: ChatRequest, model: str | None = None, *, prewarm: bool = True,
                on_route: Callable[[RouteDecision], None] | None = None,
                cancel: threading.Event | None = None,
                queue_limit: int | None = None) -> RouteDecision:
        """Route ``request`` (or take ``model``), transcribing audio the model can't take,
        check the model can take it, make its files present, and start any pre-warms.
        Raises a ``SaraiError`` naming the problem.

        ``on_route`` hears the decision before any file is fetched (to say which model).
        A transcribed request's decision carries the ``transcript``; :meth:`stream` then
        gives the model the transcript instead of the audio (:meth:`model_request`).
        ``cancel`` and ``queue_limit`` apply to that transcription as to any other
        (:meth:`transcribe`).
        """
        begin_request()
        decision = self.decide(request, model=model, cancel=cancel, queue_limit=queue_limit)
        request = self.model_request(request, decision)
        decision = self.check_capabilities(decision, request)
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
        """Fetch ``name``'s files if its backend says they are missing and can be pulled.

        A resident model (loaded or loading) needs its files no more: one deleted or moved
        after the load must not make the model refuse requests it can still answer.
        """
        if self.pool.is_resident(name):
            return True
        spec = self.config.models.get(name)
        if spec is None:  # a resident a plugin added (the speech model) fetches its own
            return True
        presence = self.hooks.backend(spec.backend).presence(spec)
        return ensure_present(spec, presence, source=self.config.source, report=self.report,
                              progressbar=self.progressbar)

    def route(self, request: ChatRequest, model: str | None = None) -> RouteDecision:
        return self.router.route(request, model=model)

    def decide(self, request: ChatRequest, model: str | None = None, *,
               cancel: threading.Event | None = None,
               queue_limit: int | None = None) -> RouteDecision:
        """The routing decision for ``request``, its audio transcribed when needed.

        Audio goes to the model itself when the model takes it. Otherwise it is transcribed
        and the request routed on the typed text plus the transcript: before routing when
        no configured model lists ``"audio"`` (routing on an attachment nothing can take
        would be wasted), after routing when the chosen model doesn't (and routed again).
        """
        if request.audio is None:
            return self.route(request, model=model)
        if not any(self.takes_audio(name) for name in self.config.models):
            why = "no configured model takes audio"
        else:
            decision = self.route(request, model=model)
            if self.takes_audio(decision.model):
                return decision
            if decision.plugin != EXPLICIT_PLUGIN:
                try:  # routed: a model that takes audio gets it, if it can take the rest
                    moved = self.check_capabilities(decision, request)
                except CapabilityError:
                    moved = None
                if moved is not None and self.takes_audio(moved.model):
                    return moved
            why = (f"model {decision.model!r} (routed by {decision.plugin}: {decision.reason}) "
                   "does not take audio")
        transcript = self.transcribe(request.audio, request, why=why, cancel=cancel,
                                     queue_limit=queue_limit)
        decision = self.route(request.with_transcript(transcript), model=model)
        return attrs.evolve(decision, transcript=transcript)

    def transcribe(self, audio: AudioInput, request: ChatRequest | None = None, *,
                   language: str | None = None, why: str = "",
                   cancel: threading.Event | None = None,
                   queue_limit: int | None = None) -> Transcript:
        """Ask the ``transcribe`` plugins for ``audio``'s text; timed, with the plugin named.

        Raises AudioError for an unusable clip, TranscriptionUnavailable when nothing can
        transcribe (the message says why audio needed transcribing, and what to install).
        ``cancel``: set when nobody wants the transcript any more (the plugin then stops
        and raises Cancelled). ``queue_limit``: how many transcriptions may wait for the
        speech model besides the one it works on (:class:`QueueFull` past it; ``None``: no
        limit), as for a chat model.
        """
        request = request or ChatRequest(messages=(), audio=audio)

        @contextmanager
        def hold(spec: ModelSpec, backend: Backend, *,
                 cancel: threading.Event | None = cancel) -> Iterator[Any]:
            # A transcribing plugin's own model, as a resident of this engine's pool.
            self.pool.add_resident(spec, backend)
            with self.pool.use(spec.name, queue_limit=queue_limit, cancel=cancel) as resident:
                yield resident.model

        started = time.perf_counter()
        try:
            answer = self.hooks.transcribe(audio=audio, request=request, language=language,
                                           cancel=cancel, hold=hold)
        except TranscriptionUnavailable as exc:
            raise TranscriptionUnavailable(f"{why}, and {exc}" if why else str(exc)) from None
        if answer is None:
            raise TranscriptionUnavailable(
                (f"{why}, and " if why else "")
                + "no plugin transcribes audio (the default, 'whisper', may be disabled in "
                "[plugins] disable)")
        transcript = attrs.evolve(answer.value, plugin=answer.plugin,
                                  seconds=time.perf_counter() - started)
        self.hooks.emit("transcribed", language=transcript.language, seconds=transcript.seconds,
                        chars=len(transcript.text), plugin=transcript.plugin)
        return transcript

    @staticmethod
    def model_request(request: ChatRequest, decision: RouteDecision) -> ChatRequest:
        """What the model receives: ``request``, or its transcribed form when the decision
        transcribed its audio."""
        if decision.transcript is not None and request.audio is not None:
            return request.with_transcript(decision.transcript)
        return request

    def takes_audio(self, model: str) -> bool:
        """Whether ``model`` takes audio input, as its backend reports it."""
        return "audio" in self.router.capabilities(model).modalities

    def check_capabilities(self, decision: RouteDecision, request: ChatRequest) -> RouteDecision:
        """``decision``, or another model when the routed one cannot take ``request``
        (see :meth:`Router.ensure_capable`); CapabilityError when none can."""
        return self.router.ensure_capable(decision, request)

    async def astream(
        self, request: ChatRequest, decision: RouteDecision, params: GenerationParams,
        completion: Completion | None = None, *, queue_limit: int | None = None,
    ) -> AsyncIterator[str]:
        """Yield the answer's text pieces; ``completion`` holds usage and timings at the end.
        This is the one generation path: the server iterates it on its event loop, sync
        callers through :meth:`stream`.

        ``queue_limit``: see :meth:`ModelPool.use` (the server passes ``[server] queue_size``).
        Cancelling the consumer ends the generation between two pieces (the upstream
        request closed, a llama.cpp generation stopped on its thread) and frees the model's
        slot; a request still queued leaves the queue with ``completion.dropped`` set,
        without the model ever seeing its prompt.

        Unset sampling settings take the model's defaults (:meth:`sampling_for`). The
        runaway guard (``[generation]``) stops an answer that keeps repeating itself:
        ``completion.stopped_by`` is then ``"runaway_guard"`` and the finish reason "stop"
        ("length" for a JSON or tool-call answer, which is incomplete when cut).

        ``decision`` comes from :meth:`prepare`. When the model fails before its first
        piece (a load failure, or a remote endpoint that refused, answered 5xx or timed
        out), the next model of its ``fallbacks`` answers instead, and
        ``completion.decision`` says so; never once a piece was yielded.
        """
        completion = completion if completion is not None else Completion(decision=decision)
        request = self.model_request(request, decision)
        started = time.perf_counter()
        attempt = _Attempts(self, request, decision)
        while True:
            try:
                async with aclosing(self._attempt(
                        request, completion, params, queue_limit,
                        check_presence=attempt.count > 0)) as pieces:
                    async for text in pieces:
                        yield text
            except Exception as exc:
                # A piece went out (yielded here, or to a sync caller that computed the
                # tokens itself): too late for another model.
                if completion.pieces or not attempt.next(completion, exc):
                    raise _unwrap(exc) from None
                continue
            completion.timings.total_s = time.perf_counter() - started
            self._finished(completion)
            return

    def stream(
        self, request: ChatRequest, decision: RouteDecision, params: GenerationParams,
        completion: Completion | None = None, *, queue_limit: int | None = None,
    ) -> Iterator[str]:
        """:meth:`astream` for a caller without an event loop (the CLI, bench, eval): the
        generation runs on the shared loop (:mod:`runner`) and its pieces come here; a
        blocking model's tokens are computed on this thread itself. Closing this iterator
        (or Ctrl-C) stops the generation and returns once it has ended. A request
        cancelled while queued ends with no piece and ``completion.dropped`` set."""
        from .streaming import Done, Failed, Generation

        events: queue.SimpleQueue = queue.SimpleQueue()
        generation = Generation(self, request, decision, params, events.put,
                                queue_limit=queue_limit, completion=completion)
        # This thread waits anyway: a blocking model's tokens are computed here
        # (runner.OnCaller), not handed over one by one from a thread of their own.
        with runner.lending(generation.completion, events.put):
            generation.start(runner.loop())
        try:
            while True:
                event = events.get()
                if isinstance(event, runner.OnCaller):
                    yield from event.items()
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Done):
                    return
                yield event.text
        finally:
            generation.cancel()
            generation.join()

    async def _attempt(self, request: ChatRequest, completion: Completion,
                       params: GenerationParams, queue_limit: int | None, *,
                       check_presence: bool) -> AsyncIterator[str]:
        """One model's answer: its files, its slot, its deltas through :class:`Answer`."""
        name = completion.decision.model
        if check_presence:
            try:
                await runner.in_thread(lambda: self.ensure_present(name))
            except SaraiError as exc:
                raise _LoadFailed(exc) from exc
        spec = self.config.models[name]
        answer = Answer(completion, hooks=self.hooks, sampling=self.sampling_for(name),
                        guard=self.guard_for(spec), budget=self.budget_for(spec))
        params = answer.params(params)
        was_loaded = self.pool.is_loaded(name)
        async with AsyncExitStack() as stack:
            try:
                resident = await stack.enter_async_context(
                    self.pool.use(name, queue_limit=queue_limit))
            except asyncio.CancelledError:
                answer.dropped()  # cancelled while it waited: the model never saw it
                raise
            except QueueFull:
                raise
            except (BackendError, PoolError) as exc:
                raise _LoadFailed(exc) from exc
            answer.start(0.0 if was_loaded else resident.load_seconds)
            start = blocking_chat(resident.model, request, params)
            hand = runner.lent_thread(completion) if start is not None else None
            if hand is not None:  # Engine.stream: its caller's thread computes the tokens
                await runner.OnCaller(start, answer.take, end=Answer.END).run(hand)
                answer.end()
                return
            deltas = model_deltas(resident.model, request, params, name=name)
            # Closed on the way out, so a stopped generation ends before the slot is free.
            async with aclosing(deltas):
                async for delta in deltas:
                    text = answer.take(delta)
                    if text is Answer.END:
                        break
                    if text:
                        yield text
            answer.end()

    def _finished(self, completion: Completion) -> None:
        if completion.dropped:
            return
        timings, usage = completion.timings, completion.usage
        self.hooks.emit(
            "generation_finished", completion.decision.model, request_id=completion.request_id,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            ttft_s=timings.first_token_s, generation_s=timings.generation_s,
            total_s=timings.total_s,
            tokens_per_second=timings.tokens_per_second(usage.completion_tokens),
            finish_reason=completion.finish_reason, stopped_by=completion.stopped_by,
            placement=completion.placement)

    def sampling_for(self, name: str) -> dict[str, Any]:
        """What model ``name`` sets for sampling (:func:`backend.model_sampling`), read once."""
        cached = self._sampling.get(name)
        if cached is None:
            spec = self.config.models[name]
            backend = self.hooks.backend(spec.backend)
            try:
                cached = model_sampling(spec, backend)
            except Exception as exc:  # a recommendation is optional: never fail for it
                log.warning("model %s: could not read its recommended sampling: %s", name, exc)
                log.debug("sampling_defaults failed", exc_info=True)
                cached = model_sampling(spec, Backend())
            self._sampling[name] = cached
        return dict(cached)

    def guard_for(self, spec: ModelSpec) -> RunawayGuard | None:
        """A fresh runaway guard for one answer of ``spec``, or None when it is off."""
        if not self.config.runaway_guard_for(spec):
            return None
        generation = self.config.generation
        return RunawayGuard(min_chars=generation.runaway_min_chars,
                            max_chars=generation.runaway_max_chars,
                            repeats=generation.runaway_repeats)

    def budget_for(self, spec: ModelSpec) -> TimeBudget | None:
        """A fresh time budget for one answer of ``spec``, or None when it has no bound."""
        total, token = self.config.time_bounds_for(spec)
        if not total and not token:
            return None
        return TimeBudget(max_seconds=total, max_token_sampling_seconds=token)

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


class _LoadFailed(Exception):
    """A model could not be made ready (files, load): its fallbacks may answer."""

    def __init__(self, error: SaraiError):
        super().__init__(str(error))
        self.error = error


def _unwrap(exc: BaseException) -> BaseException:
    return exc.error if isinstance(exc, _LoadFailed) else exc


def fallback_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (raised before any piece) lets the next model answer; None if it doesn't."""
    if isinstance(exc, _LoadFailed):
        return "load_failed"
    if isinstance(exc, UpstreamUnavailable):
        return exc.reason
    return None


class _Attempts:
    """The models one request may still try: the routed model's fallback chain, each model
    that cannot take the request left out."""

    def __init__(self, engine: "Engine", request: ChatRequest, decision: RouteDecision):
        self.engine = engine
        self.request = request
        self.decision = decision
        self.count = 0
        self._chain: list[str] | None = None
        #: models already started again after their instance died under this request
        self._restarted: set[str] = set()

    def next(self, completion: Completion, exc: BaseException) -> bool:
        """Move ``completion`` to the next model after ``exc``; False when none is left
        (or ``exc`` is not a reason to fall back).

        An instance that died (``InstanceDead``: a crashed child) before the first piece is
        not the model's fault: the pool has dropped it, and the same model is tried once
        more on a fresh instance before any fallback.
        """
        current_model = completion.decision.model
        if isinstance(_unwrap(exc), InstanceDead) and current_model not in self._restarted:
            self._restarted.add(current_model)
            log.warning("model %s: %s; trying again on a new instance", current_model,
                        _unwrap(exc))
            completion.pieces.clear()
            completion.logprobs.clear()
            self.count += 1
            return True
        reason = fallback_reason(exc)
        if reason is None:
            return False
        router = self.engine.router
        if self._chain is None:
            self._chain = [name for name in router.fallback_chain(self.decision.model)
                           if not router.unmet_needs(name, self.request)]
        current = completion.decision
        tried = {current.model, *(s.from_model for s in current.fallbacks)}
        while self._chain and self._chain[0] in tried:
            self._chain.pop(0)
        if not self._chain:
            return False
        if len(current.fallbacks) >= self.engine.config.routing.max_fallbacks:
            log.warning("model %s could not answer (%s); no more fallbacks for this request "
                        "([routing] max_fallbacks = %d)", current.model, reason,
                        self.engine.config.routing.max_fallbacks)
            return False
        following = self._chain.pop(0)
        step = FallbackStep(from_model=current.model, to_model=following, reason=reason,
                            detail=str(_unwrap(exc)))
        log.warning("model %s could not answer (%s: %s); falling back to %s",
                    current.model, reason, step.detail, following)
        completion.decision = attrs.evolve(
            current, model=following, fallbacks=current.fallbacks + (step,),
            routed_model=current.routed_model or self.decision.model)
        completion.pieces.clear()
        completion.logprobs.clear()
        self.count += 1
        self.engine.hooks.emit("fallback", following, request_id=completion.request_id,
                               from_model=step.from_model, to_model=following, reason=reason)
        return True


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
