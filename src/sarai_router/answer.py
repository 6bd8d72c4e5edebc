"""One attempt's answer as it streams: what each delta does to the request's
``Completion`` (text, timings, usage, logprobs, tool calls, placement), and the runaway
guard and the time budget that may stop it. The engine makes one per attempt; the
blocking backends' caller thread (``runner.OnCaller``) feeds it the same way."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from .backend import Delta, GenerationParams, Usage
from .completion import Completion, Timings

if TYPE_CHECKING:
    from .plugins import Hooks
    from .runaway import RunawayGuard
    from .time_budget import TimeBudget

log = logging.getLogger("sarai_router.engine")


class Answer:
    """What one attempt's deltas do to ``completion``: text, timings, usage, logprobs and
    tool calls, and the runaway guard that may stop it (the same for the sync and the
    async paths)."""

    #: returned by :meth:`take` when the stream must be closed now
    END = object()
    #: pieces a backend may still send after being told to stop, before it is closed
    STOP_GRACE_PIECES = 8

    def __init__(self, completion: Completion, *, hooks: "Hooks", sampling: dict[str, Any],
                 guard: "RunawayGuard | None", budget: "TimeBudget | None"):
        self.hooks = hooks
        self.completion = completion
        self.model = completion.decision.model
        self.sampling = sampling  # the model's sampling defaults
        self.guard = guard
        self.budget = budget
        self.after_budget = 0
        self.stop = threading.Event()
        self.after_stop = 0
        self.gen_started = 0.0
        # An answer held to a shape (JSON, a tool call) is incomplete when cut early.
        self.shaped = False

    def params(self, params: GenerationParams) -> GenerationParams:
        """``params`` with the model's sampling defaults, and the guard's stop request."""
        self.shaped = bool(params.response_format is not None or params.tools)
        params = params.with_defaults(self.sampling)
        checks: dict[str, Any] = {}
        if self.guard is not None:
            checks["stop_check"] = self.stop.is_set
        if self.budget is not None:
            checks["time_budget"] = self.budget
        return attrs.evolve(params, **checks) if checks else params

    def dropped(self) -> None:
        self.completion.dropped = True
        self.hooks.emit("generation_dropped", self.model,
                               request_id=self.completion.request_id)

    def start(self, load_s: float) -> None:
        self.hooks.emit("generation_started", self.model,
                               request_id=self.completion.request_id, load_s=load_s)
        self.completion.timings = Timings(load_s=load_s)
        self.gen_started = time.perf_counter()
        if self.budget is not None:
            self.budget.start()

    def take(self, delta: Delta) -> Any:
        """The text to yield for ``delta`` (None: nothing), or END."""
        completion = self.completion
        # Before the text is yielded: a consumer reads the new logprobs with it.
        completion.logprobs.extend(delta.logprobs)
        if delta.usage is not None:
            completion.usage = delta.usage
            completion.finish_reason = delta.finish_reason
            completion.tool_calls = delta.tool_calls
        if delta.placement is not None:
            completion.placement = dict(delta.placement)
        if self.budget is not None and delta.usage is None and self.budget.exceeded():
            # Past the time bound: a backend that enforces it ends within a piece (its
            # usage counted); one that goes on is closed a few pieces later.
            self.after_budget += 1
            if self.after_budget > self.STOP_GRACE_PIECES:
                completion.usage = Usage(completion.usage.prompt_tokens,
                                         len(completion.pieces))
                return self.END
        if not delta.text:
            return None
        if self.stop.is_set():
            # Told to stop: what still comes is the tail of the loop. A backend that
            # ignores stop_check is closed after a few pieces (usage: the pieces seen).
            self.after_stop += 1
            if self.after_stop > self.STOP_GRACE_PIECES:
                completion.usage = Usage(completion.usage.prompt_tokens,
                                         len(completion.pieces))
                return self.END
            return None
        if completion.timings.first_token_s is None:
            completion.timings.first_token_s = time.perf_counter() - self.gen_started
        completion.pieces.append(delta.text)
        if self.guard is not None and self.guard.feed(delta.text):
            self.stop.set()
        return delta.text

    def end(self) -> None:
        completion = self.completion
        completion.timings.generation_s = time.perf_counter() - self.gen_started
        completion.text = "".join(completion.pieces)
        if self.budget is not None and self.budget.tripped:
            # Cut before its end, as max_tokens would: "length" says so.
            completion.stopped_by = "time_limit"
            completion.finish_reason = "length"
            log.warning("time limit stopped %s after %d tokens: %s", self.model,
                        completion.usage.completion_tokens, self.budget.reason)
            self.hooks.emit("time_limit_stopped", self.model,
                                   request_id=completion.request_id, reason=self.budget.reason)
            return
        if self.guard is not None and self.guard.tripped:
            completion.stopped_by = "runaway_guard"
            # A JSON or tool-call answer cut mid-way is not a finished one: "length" tells
            # the client not to parse it as complete, as when max_tokens cuts it.
            completion.finish_reason = "length" if self.shaped else "stop"
            log.info("runaway guard stopped %s after %d tokens: %s", self.model,
                     completion.usage.completion_tokens, self.guard.reason)
            self.hooks.emit("runaway_stopped", self.model,
                                   request_id=completion.request_id, reason=self.guard.reason)
