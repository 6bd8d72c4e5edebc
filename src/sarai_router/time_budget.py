"""The time bound of one answer: how long it may hold its model.

A model instance answers one request at a time, so one answer that takes minutes keeps
every other request to that model waiting. Two bounds (``[generation]``, overridable per
model), both 0 for none:

* ``max_request_seconds``: the whole generation, from the moment the model is ours.
* ``max_token_sampling_seconds``: the time spent *choosing* one token (not computing the
  model's logits): in practice a grammar's work (JSON output, tool calls), which an
  ambiguous pattern can make cost seconds per token while the model itself needs
  milliseconds.

The engine checks ``exceeded`` between the pieces it receives (any backend); the
``llama_cpp`` backend also checks it before each token it samples and reports each
sampling's duration (``add_sampling``), so a constrained answer that yields nothing until
its end (a tool call) is stopped too. Past a bound the answer ends with finish_reason
"length" and ``stopped_by: "time_limit"``; the model is free at once.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["OverBudget", "TimeBudget"]


class OverBudget(Exception):
    """Raised inside a backend's generation loop to end it: the budget is spent."""


class TimeBudget:
    def __init__(self, *, max_seconds: float = 0.0, max_token_sampling_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_seconds < 0 or max_token_sampling_seconds < 0:
            raise ValueError("time bounds must be >= 0 (0: none)")
        self.max_seconds = max_seconds
        self.max_token_sampling_seconds = max_token_sampling_seconds
        self._clock = clock
        self._started: float | None = None
        self.tripped = False
        #: what was exceeded, for the log and the trace
        self.reason = ""
        self.slowest_sampling_s = 0.0

    def start(self) -> None:
        self._started = self._clock()

    def elapsed(self) -> float:
        return 0.0 if self._started is None else self._clock() - self._started

    def add_sampling(self, seconds: float) -> None:
        """One token took ``seconds`` to choose; trips the budget past the per-token bound."""
        self.slowest_sampling_s = max(self.slowest_sampling_s, seconds)
        limit = self.max_token_sampling_seconds
        if limit and seconds > limit and not self.tripped:
            self.tripped = True
            self.reason = (f"choosing one token took {seconds:.1f} s (max_token_sampling_"
                           f"seconds = {limit:g}); the grammar is too costly")

    def exceeded(self) -> bool:
        """True once a bound is passed (and from then on)."""
        if self.tripped:
            return True
        if self.max_seconds and self._started is not None:
            elapsed = self.elapsed()
            if elapsed > self.max_seconds:
                self.tripped = True
                self.reason = (f"the answer ran {elapsed:.1f} s (max_request_seconds = "
                               f"{self.max_seconds:g})")
        return self.tripped

    def check(self) -> None:
        """Raise OverBudget once a bound is passed."""
        if self.exceeded():
            raise OverBudget(self.reason)
