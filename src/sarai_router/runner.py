"""The bridges between the async request path and code that blocks.

Every generation runs on an event loop (``Engine.astream``). Two kinds of code are not
async and meet it here, and only here:

* **sync callers** (``query``, the ``chat`` REPL, ``bench``, ``eval``, scripts) run their
  coroutines on one event loop that lives on a daemon thread of its own, started the first
  time it is needed and shared by the whole process (:func:`run`, :func:`submit`);
* **blocking work** that an async caller needs (a llama.cpp generation, a model load, a
  download) runs on a thread of its own (:func:`in_thread`, :func:`iterate_in_thread`);
* a **blocking iteration for a sync caller** (a llama.cpp generation that ``query`` or
  ``bench`` waits for) runs on that caller's own thread (:class:`OnCaller`): the caller
  lends its thread while it waits (:func:`lending`), and what the iteration yields reaches
  it with no hand-over between threads per item.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import threading
from contextlib import closing, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, TypeVar

from .errors import Cancelled

__all__ = ["OnCaller", "in_thread", "iterate_in_thread", "lending", "lent_thread", "loop", "run",
           "submit"]

_T = TypeVar("_T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The shared event loop of sync callers, started on its thread the first time."""
    global _loop
    with _lock:
        if _loop is None:
            new = asyncio.new_event_loop()
            threading.Thread(target=new.run_forever, name="sarai-loop", daemon=True).start()
            _loop = new
        return _loop


