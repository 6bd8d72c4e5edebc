"""One generation as a task on an event loop, its pieces handed to whoever waits (the
server's handler on the same loop, the chat REPL's main thread), so that the waiter can
stop it between tokens.

``Generation`` runs :meth:`Engine.astream` as a task: on the running loop when there is one
(the server), else on the shared loop of :mod:`runner` (the chat REPL). ``cancel()`` may be
called from any thread: it cancels the task, which closes the stream between two pieces (a
llama.cpp generation ends on its thread before the model's slot is freed; a remote request
is closed at once). A request that still waits for the model leaves the queue and never
reaches it.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Protocol

import attrs

from . import runner
from .backend import GenerationParams
from .completion import Completion
from .types import ChatRequest, RouteDecision

class Streamer(Protocol):
    """What a generation runs: :meth:`Engine.astream` (typed here rather than imported, so
    the engine, which starts generations, and this module don't import each other)."""

    def astream(self, request: ChatRequest, decision: RouteDecision, params: GenerationParams,
                completion: Completion | None = None, *, queue_limit: int | None = None
                ) -> AsyncIterator[str]: ...


@attrs.frozen
class Piece:
    text: str
    #: the tokens of ``text`` with their log probabilities (when the request asked)
    logprobs: tuple = ()


@attrs.frozen
class Done:
    completion: Completion
    cancelled: bool = False


@attrs.frozen
class Failed:
    error: BaseException
    #: True when no text had been produced yet (the answer can still be an error status).
    before_first_piece: bool


Event = Piece | Done | Failed


class Generation:
    """``engine.astream(...)`` as a task; every event goes to ``sink``, called on the loop."""

    def __init__(
        self,
        engine: Streamer,
        request: ChatRequest,
        decision: RouteDecision,
        params: GenerationParams,
        sink: Callable[[Event], Any],
        *,
        queue_limit: int | None = None,
        completion: Completion | None = None,
    ):
        self.engine = engine
        self.request = request
        self.decision = decision
        self.params = params
        self.sink = sink
        self.queue_limit = queue_limit
        self.completion = completion if completion is not None else Completion(decision=decision)
        self._cancel = threading.Event()
        self._finished = threading.Event()
        # The last event is being handed over: there is nothing left to stop.
        self._ending = False
        self._sent_logprobs = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> "Generation":
        """Start on ``loop`` (from any thread), else on the running loop, else on the shared
        loop of sync callers (:func:`runner.loop`)."""
        running = _running_loop()
        self._loop = loop or running or runner.loop()
        if self._loop is running:
            self._create()
        else:
            # Not waited for: the loop runs it in order, before a later cancel() there.
            self._loop.call_soon_threadsafe(self._create)
        return self

    def _create(self) -> None:
        self._task = self._loop.create_task(self._run())

    def cancel(self) -> None:
        """Stop after the current piece, or leave the queue now if the model has not started
        on it; the sink still gets ``Done(cancelled=True)``."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        if self._loop is None or self._ending:
            return
        if _running_loop() is self._loop:
            self._cancel_task()
        else:
            try:
                self._loop.call_soon_threadsafe(self._cancel_task)
            except RuntimeError:  # the loop is closed: the task is gone with it
                pass

    def _cancel_task(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def finished(self) -> bool:
        return self._loop is None or self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the task to end (from a thread other than its loop's)."""
        if self._loop is not None:
            self._finished.wait(timeout)

    def _piece(self, text: str) -> Piece:
        """``text`` with the logprobs the engine added for it (before yielding it)."""
        added = self.completion.logprobs
        if len(added) == self._sent_logprobs:  # the common case: none asked for
            return Piece(text)
        logprobs = tuple(added[self._sent_logprobs:])
        self._sent_logprobs += len(logprobs)
        return Piece(text, logprobs)

    async def _run(self) -> None:
        produced = False
        final: Event | None = None
        try:
            if self._cancel.is_set():  # cancelled before the task ran: nothing to stop
                raise asyncio.CancelledError
            async with aclosing(self.engine.astream(
                    self.request, self.decision, self.params, self.completion,
                    queue_limit=self.queue_limit)) as pieces:
                async for text in pieces:
                    produced = True
                    self.sink(self._piece(text))
        except asyncio.CancelledError:
            pass  # cancel(): the stream is closed; Done says so
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, never lost
            final = Failed(exc, before_first_piece=not produced)
        self._ending = True
        try:
            self.sink(final or Done(self.completion, cancelled=self._cancel.is_set()))
        finally:
            # After the last event: a waiter that joins finds every event in its queue.
            self._finished.set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
