"""Run one generation in its own thread (or, for a remote model, as a task on the event
loop: ``AsyncGeneration``) and hand its pieces to whoever waits (the server's
event loop, the chat REPL's main thread), so that the waiter can stop it between tokens.

A llama.cpp generation is a blocking generator. Iterating it on the caller's thread would
block the server's event loop, and interrupting it with Ctrl-C could leave the model in
the middle of a token. Here the generator lives on one worker thread from start to end,
and a cancel flag, checked between pieces, closes it cleanly: the pool releases the
instance and the idle clock starts. The same flag takes a request that still waits for the
model out of the queue: it never reaches the model.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from contextlib import aclosing
from typing import Any, Callable

import attrs

from .backend import GenerationParams
from .engine import Completion, Engine
from .types import ChatRequest, RouteDecision


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


class _GenerationBase:
    """What a thread-run and a loop-run generation share: the request, the sink that
    hears every event, the completion filled in, and the cancel flag."""

    def __init__(
        self,
        engine: Engine,
        request: ChatRequest,
        decision: RouteDecision,
        params: GenerationParams,
        sink: Callable[[Event], Any],
        *,
        queue_limit: int | None = None,
    ):
        self.engine = engine
        self.request = request
        self.decision = decision
        self.params = params
        self.sink = sink
        self.queue_limit = queue_limit
        self.completion = Completion(decision=decision)
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._sent_logprobs = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _piece(self, text: str) -> Piece:
        """``text`` with the logprobs the engine added for it (before yielding it)."""
        logprobs = tuple(self.completion.logprobs[self._sent_logprobs:])
        self._sent_logprobs += len(logprobs)
        return Piece(text, logprobs)


class Generation(_GenerationBase):
    """``engine.stream(...)`` on a worker thread; every event goes to ``sink``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._launched = False
        # In the caller's context: the request's id reaches the events emitted on the thread.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"sarai-gen-{self.decision.model}", daemon=True)

    def start(self) -> "Generation":
        self._launched = True
        try:
            self._thread.start()
        except KeyboardInterrupt:
            raise  # Thread.start() was waiting for a thread that exists: it will finish
        except BaseException:
            self._launched = False
            raise
        return self

    def cancel(self) -> None:
        """Stop after the current piece, or leave the queue now if the model has not started
        on it; the sink still gets ``Done(cancelled=True)``."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        self.engine.pool.wake()  # a request waiting for the model sees the flag at once

    @property
    def finished(self) -> bool:
        return not self._launched or self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to end; safe even if ``start()`` was interrupted by Ctrl-C."""
        if self._launched:
            self._finished.wait(timeout)

    def _run(self) -> None:
        try:
            self._generate()
        finally:
            self._finished.set()

    def _generate(self) -> None:
        produced = False
        stream = self.engine.stream(self.request, self.decision, self.params, self.completion,
                                    queue_limit=self.queue_limit, cancel=self._cancel)
        try:
            for text in stream:
                if self._cancel.is_set():
                    break
                produced = True
                self.sink(self._piece(text))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, never lost
            self.sink(Failed(exc, before_first_piece=not produced))
            return
        finally:
            stream.close()  # releases the model instance now, not at garbage collection
        self.sink(Done(self.completion, cancelled=self._cancel.is_set()))


class AsyncGeneration(_GenerationBase):
    """``engine.astream(...)`` as a task on the running event loop, for models whose backend
    streams asynchronously (a remote endpoint): no thread per answer. The same events and
    the same interface as :class:`Generation`; ``cancel()`` may be called from any thread
    and stops the upstream request at once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> "AsyncGeneration":
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())
        return self

    def cancel(self) -> None:
        self._cancel.set()
        if self._task is not None and self._loop is not None and not self._task.done():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop is closed: the task is gone with it
                pass

    @property
    def finished(self) -> bool:
        return self._task is None or self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the task to end (from a thread other than the loop's)."""
        if self._task is not None:
            self._finished.wait(timeout)

    async def _run(self) -> None:
        produced = False
        try:
            async with aclosing(self.engine.astream(
                    self.request, self.decision, self.params, self.completion,
                    queue_limit=self.queue_limit)) as pieces:
                async for text in pieces:
                    if self._cancel.is_set():
                        break
                    produced = True
                    self.sink(self._piece(text))
        except asyncio.CancelledError:
            pass  # cancel(): the upstream request is closed; say so below
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, never lost
            self.sink(Failed(exc, before_first_piece=not produced))
            return
        finally:
            self._finished.set()
        self.sink(Done(self.completion, cancelled=self._cancel.is_set()))
