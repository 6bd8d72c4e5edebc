"""What one generation produced: text, usage, timings, the decision of the model that
answered. Filled in by ``Engine.astream`` as the answer streams."""

from __future__ import annotations

from typing import Any

import attrs

from .backend import TokenLogprob, ToolCall, Usage
from .events import REQUEST_ID
from .types import RouteDecision

__all__ = ["Completion", "Timings"]


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

    #: the decision of the model that answers (changed by a fallback)
    decision: RouteDecision
    text: str = ""
    pieces: list[str] = attrs.field(factory=list)
    finish_reason: str | None = None
    usage: Usage = Usage(0, 0)
    timings: Timings = attrs.field(factory=Timings)
    #: the functions the model called (finish reason "tool_calls")
    tool_calls: tuple[ToolCall, ...] = ()
    #: the answer's tokens with their log probabilities, when the request asked
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    #: cancelled while queued: the model never saw the request
    dropped: bool = False
    #: what ended the answer early, when not the model: "runaway_guard", "time_limit"
    stopped_by: str | None = None
    #: the replica that answered, for a model with several (see ``Delta.placement``)
    placement: dict[str, Any] | None = None
    #: the request it answers (its events carry it): the front end's id, when it set one
    request_id: str = attrs.field(factory=REQUEST_ID.get)

    def to_dict(self) -> dict[str, Any]:
        transcript = self.decision.transcript
        return {
            "model": self.decision.model,
            "reason": self.decision.reason,
            "plugin": self.decision.plugin,
            "signals": dict(self.decision.signals),
            "transcript": None if transcript is None else transcript.to_dict(),
            "fallbacks": [step.to_dict() for step in self.decision.fallbacks],
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stopped_by": self.stopped_by,
            "placement": self.placement,
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
