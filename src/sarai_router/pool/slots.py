"""Using a model: counting a request on its resident, and the slots of its instance.

``concurrency`` generations run at once on an instance; the others wait in arrival order,
each on a future woken by the release of a slot, so hundreds of waiters need no thread.
A request cancelled while it waits leaves the queue at once; a slot handed to it meanwhile
goes on to the next waiter.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from .. import runner
from ..errors import Cancelled, InstanceDead, QueueFull
from ..runner import in_thread
from .resident import KEEP_ALIVE_0, Resident, model_alive

__all__ = ["PoolSlots"]


def _wake(future: "asyncio.Future") -> None:
    if not future.done():
        future.set_result(None)


async def _in_thread(work: Callable[[threading.Event], Any], *, undo: Callable[[Any], None],
                     wake: Callable[[], None]) -> Any:
    """``work(cancel)`` on a thread of its own. If the awaiting task is cancelled meanwhile,
    ``cancel`` is set and ``wake()`` called (a wait inside ``work`` ends with
    :class:`Cancelled`); work that finishes anyway (it holds the pool's state) has ``undo``
    applied to its result."""
    cancel = threading.Event()
    future = asyncio.ensure_future(in_thread(lambda: work(cancel), name="sarai-acquire"))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        wake()

        def settle(done: "asyncio.Future") -> None:
            if not done.cancelled() and done.exception() is None:
                undo(done.result())
        future.add_done_callback(settle)
        raise


class PoolSlots:
    """The part of :class:`~sarai_router.pool.ModelPool` that hands a loaded model to a
    request and a slot of its instance to a generation (``self`` is the pool)."""

    def use(self, name: str, *, queue_limit: int | None = None,
            cancel: threading.Event | None = None) -> "_Use":
        """Hold model ``name`` for one generation: load it if needed, then take a slot of its
        instance (``concurrency`` generations run at once; the others wait in turn).

        ``async with pool.use(name)`` on an event loop; ``with pool.use(name)`` from a thread
        without one (the same path, run on the shared loop: :mod:`runner`).

        ``queue_limit``: how many requests may wait for a slot besides those using one; one
        more raises :class:`QueueFull` at once. ``None``: no limit.
        A request cancelled while it waits (its task cancelled; for ``with``, ``cancel``
        set) leaves the queue at once without touching the model; a slot handed to it
        meanwhile goes on to the next waiter.

        A loaded model is taken on the loop itself (a lock and a counter); only a load, or
        waiting for another request's load, runs on a thread. Waiting for a slot is a
        future woken by the release of one, so hundreds of waiters need no thread.
        """
        return _Use(self, name, queue_limit, cancel)

    @asynccontextmanager
    async def _use(self, name: str, queue_limit: int | None) -> AsyncIterator[Resident]:
        resident = self._acquire_loaded(name, queue_limit=queue_limit)
        if resident is None:
            resident = await _in_thread(
                lambda cancel: self._acquire(name, queue_limit=queue_limit, cancel=cancel),
                undo=self._release_user, wake=self.wake)
        try:
            await self._take_slot(resident)
        except BaseException:
            self._release_user(resident, used=False)  # it never reached the model
            raise
        try:
            try:
                self._check_not_dead(resident)
                yield resident
            except InstanceDead as exc:
                self._drop_dead(resident, str(exc))
                raise
            finally:
                self._release_slot(resident)
        finally:
            self._release_user(resident)

    @staticmethod
    def _check_not_dead(resident: Resident) -> None:
        if resident.state == "dead":
            # It died while this request waited for a slot; nothing was sent yet, so the
            # engine may try again on a fresh instance.
            raise InstanceDead(f"model {resident.name!r}: its instance died while this "
                               "request waited for it")

    def _drop_dead(self, resident: Resident, detail: str) -> None:
        with self._cond:
            self._drop_dead_locked(resident, detail)

    def _release_slot(self, resident: Resident) -> None:
        """Free a slot: handed straight to the first waiter if there is one (so a newcomer
        cannot take it first and waiters are served in order), else released."""
        with self._cond:
            while resident.waiters:
                loop, future = resident.waiters.pop(0)
                try:
                    loop.call_soon_threadsafe(_wake, future)
                except RuntimeError:  # that loop is closed: nobody waits there any more
                    continue
                return
            resident.active -= 1
            resident.slots.release()
            self._cond.notify_all()

    def _release_user(self, resident: Resident, *, used: bool = True) -> None:
        """``used``: it generated (the idle clock restarts); else it left the queue."""
        taken = None
        with self._cond:
            resident.users -= 1
            resident.queued -= 1
            if used:
                resident.last_used = self.clock()
                self._heap_dirty = True
            if resident.state == "dead" and resident.users == 0:
                self._close_dead_locked(resident)
            elif (resident.unload_after_use and resident.idle
                    and self._residents.get(resident.name) is resident):
                taken = self._take_out_locked(resident, kind="unload", detail=KEEP_ALIVE_0)
            self._cond.notify_all()
        if taken is not None:
            self._close(*taken)

    async def _take_slot(self, resident: Resident) -> None:
        """Take a slot of ``resident`` without blocking the event loop: at once if one is
        free and nobody waits, else wait (a future) for a release to hand one over."""
        loop = asyncio.get_running_loop()
        with self._cond:  # releases decide under this lock too: no wakeup is lost
            if not resident.waiters and resident.slots.acquire(blocking=False):
                resident.active += 1
                return
            entry = (loop, loop.create_future())
            resident.waiters.append(entry)
            position = len(resident.waiters) - 1
        try:
            self.hooks.emit("queued", resident.name, position=position)
            await entry[1]
        except BaseException:
            with self._cond:
                if entry in resident.waiters:  # nothing was handed to us
                    resident.waiters.remove(entry)
                    raise
            self._release_slot(resident)  # a slot was on its way to us: pass it on
            raise

    def _acquire_loaded(self, name: str, *, queue_limit: int | None) -> Resident | None:
        """Count a request on ``name`` if it is loaded (never blocks); None if it is not."""
        full = prewarm_used = False
        with self._cond:
            resident = self._residents.get(name)
            if resident is None or resident.state != "loaded":
                return None
            if not model_alive(resident.model):
                return None  # _acquire, on a worker thread, drops it and loads again
            if not self.load_queue.may_join(None, name):
                return None  # its turn comes later: _acquire, on a worker thread, waits
            full = (queue_limit is not None
                    and resident.queued >= resident.concurrency + queue_limit)
            if not full:
                resident.users += 1
                resident.queued += 1
                if resident.prewarm_pending:
                    resident.prewarm_pending = False
                    prewarm_used = True
        if full:
            self.hooks.emit("queue_full", name, queue_size=queue_limit)
            raise QueueFull(name, queue_limit)
        if prewarm_used:
            self.hooks.emit("prewarm_used", name)
        return resident


class _Use:
    """What :meth:`ModelPool.use` returns: an async context manager, and for a thread
    without an event loop a plain one that runs the same steps on the shared loop."""

    __slots__ = ("pool", "name", "queue_limit", "cancel", "_held")

    def __init__(self, pool: PoolSlots, name: str, queue_limit: int | None,
                 cancel: threading.Event | None):
        self.pool, self.name, self.queue_limit, self.cancel = pool, name, queue_limit, cancel
        self._held: Any = None

    async def __aenter__(self) -> Resident:
        self._held = self.pool._use(self.name, self.queue_limit)
        return await self._held.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._held.__aexit__(*exc_info)

    def __enter__(self) -> Resident:
        try:
            return runner.run(self.__aenter__(), cancel=self.cancel)
        except Cancelled:
            raise Cancelled(f"request for {self.name!r} cancelled while queued") from None

    def __exit__(self, *exc_info: Any) -> bool | None:
        return runner.run(self.__aexit__(*exc_info))
