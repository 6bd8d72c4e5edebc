"""The bridges between the async request path and code that blocks.

Every generation runs on an event loop (``Engine.astream``). Two kinds of code are not
async and meet it here, and only here:

* **sync callers** (``query``, the ``chat`` REPL, ``bench``, ``eval``, scripts) run their
  coroutines on one event loop that lives on a daemon thread of its own, started the first
  time it is needed and shared by the whole process (:func:`run`, :func:`submit`);
* **blocking work** that an async caller needs (a llama.cpp generation, a model load, a
  download) runs on a thread of its own (:func:`in_thread`, :func:`iterate_in_thread`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import threading
from contextlib import closing
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, TypeVar

from .errors import Cancelled

__all__ = ["in_thread", "iterate_in_thread", "loop", "run", "submit"]

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
