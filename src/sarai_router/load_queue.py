"""Who goes next when models can't all be resident: the pool's load queue.

When ``[cache] max_loaded`` or the RAM budget keeps a model out, a request for it waits
for room; meanwhile requests for the resident model keep coming. Two orders:

* ``"grouped"`` (the default): a request for a model that is resident (loaded or
  loading) uses it at once, ahead of the requests that wait for room to load another, so
  that one load serves every queued request for its model instead of models taking turns
  (llama-swap's "group by model"). Fairness: once a waiting request has been overtaken
  for ``max_queue_wait_seconds`` (counted from its arrival, or from the latest load if
  that came later: a load is the queue moving on), no request may join a resident model
  ahead of it any more; the resident finishes the generations it has, becomes idle, and
  the oldest waiting request's model is loaded.
* ``"fifo"``: arrival order across models. A request for a resident model waits behind
  every older request for another model (so two models that don't fit together take
  turns: a load per request when their requests alternate).

Among the requests waiting for room, the oldest makes room first (evicts); the others for
its model then join it like any request for a resident model. Requests for models that
are resident together never wait here: the queue only holds requests that wait for room
(and, in either order, those held back behind them).

Not thread-safe: the pool calls it under its lock.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import attrs

QUEUE_ORDERS = ("grouped", "fifo")


@attrs.define(eq=False)
class Ticket:
    """One request for ``model``, from its arrival at the pool until it uses the model."""

    seq: int
    model: str
    arrived: float
    #: why it waits now: "room" (to load its model) or "turn" (held back from a resident)
    waiting: str = ""


class LoadQueue:
    def __init__(self, order: str = "grouped", max_wait: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.order = order
        self.max_wait = max_wait
        self.clock = clock
        self._seq = itertools.count()
        #: tickets waiting now, by seq (arrival order)
        self.waiting: dict[int, Ticket] = {}
        #: how many times a request joined a resident model ahead of an older one that
        #: waited for room (the grouping at work)
        self.overtakes = 0
        #: tickets issued so far (requests that came through the pool's waiting path)
        self.issued = 0
        #: when the latest load for a request started
        self.last_load = 0.0
        #: the longest a waiting request had been overtaken (seconds, counted as for the
        #: fairness limit) when another request went ahead of it: at most ``max_wait``
        self.longest_overtaken = 0.0

    def ticket(self, model: str) -> Ticket:
        self.issued += 1
        return Ticket(next(self._seq), model, self.clock())

    def wait(self, ticket: Ticket, why: str) -> None:
        ticket.waiting = why
        self.waiting[ticket.seq] = ticket

    def leave(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            self.waiting.pop(ticket.seq, None)
            ticket.waiting = ""

    def may_join(self, ticket: Ticket | None, model: str) -> bool:
        """Whether a request (``ticket``; None: one that just arrived) may use ``model``,
        which is resident, now."""
        seq = ticket.seq if ticket is not None else None
        # Older requests for another model: waiting for room, or held back themselves.
        older = [t for t in self.waiting.values()
                 if t.model != model and (seq is None or t.seq < seq)]
        if not older:
            return True
        if self.order == "fifo":
            return False
        if any(self.overdue(t) for t in older):
            return False
        self.overtakes += 1
        now = self.clock()
        self.longest_overtaken = max(self.longest_overtaken, *(
            now - max(t.arrived, self.last_load) for t in older))
        return True

    def overdue(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` may be overtaken no more: in ``grouped``, it was overtaken for
        ``max_wait`` since it arrived or since the latest load (a switch of models is its
        queue moving on), whichever is later; in ``fifo``, always."""
        if self.order == "fifo":
            return True
        return self.clock() - max(ticket.arrived, self.last_load) >= self.max_wait

    def loading(self) -> None:
        """A request's model is being loaded: the models switch."""
        self.last_load = self.clock()

    def may_make_room(self, ticket: Ticket | None) -> bool:
        """Whether ``ticket`` is the next to evict for its load: the oldest waiting for
        room (None, a load that is no request, such as a pinned model's: always)."""
        if ticket is None:
            return True
        return not any(t.waiting == "room" and t.seq < ticket.seq
                       for t in self.waiting.values())