def submit(coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future:
    """Start ``coro`` on the shared loop; its future, which may be cancelled from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, _T], *, cancel: threading.Event | None = None) -> _T:
    """Run ``coro`` on the shared loop and wait for its result on this thread.

    ``cancel``: once set, the coroutine is cancelled and :class:`Cancelled` raised. Ctrl-C
    (KeyboardInterrupt) cancels it too. Either way this returns only once the coroutine has
    ended, so nothing it holds (a model's slot) outlives the call.
    """
    done = threading.Event()

    async def guarded() -> _T:
        try:
            return await coro
        finally:
            done.set()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError("runner.run() blocks: call it from a thread without an event loop")
    future = submit(guarded())
    try:
        while True:
            try:
                # A timeout keeps Ctrl-C deliverable and ``cancel`` looked at.
                return future.result(timeout=None if cancel is None else 0.05)
            except concurrent.futures.TimeoutError:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while it waited") from None
    except BaseException:
        future.cancel()
        done.wait()
        raise


async def in_thread(work: Callable[[], _T], *, name: str = "sarai-work") -> _T:
    """``work()`` on a thread of its own; the caller's loop keeps running meanwhile.

    A thread of its own, not the loop's bounded executor: a request may block here for as
    long as another request holds a model (a load waits for room), and the requests that
    would free it must never wait for a free executor thread.
    """
    running = asyncio.get_running_loop()
    future: asyncio.Future = running.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            _call_soon(running, settle, None, exc)
        else:
            _call_soon(running, settle, result, None)

    _thread(target, name)
    return await future


def _thread(target: Callable[[], None], name: str) -> None:
    """Start ``target`` on a daemon thread, in a copy of the caller's context: the request's
    id reaches the events emitted there."""
    threading.Thread(target=contextvars.copy_context().run, args=(target,), name=name,
                     daemon=True).start()


def _call_soon(running: asyncio.AbstractEventLoop, callback: Callable[..., Any],
               *args: Any) -> bool:
    try:
        running.call_soon_threadsafe(callback, *args)
        return True
    except RuntimeError:  # the loop is closed: nobody is listening
        return False


async def iterate_in_thread(make: Callable[[], Iterator[_T]], *,
                            name: str = "sarai-gen") -> AsyncIterator[_T]:
    """Iterate a blocking generator on a thread of its own, from start to end, handing its
    items to the event loop. Closing this (or cancelling its consumer) ends the generator
    between two items, and waits for it: a llama.cpp model must be idle before its slot is
    released.

    The thread wakes the loop only when the consumer waits for an item; items that come
    while the consumer is busy are queued without a wake-up each.
    """
    running = asyncio.get_running_loop()
    items: collections.deque = collections.deque()
    stop = threading.Event()
    ended = running.create_future()
    state: dict[str, Any] = {"waiter": None}
    lock = threading.Lock()

    def wake(waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def put(entry: tuple[str, Any]) -> None:
        with lock:
            items.append(entry)
            waiter, state["waiter"] = state["waiter"], None
        if waiter is not None:
            _call_soon(running, wake, waiter)

    def finish() -> None:
        if not ended.done():
            ended.set_result(None)

    def work() -> None:
        try:
            with closing(make()) as iterator:  # type: ignore[type-var]
                for item in iterator:
                    if stop.is_set():
                        break
                    put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, never lost
            put(("error", exc))
        else:
            put(("end", None))
        finally:
            _call_soon(running, finish)

    _thread(work, name)
    try:
        while True:
            with lock:
                entry = items.popleft() if items else None
                if entry is None:
                    waiter = state["waiter"] = running.create_future()
            if entry is None:
                await waiter
                continue
            kind, value = entry
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        try:
            await asyncio.shield(ended)
        except asyncio.CancelledError:
            # Cancelled again while it stopped: it still ends at the next item, at most one
            # token's time, and the slot must not be released before.
            await _wait_uncancellable(ended)
            raise


async def _wait_uncancellable(future: Awaitable[Any]) -> None:
    while True:
        try:
            await asyncio.shield(future)
            return
        except asyncio.CancelledError:
            continue


#: ``(owner, hand)`` while a sync caller lends its thread to the work it started for
#: ``owner`` (see :func:`lending`).
_lent: contextvars.ContextVar[tuple[object, Callable[["OnCaller"], None]] | None] = \
    contextvars.ContextVar("sarai_lent_thread", default=None)


@contextmanager
def lending(owner: object, hand: Callable[["OnCaller"], None]) -> Iterator[None]:
    """Tasks started in this block for ``owner`` may hand an :class:`OnCaller` to ``hand``:
    the sync caller that started them, which waits on its own thread, runs it there.

    A task keeps the context it was started in, so the tasks and threads it starts see the
    loan too; ``owner`` (the work it was made for) keeps any other work they start from
    taking it."""
    token = _lent.set((owner, hand))
    try:
        yield
    finally:
        _lent.reset(token)


def lent_thread(owner: object) -> Callable[["OnCaller"], None] | None:
    """Where to hand an :class:`OnCaller` for ``owner``: its sync caller; None if none lent
    its thread (the server, the chat REPL: the iteration then runs on a thread of its own)."""
    lent = _lent.get()
    return lent[1] if lent is not None and lent[0] is owner else None


class OnCaller:
    """A blocking iteration that the sync caller waiting for this coroutine runs on its own
    thread, handing what it yields straight to that caller.

    Handing items from a worker thread to the loop and from the loop to the caller costs
    two thread switches per item (a llama.cpp token); here there are none: the coroutine
    hands this to the caller once (:meth:`run`), the caller iterates (:meth:`items`), and
    the coroutine goes on once the iteration has ended, so nothing it holds (a model's
    slot) is let go before. ``take(item)`` maps an item to what the caller gets: a value,
    None to pass over it, or ``end`` to stop.
    """

    _STOPPED = object()

    def __init__(self, make: Callable[[], Iterator[Any]], take: Callable[[Any], Any], *,
                 end: object):
        self.make, self.take, self.end = make, take, end
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future = self.loop.create_future()
        # Set on the loop if the coroutine is cancelled meanwhile: the caller stops at the
        # next item (read without a lock: a bool, read once per item).
        self.stop = False
        # Whether the caller began iterating, or never will (the coroutine was cancelled
        # first: a caller stopped by Ctrl-C before it took this up).
        self._lock = threading.Lock()
        self._began = self._dropped = False

    async def run(self, hand: Callable[["OnCaller"], None]) -> None:
        """Hand this to the caller (``hand``) and wait until its iteration has ended. An
        error it raised is raised here; the caller's stopping (it closed its iterator,
        Ctrl-C) ends this task as cancelled."""
        hand(self)
        try:
            outcome = await self.ended
        except asyncio.CancelledError:
            if not self.ended.cancelled():
                raise  # the iteration had ended
            with self._lock:
                self._dropped = not self._began
            if self._dropped:
                raise  # nothing began: nothing to wait for
            # Cancelled while the caller iterates: it stops at its next item. Wait for
            # that (the caller's end resolves whichever future ``ended`` is then).
            self.stop = True
            self.ended = self.loop.create_future()
            await _wait_uncancellable(self.ended)
            raise
        if outcome is self._STOPPED:
            raise asyncio.CancelledError
        if outcome is not None:
            raise outcome

    def items(self) -> Iterator[Any]:
        """On the caller's thread: iterate, yielding what ``take`` gives. An error of the
        iteration goes back to the coroutine (which raises it on the async path, where the
        caller hears of it); the caller's own stop (GeneratorExit, KeyboardInterrupt) is
        raised here, once the iteration is closed."""
        with self._lock:
            if self._dropped:
                return
            self._began = True
        outcome: Any = None
        try:
            with closing(self.make()) as iterator:  # type: ignore[type-var]
                for item in iterator:
                    if self.stop:
                        break
                    value = self.take(item)
                    if value is self.end:
                        break
                    if value is not None:
                        yield value
        except Exception as exc:  # noqa: BLE001 - handed to the coroutine, never lost
            outcome = exc
        except BaseException:
            outcome = self._STOPPED
            raise
        finally:
            _call_soon(self.loop, self._settle, outcome)

    def _settle(self, outcome: Any) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)
