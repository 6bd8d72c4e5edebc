"""The model pool: which models are resident, loading them lazily, unloading them by policy.

Rules the pool keeps whatever the cache plugins say:

* a pinned model is never evicted or expired;
* a model that a request uses or waits for (``users > 0``) is never unloaded;
* at most the backend's ``concurrency(spec)`` generations at once per loaded instance
  (``Resident.slots``: 1 for an in-process llama.cpp model, the slots of a llama-server),
  the others waiting in arrival order;
* a request cancelled while it waits (its client left, the server stops) leaves the queue
  at once and never touches the model;
* the idle clock (``last_used``) starts when a generation ends;
* unloading (``close()``, ``malloc_trim``, the RSS check) runs outside the pool's lock, so
  a status read never waits for it; a model being closed is ``unloading`` until it is done,
  and loading it again waits for that;
* an instance that died (its process crashed: the model's ``alive()`` says no, or a
  generation raised ``InstanceDead``) is dropped at once, counted as a ``crash``, and the
  next request loads the model again.

A loaded model may offer ``rss_mb()`` (a backend that runs it in a child process): the pool
then budgets with that measured RSS instead of its own process's RSS growth, refreshes it
while the model is resident, and checks an unload against it.

Which idle model to evict and when an idle model has expired are asked of the cache hooks
(``select_eviction``, ``model_expired``); the default plugin is LRU with a TTL.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import attrs

from . import runner
from .backend import LoadedModel
from .config import Config, ModelSpec
from .errors import (BackendError, Cancelled, InstanceDead, ModelBusy, ModelPinned, PoolError,
                     QueueFull, not_configured)
from .load_queue import LoadQueue, Ticket
from .runner import in_thread
from .types import COLD_LOAD_MB_PER_S, Residency, ResidentInfo

if TYPE_CHECKING:
    from .plugins import Hooks

log = logging.getLogger(__name__)

__all__ = ["ModelPool", "PoolError", "QueueFull", "Resident", "ResidentInfo"]


#: The detail of an unload a client's ``keep_alive: 0`` asked for.
KEEP_ALIVE_0 = "keep_alive 0"
#: A verified unload must give back at least this share of what the load took.
UNLOAD_VERIFY_RATIO = 0.5
#: Below this size an unload is not checked: RSS noise is of the same order.
UNLOAD_VERIFY_MIN_MB = 16.0


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


@attrs.define(eq=False)
class Resident:
    """A model the pool holds, loading or loaded. Only the pool touches it, under its lock."""

    name: str
    spec: ModelSpec
    ram_mb: float
    estimated_mb: float
    #: "loading" | "loaded" | "unloading" (taken out, being closed outside the lock) |
    #: "dead" (dropped, closed by its last user)
    state: str = "loading"
    model: LoadedModel | None = None
    users: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    measured_mb: float | None = None
    #: generations the instance takes at once (the backend's ``concurrency``)
    concurrency: int = 1
    slots: threading.Semaphore = attrs.field(
        default=attrs.Factory(lambda self: threading.Semaphore(self.concurrency), takes_self=True))
    # Requests inside ``use()`` (generating, or waiting for the load or the instance).
    queued: int = 0
    # Loaded by a pre-warm and not used by a request yet.
    prewarm_pending: bool = False
    #: requests waiting for a slot, in arrival order: (loop, future), woken one per release
    waiters: list = attrs.field(factory=list)
    #: generations holding a slot now
    active: int = 0
    #: a client's idle limit for this instance (``keep_alive``), seconds; None: the cache
    #: policy's TTL. Never set on a pinned model.
    keep_alive_s: float | None = None
    #: unload as soon as the last request using it ends (``keep_alive`` 0)
    unload_after_use: bool = False

    @property
    def pinned(self) -> bool:
        return self.spec.pinned

    @property
    def idle(self) -> bool:
        return self.state == "loaded" and self.users == 0

    def info(self) -> ResidentInfo:
        return ResidentInfo(
            name=self.name, spec=self.spec, state=self.state, pinned=self.pinned,
            users=self.users, queued=self.queued, ram_mb=self.ram_mb,
            estimated_mb=self.estimated_mb, measured_mb=self.measured_mb,
            last_used=self.last_used, loaded_at=self.loaded_at,
            load_seconds=self.load_seconds, prewarmed=self.prewarm_pending)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pinned": self.pinned,
            "users": self.users,
            "ram_mb": round(self.ram_mb, 1),
            "estimated_mb": round(self.estimated_mb, 1),
            "measured_mb": None if self.measured_mb is None else round(self.measured_mb, 1),
            "load_seconds": round(self.load_seconds, 3),
            "queued": self.queued,
            "active": self.active,
            "waiting": len(self.waiters),
            "concurrency": self.concurrency,
            "prewarmed": self.prewarm_pending,
            "idle_seconds": round(time.monotonic() - self.last_used, 1) if self.idle else 0.0,
            "keep_alive_s": self.keep_alive_s,
            "unload_after_use": self.unload_after_use,
        }


def process_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


def model_rss_mb(model: LoadedModel | None) -> float | None:
    """The RSS a loaded model reports for itself (a child process), None if it offers none."""
    measure = getattr(model, "rss_mb", None)
    if not callable(measure):
        return None
    try:
        return float(measure())
    except Exception:  # a measurement must never break a load or an unload
        log.debug("rss_mb() of %r failed", model, exc_info=True)
        return None


def model_alive(model: LoadedModel | None) -> bool:
    """Whether a loaded model's instance still runs (True when it cannot tell)."""
    check = getattr(model, "alive", None)
    if model is None or not callable(check):
        return True
    try:
        return bool(check())
    except Exception:
        log.debug("alive() of %r failed", model, exc_info=True)
        return True


def release_free_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS (llama.cpp frees, glibc may keep);
    ``malloc_trim`` walks every arena, not only the main one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


#: glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc_for_serving(arena_max: int = 2, mmap_threshold: int = 128 * 1024) -> bool:
    """For a long-running process, before its threads start: fewer glibc malloc arenas
    and a fixed mmap threshold, so that memory freed after a burst of requests goes back
    to the OS instead of staying in per-thread arenas (see docs/RELIABILITY.md).

    glibc gives each thread that contends for the heap an arena of its own (up to 8 per
    core) and raises its mmap threshold after every large free, so the big buffers of a
    later generation come from an arena and stay there once freed. A fixed threshold keeps
    large blocks in their own mappings, returned on free. ``MALLOC_ARENA_MAX`` /
    ``MALLOC_MMAP_THRESHOLD_`` in the environment win (glibc read them at start).
    Returns whether glibc took the settings.
    """
    import os

    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    done = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = bool(mallopt(_M_ARENA_MAX, arena_max)) and done
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and done
    return done


class ModelPool:
    def __init__(
        self,
        config: Config,
        hooks: "Hooks",
        *,
        clock: Callable[[], float] = time.monotonic,
        estimator: Callable[[ModelSpec], float] | None = None,
        wait_seconds: float = 120.0,
    ):
        self.config = config
        self.hooks = hooks
        self.clock = clock
        # The backend knows what its model costs (a GGUF header, a child process, nothing).
        self.estimator = estimator or (lambda spec: self.backend_for(spec).estimate_ram_mb(spec))
        #: residents that are not the config's models (a plugin's, e.g. the speech model),
        #: with the backend that loads each: see ``add_resident``
        self._added: dict[str, tuple[ModelSpec, Any]] = {}
        self.wait_seconds = wait_seconds
        self._residents: dict[str, Resident] = {}
        #: taken out of ``_residents`` and being closed (outside the lock)
        self._closing: dict[str, Resident] = {}
        # The last measured load time of each model, kept after it is unloaded (routing's
        # expected cold-load time), and the backend's RAM estimate for the others.
        self._load_seconds: dict[str, float] = {}
        self._estimates: dict[str, float | None] = {}
        self._cond = threading.Condition()
        # Closes one at a time, so each one's RSS reading is its own.
        self._close_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        # A generation ended since the heap was last trimmed (the reaper trims when idle).
        self._heap_dirty = False
        #: who goes next when models can't all be resident ([cache] queue_order)
        self.load_queue = LoadQueue(config.cache.queue_order,
                                    config.cache.max_queue_wait_seconds)

    # -- what it may hold ---------------------------------------------------------------

    def add_resident(self, spec: ModelSpec, backend: Any) -> None:
        """Hold ``spec`` like a configured model though it is none of the config's: a
        plugin's own model (the speech model), loaded by ``backend``. It is held with
        :meth:`use`, counted against ``[cache] ram_budget_mb``, evicted and expired (its
        ``ttl_seconds``) like the others, and listed by :meth:`status`; it is not routed
        to and does not count against ``[cache] max_loaded`` (a number of chat models).
        Adding it again with another spec takes effect at its next load."""
        if spec.name in self.config.models:
            raise PoolError(f"cannot add {spec.name!r}: a configured model has that name")
        with self._cond:
            self._added[spec.name] = (spec, backend)

    def spec_of(self, name: str) -> ModelSpec | None:
        spec = self.config.models.get(name)
        if spec is None and name in self._added:
            spec = self._added[name][0]
        return spec

    def backend_for(self, spec: ModelSpec) -> Any:
        added = self._added.get(spec.name)
        if added is not None and spec.name not in self.config.models:
            return added[1]
        return self.hooks.backend(spec.backend)

    def names(self) -> list[str]:
        """The configured models, then the added residents."""
        return [*self.config.models, *(n for n in self._added if n not in self.config.models)]

    # -- queries -----------------------------------------------------------------------

    def is_loaded(self, name: str) -> bool:
        with self._cond:
            resident = self._residents.get(name)
            return resident is not None and resident.state == "loaded"

    def is_resident(self, name: str) -> bool:
        """Loaded or loading: its files are not needed again for this instance."""
        with self._cond:
            return name in self._residents

    def residents(self) -> list[dict[str, Any]]:
        """Snapshots of every resident, those being unloaded included (``unloading``)."""
        with self._cond:
            return [r.snapshot() for r in (*self._residents.values(), *self._closing.values())]

    def health(self) -> dict[str, Any]:
        """``{name: health}`` for loaded models that report it (remote endpoints)."""
        with self._cond:
            models = {r.name: r.model for r in self._residents.values()
                      if r.state == "loaded" and hasattr(r.model, "health")}
        return {name: model.health() for name, model in models.items()}

    def residency(self) -> Residency:
        """Every configured model's state now, for routing: ``loaded``, ``loading`` or
        ``unloaded``, and its expected cold-load time (read lazily: the last load measured
        here, else the backend's RAM estimate at ``COLD_LOAD_MB_PER_S``)."""
        with self._cond:
            states = dict.fromkeys(self.config.models, "unloaded")
            for name, resident in self._residents.items():
                if resident.state in ("loaded", "loading") and name in states:
                    states[name] = resident.state
        return Residency(states, self.cold_load)

    def cold_load(self, name: str) -> tuple[float | None, bool]:
        """``(seconds, measured)``: how long loading ``name`` takes, as far as we know."""
        with self._cond:
            seconds = self._load_seconds.get(name)
        if seconds is not None:
            return seconds, True
        if name not in self._estimates:
            try:
                mb = self.estimator(self.config.models[name])
                self._estimates[name] = max(0.0, float(mb)) / COLD_LOAD_MB_PER_S
            except Exception as exc:  # no estimate is not an error for routing
                log.debug("no RAM estimate for %s: %s", name, exc)
                self._estimates[name] = None
        return self._estimates[name], False

    def resident_mb(self) -> float:
        with self._cond:
            return self._resident_mb_locked() + sum(r.ram_mb for r in self._closing.values())

    def wake(self) -> None:
        """Wake every thread that waits in the pool to look again (a cancel flag was set)."""
        with self._cond:
            self._cond.notify_all()

    # -- using a model -------------------------------------------------------------------

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

    def ensure_loaded(self, name: str) -> Resident:
        """Load ``name`` (if it is not) without holding it; used for pinned models."""
        resident = self._acquire(name, request=False)
        with self._cond:
            resident.users -= 1
            self._cond.notify_all()
        return resident

    def prewarm(self, name: str, *, reason: str = "") -> threading.Thread | None:
        """Start loading ``name`` in a background thread if it is not resident; evict nothing.

        The slot is reserved before this returns (the model shows as ``loading``), so a
        request that comes next waits for this load instead of starting another. Returns
        the loading thread, or ``None`` when the model is resident or there is no room
        (a ``prewarm_skipped`` event). A request for the model before it is unloaded makes
        the pre-warm ``prewarm_used``; an unload before any request, ``prewarm_wasted``.
        """
        spec = self.config.models.get(name)
        if spec is None:
            raise PoolError(f"cannot pre-warm {not_configured(name, self.config.models)}")
        with self._cond:
            if name in self._residents or name in self._closing:
                return None
            try:
                # A guess must not unload a model someone may be about to use.
                resident = self._reserve(spec, evict=False, victims=[])
            except PoolError as exc:
                skipped = str(exc)
            else:
                skipped = ""
                resident.users += 1
                resident.prewarm_pending = True
        if skipped:
            log.info("pre-warm of %s skipped: %s", name, skipped)
            self.hooks.emit("prewarm_skipped", name, reason=skipped)
            return None
        thread = threading.Thread(target=self._prewarm_load, args=(resident, reason),
                                  name=f"sarai-prewarm-{name}", daemon=True)
        thread.start()
        return thread

    def _prewarm_load(self, resident: Resident, reason: str) -> None:
        try:
            self._load(resident)
        except Exception as exc:  # _load has dropped the slot and emitted load_failed
            log.warning("pre-warm of %s failed: %s", resident.name, exc)
            return
        with self._cond:
            resident.users -= 1
            self._cond.notify_all()
        log.info("pre-warmed model %s (%s)", resident.name, reason or "asked by a plugin")
        self.hooks.emit("prewarm_started", resident.name, reason=reason,
                        load_s=resident.load_seconds, rss_mb=resident.ram_mb)

    def load_pinned(self) -> list[str]:
        pinned = [name for name, spec in self.config.models.items() if spec.pinned]
        for name in pinned:
            self.ensure_loaded(name)
        return pinned

    def _acquire(self, name: str, *, queue_limit: int | None = None,
                 request: bool = True, cancel: threading.Event | None = None) -> Resident:
        """Count a user on ``name``'s resident (creating and loading it if needed).

        ``request``: a generation that will lock the instance (counted in ``queued``, subject
        to ``queue_limit``); otherwise a load-only user such as a pre-warm.
        """
        spec = self.spec_of(name)
        if spec is None:
            raise PoolError(f"cannot load {not_configured(name, self.config.models)}")
        prewarm_used = full = False
        victims: list[tuple[Resident, str, str, str]] = []
        # A request's place in the load queue (a load that is no request has none).
        ticket = self.load_queue.ticket(name) if request else None
        try:
            with self._cond:
                while True:
                    # A model still being closed is loaded again once the close is done
                    # (shown as waiting on the closing instance meanwhile).
                    while name in self._closing:
                        closing = self._closing[name]
                        closing.queued += 1
                        try:
                            _check_cancel(cancel, name)
                            self._cond.wait(timeout=1.0)
                        finally:
                            closing.queued -= 1
                    resident = self._residents.get(name)
                    if (resident is not None and resident.state == "loaded"
                            and not model_alive(resident.model)):
                        self._drop_dead_locked(resident, "found dead at the next request")
                        resident = None
                    if resident is None:
                        resident = self._reserve(spec, victims=victims, cancel=cancel,
                                                 ticket=ticket)
                        if resident is None:
                            continue  # loaded by another request meanwhile: join it
                        loader = True
                        if request:
                            self.load_queue.loading()
                        break
                    if self.load_queue.may_join(ticket, name):
                        loader = False
                        # ``concurrency`` requests use the instance; ``queue_limit`` more
                        # may wait.
                        full = (request and queue_limit is not None
                                and resident.queued >= resident.concurrency + queue_limit)
                        break
                    # Held back behind an older request that waits to load another model.
                    self.load_queue.wait(ticket, "turn")
                    _check_cancel(cancel, name)
                    self._cond.wait(timeout=1.0)
                self.load_queue.leave(ticket)
                if not full:
                    resident.users += 1
                    if request:
                        resident.queued += 1
                        if resident.prewarm_pending:
                            resident.prewarm_pending = False
                            prewarm_used = True
        finally:
            with self._cond:
                self.load_queue.leave(ticket)
                self._cond.notify_all()  # the next in the load queue may go on
            # Evicted to make room: closed before the new load starts, outside the lock.
            for victim in victims:
                self._close(*victim)
        if full:
            self.hooks.emit("queue_full", name, queue_size=queue_limit)
            raise QueueFull(name, queue_limit)
        if prewarm_used:
            self.hooks.emit("prewarm_used", name)
        if loader:
            try:
                self._load(resident)
            except BaseException:
                if request:
                    with self._cond:
                        resident.queued -= 1
                raise
            return resident
        with self._cond:
            while resident.state == "loading" and self._residents.get(name) is resident:
                if cancel is not None and cancel.is_set():
                    resident.users -= 1
                    if request:
                        resident.queued -= 1
                    self._cond.notify_all()
                    raise Cancelled(f"request for {name!r} cancelled while the model loaded")
                self._cond.wait(timeout=1.0)
            if self._residents.get(name) is not resident:
                # The load we waited for failed; report it as ours.
                resident.users -= 1
                if request:
                    resident.queued -= 1
                raise PoolError(f"model {name!r} failed to load (see the log above)")
        return resident

    def _reserve(self, spec: ModelSpec, *, victims: list[tuple[Resident, str, str, str]],
                 evict: bool = True, cancel: threading.Event | None = None,
                 ticket: Ticket | None = None) -> Resident | None:
        """Make room for ``spec`` and reserve its slot. Holds the lock.

        ``ticket``: the request's place in the load queue; only the oldest waiting for room
        evicts. Returns None when another request loaded ``spec`` meanwhile (join that).

        Idle models chosen for eviction are taken out and appended to ``victims``; the
        caller closes them once it has let go of the lock. Models other requests are still
        closing count against the limits until they are closed.
        """
        estimated = self.estimator(spec)
        budget = self.config.cache.ram_budget_mb
        if estimated > budget:
            raise PoolError(
                f"model {spec.name!r} needs about {estimated:.0f} MB, more than "
                f"[cache] ram_budget_mb = {budget:.0f}"
            )
        deadline = time.monotonic() + self.wait_seconds
        seen_progress = max((r.last_used for r in self._residents.values()), default=0.0)
        self._refresh_measured_locked()
        while True:
            if ticket is not None and spec.name in self._residents:
                return None
            ours = {id(victim) for victim, *_ in victims}
            closing = [r for r in self._closing.values() if id(r) not in ours]
            over_count = (spec.name not in self._added
                          and self._counted(self._residents.values(), closing) + 1
                          > self.config.cache.max_loaded)
            over_mb = (self._resident_mb_locked() + sum(r.ram_mb for r in closing)
                       + estimated - budget)
            if not over_count and over_mb <= 0:
                break
            if not evict:
                raise PoolError(self._why_full(spec, estimated, over_count)
                                .replace("no resident model can be evicted",
                                         "this load may not evict"))
            candidates = [r for r in self._residents.values() if r.idle and not r.pinned
                          # over the count only: evicting an added resident frees no place
                          and (over_mb > 0 or r.name not in self._added)]
            if ticket is not None:
                self.load_queue.wait(ticket, "room")
            if candidates and self.load_queue.may_make_room(ticket):
                victim = self.hooks.select_eviction(
                    candidates=[r.info() for r in candidates], needed_mb=max(0.0, over_mb),
                    loading=spec,
                )
                by_name = {r.name: r for r in candidates}
                if victim not in by_name:
                    raise PoolError(
                        f"no cache plugin chose a model to evict for {spec.name!r} "
                        f"(answer: {victim!r}; candidates: {', '.join(by_name)}); "
                        "is the default 'lru_ttl' plugin disabled?"
                    )
                victims.append(self._take_out_locked(
                    by_name[victim], kind="evict", detail=(
                        f"[cache] max_loaded = {self.config.cache.max_loaded}" if over_count
                        else f"[cache] ram_budget_mb = {budget:.0f}"), by=spec.name))
                continue
            _check_cancel(cancel, spec.name)
            if ticket is not None:
                # A request behind older ones, or behind a model whose queue still moves
                # (a generation ended), is queued, not stuck: its wait for room counts from
                # its turn and from the latest generation that ended.
                progress = max((r.last_used for r in self._residents.values()), default=0.0)
                if not self.load_queue.may_make_room(ticket) or progress != seen_progress:
                    seen_progress = progress
                    deadline = time.monotonic() + self.wait_seconds
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not (self._others_busy_locked() or closing or candidates):
                raise PoolError(self._why_full(spec, estimated, over_count))
            # Every other model is busy (or still closing): wait for one rather than fail.
            self._cond.wait(timeout=min(remaining, 1.0))
        concurrency = max(1, int(self.backend_for(spec).concurrency(spec)))
        resident = Resident(name=spec.name, spec=spec, ram_mb=estimated, estimated_mb=estimated,
                            concurrency=concurrency)
        self._residents[spec.name] = resident
        return resident

    def _why_full(self, spec: ModelSpec, estimated: float, over_count: bool) -> str:
        held = ", ".join(
            f"{r.name} ({'pinned' if r.pinned else 'busy'}, {r.ram_mb:.0f} MB)"
            for r in self._residents.values()
        )
        limit = (
            f"[cache] max_loaded = {self.config.cache.max_loaded}"
            if over_count
            else f"[cache] ram_budget_mb = {self.config.cache.ram_budget_mb:.0f}"
        )
        return (f"cannot load model {spec.name!r} (~{estimated:.0f} MB): {limit} is reached and "
                f"no resident model can be evicted (held: {held})")

    def _counted(self, *groups) -> int:
        """How many of these residents count against ``[cache] max_loaded``."""
        return sum(1 for group in groups for r in group if r.name not in self._added)

    def _others_busy_locked(self) -> bool:
        return any(not r.pinned and not r.idle for r in self._residents.values())

    def _resident_mb_locked(self) -> float:
        return sum(r.ram_mb for r in self._residents.values())

    def _load(self, resident: Resident) -> None:
        spec = resident.spec
        self.hooks.emit("model_loading", resident.name)
        rss_before = process_rss_mb()
        started = time.perf_counter()
        try:
            factory = self.backend_for(spec)
            model = factory.load(spec)
        except BaseException as exc:
            with self._cond:
                self._residents.pop(resident.name, None)
                resident.users -= 1
                self._cond.notify_all()
            self.hooks.emit("load_failed", resident.name, error=str(exc))
            if isinstance(exc, (BackendError, PoolError)):
                raise
            if isinstance(exc, Exception):
                raise BackendError(f"backend {spec.backend!r} failed to load model "
                                   f"{spec.name!r}: {exc}") from exc
            raise
        seconds = time.perf_counter() - started
        own = model_rss_mb(model)
        # A model in a child process says what it holds; else our own RSS grew by it.
        measured = own if own is not None else max(0.0, process_rss_mb() - rss_before)
        with self._cond:
            resident.model = model
            resident.state = "loaded"
            resident.load_seconds = seconds
            self._load_seconds[resident.name] = seconds
            resident.measured_mb = measured
            # Budget with what we saw, when the load cost more than the header said.
            resident.ram_mb = max(resident.estimated_mb, measured)
            resident.loaded_at = resident.last_used = self.clock()
            self._cond.notify_all()
        log.info("loaded model %s in %.2fs (estimated %.0f MB, %s %.0f MB)",
                 resident.name, seconds, resident.estimated_mb,
                 "its RSS" if own is not None else "RSS +", measured)
        self.hooks.emit("model_loaded", resident.name, load_s=seconds, rss_mb=resident.ram_mb)

    # -- unloading ----------------------------------------------------------------------
    #
    # In two steps: under the lock, an idle model is taken out of the residents (nobody can
    # start using it any more; it shows as "unloading"); then, with the lock released,
    # it is closed, the heap trimmed and the RSS drop checked. Closing a 250 MB model takes
    # tens of milliseconds: /health, /metrics and other requests must not wait for it.

    def _take_out_locked(self, resident: Resident, *, kind: str, detail: str = "",
                         by: str = "") -> tuple[Resident, str, str, str]:
        """Take an idle resident out of service; the caller must ``_close`` it, unlocked."""
        assert resident.users == 0, "never unload a model in use"
        self._residents.pop(resident.name, None)
        resident.state = "unloading"
        self._closing[resident.name] = resident
        return resident, kind, detail, by

    def _close(self, resident: Resident, kind: str, detail: str = "", by: str = "") -> None:
        """Close a taken-out resident (never under the pool lock) and report it."""
        try:
            with self._close_lock:
                model, resident.model = resident.model, None
                own_before = model_rss_mb(model)
                rss_before = own_before if own_before is not None else process_rss_mb()
                if model is not None:
                    try:
                        model.close()
                    except Exception:  # a failing close must not keep the slot
                        log.exception("closing model %s failed", resident.name)
                    release_free_heap()
                if own_before is not None:
                    # Its own process: what it still holds after close() (0 once it is gone).
                    freed = own_before - (model_rss_mb(model) or 0.0)
                else:
                    freed = rss_before - process_rss_mb()
        finally:
            with self._cond:
                if self._closing.get(resident.name) is resident:
                    del self._closing[resident.name]
                self._cond.notify_all()  # a reload of this model may go on
        log.info("%s model %s%s; RSS -%.0f MB", {"evict": "evicted", "expire": "expired",
                                                 "unload": "unloaded"}.get(kind, kind),
                 resident.name, f" (to load {by}: {detail})" if by else
                 f" ({detail})" if detail else "", freed)
        if kind == "evict":
            self.hooks.emit("model_evicted", resident.name, reason=detail, by=by,
                            rss_mb=resident.ram_mb)
        else:
            # A client's keep_alive 0 is told apart from an operator's unload.
            reason = {"shutdown": "shutdown", KEEP_ALIVE_0: "keep_alive"}.get(detail, kind)
            self.hooks.emit("model_unloaded", resident.name, reason=reason,
                            rss_mb=resident.ram_mb)
        self._verify_unload(resident, freed)
        if resident.prewarm_pending:
            resident.prewarm_pending = False
            self.hooks.emit("prewarm_wasted", resident.name,
                            reason=f"{kind} before any request used it")

    def _verify_unload(self, resident: Resident, freed_mb: float) -> None:
        """Check that closing gave back about what loading took (measured, else estimated)."""
        expected = resident.measured_mb if resident.measured_mb else resident.estimated_mb
        if expected < UNLOAD_VERIFY_MIN_MB or freed_mb >= UNLOAD_VERIFY_RATIO * expected:
            return
        log.warning("unloading model %s freed only %.0f MB of RSS; its load took "
                    "%.0f MB: the backend may not release its memory", resident.name,
                    freed_mb, expected)
        self.hooks.emit("unload_unverified", resident.name, expected_mb=expected,
                        freed_mb=freed_mb)

    def _drop_dead_locked(self, resident: Resident, detail: str) -> None:
        """Forget an instance that died: the next request loads the model again. Closed now
        if nobody uses it, else by its last user (``_release``)."""
        if resident.state == "dead":
            return
        if self._residents.get(resident.name) is resident:
            self._residents.pop(resident.name)
        resident.state = "dead"
        log.warning("model %s: its instance died (%s); the next request loads it again",
                    resident.name, detail)
        self.hooks.emit("model_crashed", resident.name, detail=detail)
        if resident.users == 0:
            self._close_dead_locked(resident)
        self._cond.notify_all()

    def _close_dead_locked(self, resident: Resident) -> None:
        model, resident.model = resident.model, None
        if model is None:
            return
        try:
            model.close()  # reaps the dead process and whatever it left
        except Exception:
            log.exception("closing dead model %s failed", resident.name)

    def _refresh_measured_locked(self) -> None:
        """Budget resident models that measure themselves (child processes) with what they
        hold now: a server's caches grow after its load."""
        for resident in self._residents.values():
            if resident.state != "loaded":
                continue
            own = model_rss_mb(resident.model)
            if own is not None and own > 0:
                resident.measured_mb = own
                resident.ram_mb = max(resident.estimated_mb, own)

    def unload(self, name: str) -> bool:
        """Unload ``name`` now if it is loaded and idle (pinned too: an explicit request)."""
        with self._cond:
            resident = self._residents.get(name)
            if resident is None or not resident.idle:
                return False
            taken = self._take_out_locked(resident, kind="unload")
        self._close(*taken)
        return True

    def keep_alive(self, name: str, seconds: float | None) -> str:
        """A client's ``keep_alive`` for ``name``'s loaded instance, within the operator's
        policy: ``0`` unloads it once the requests using it end (now if none does);
        ``seconds > 0`` sets its idle limit to that many seconds, replacing the TTL;
        ``None`` gives the TTL back. A pinned model is never touched; the budget and
        ``max_loaded`` may still evict it. The caller caps ``seconds``.

        Returns what happened: ``not_loaded``, ``pinned``, ``unloaded``, ``unload_pending``
        (in use: unloaded when its last request ends) or ``set``.
        """
        taken = None
        with self._cond:
            resident = self._residents.get(name)
            if resident is None or resident.state not in ("loaded", "loading"):
                return "not_loaded"
            if resident.pinned:
                return "pinned"
            if seconds is not None and seconds <= 0:
                resident.unload_after_use = True
                if resident.idle:
                    taken = self._take_out_locked(resident, kind="unload",
                                                  detail=KEEP_ALIVE_0)
            else:
                resident.unload_after_use = False
                resident.keep_alive_s = seconds
        if taken is not None:
            self._close(*taken)
            return "unloaded"
        return "unload_pending" if seconds is not None and seconds <= 0 else "set"

    def expires_in(self, name: str, now: float | None = None) -> float | None:
        """Seconds until ``name`` expires if it stays idle (0 when due; None: pinned, not
        loaded, or in use, whose idle clock has not started)."""
        now = self.clock() if now is None else now
        with self._cond:
            resident = self._residents.get(name)
            if resident is None or resident.pinned or not resident.idle:
                return None
            limit = (resident.keep_alive_s if resident.keep_alive_s is not None
                     else self.config.ttl_for(resident.spec))
            return max(0.0, resident.last_used + limit - now)

    def unload_when_idle(self, name: str, *, timeout: float | None = None,
                         cancel: threading.Event | None = None) -> bool:
        """An operator's unload: wait until no request uses or waits for ``name``, then
        unload it. Requests keep being served meanwhile; the model goes as soon as it is
        idle. Returns False if it was not resident.

        Raises :class:`ModelPinned` for a pinned model (the config holds it), and
        :class:`ModelBusy` if it is still in use after ``timeout`` seconds (default: the
        pool's ``wait_seconds``) or ``cancel`` is set.
        """
        spec = self.config.models.get(name)
        if spec is None:
            raise PoolError(f"cannot unload {not_configured(name, self.config.models)}")
        if spec.pinned:
            raise ModelPinned(f"model {name!r} is pinned ([models.{name}] pinned = true): it "
                              "stays loaded while the server runs; unpin it in the config "
                              "to unload it")
        wait = self.wait_seconds if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                resident = self._residents.get(name)
                if resident is None and name not in self._closing:
                    return False
                if resident is not None and resident.idle:
                    taken = self._take_out_locked(resident, kind="unload", detail="asked")
                    break
                # Loading, in use, or being closed by someone else: look again when the
                # pool changes (every release notifies).
                remaining = deadline - time.monotonic()
                users = resident.users if resident is not None else 0
                in_use = (f"{users} request{'s' if users != 1 else ''} generating or "
                          "queued")
                if cancel is not None and cancel.is_set():
                    raise ModelBusy(f"gave up unloading model {name!r}: cancelled while "
                                    f"it was still in use ({in_use})")
                if remaining <= 0:
                    raise ModelBusy(f"model {name!r} is still in use ({in_use}) after "
                                    f"{wait:g} s; try again later")
                self._cond.wait(timeout=min(remaining, 0.5))
        self._close(*taken)
        return True

    def status(self) -> list[dict[str, Any]]:
        """Every configured model's residency as the operator sees it (``models ps``, the
        admin API, the page): ``state`` (unloaded, loading, loaded, unloading), ``rss_mb``
        (what it holds: measured, else estimated; None when unloaded), ``pinned``,
        ``in_flight`` (generating now), ``queued`` (waiting for the load or a slot),
        ``last_used`` (wall clock, None before its first request ends), ``idle_seconds``,
        ``ttl_seconds`` and ``expires_at`` / ``expires_in_seconds``: when the TTL unloads it
        if it stays idle (None when pinned, busy or not loaded; the reaper runs every
        ``[cache] reap_interval_seconds``, so it goes within that much after)."""
        now, wall = self.clock(), time.time()
        with self._cond:
            held = {**{r.name: r for r in self._closing.values()}, **self._residents}
            rows = []
            for name in self.names():
                spec = self.spec_of(name)
                resident = held.get(name)
                ttl = None if spec.pinned else self.config.ttl_for(spec)
                row: dict[str, Any] = {
                    "name": name, "state": "unloaded", "pinned": spec.pinned,
                    "backend": spec.backend, "rss_mb": None, "estimated_mb": None,
                    "in_flight": 0, "queued": 0, "concurrency": None, "last_used": None,
                    "idle_seconds": None, "ttl_seconds": ttl, "expires_at": None,
                    "expires_in_seconds": None, "load_seconds": self._load_seconds.get(name),
                }
                if resident is not None:
                    loaded = resident.state == "loaded"
                    row.update(
                        state=resident.state, rss_mb=round(resident.ram_mb, 1),
                        estimated_mb=round(resident.estimated_mb, 1),
                        in_flight=resident.active,
                        queued=max(0, resident.queued - resident.active),
                        concurrency=resident.concurrency)
                    # A request's end restarts the idle clock; a load alone does not count.
                    if loaded and resident.last_used > resident.loaded_at:
                        row["last_used"] = round(wall - (now - resident.last_used), 3)
                    if resident.idle:
                        idle = max(0.0, now - resident.last_used)
                        row["idle_seconds"] = round(idle, 1)
                        # A client's keep_alive (the Ollama dialect), where the pool keeps
                        # one, replaces the TTL for this instance.
                        limit = getattr(resident, "keep_alive_s", None)
                        limit = ttl if limit is None or spec.pinned else limit
                        if limit is not None:
                            left = max(0.0, limit - idle)
                            row["expires_in_seconds"] = round(left, 1)
                            row["expires_at"] = round(wall + left, 3)
                rows.append(row)
        return rows

    def reap(self, now: float | None = None) -> list[str]:
        """Unload every idle model the cache policy says has expired; return their names."""
        now = self.clock() if now is None else now
        taken: list[tuple[Resident, str, str, str]] = []
        with self._cond:
            for resident in list(self._residents.values()):
                if resident.state == "loaded" and not model_alive(resident.model):
                    self._drop_dead_locked(resident, "found dead by the reaper")
            self._refresh_measured_locked()
            for resident in list(self._residents.values()):
                if not resident.idle or resident.pinned:
                    continue
                if resident.unload_after_use:
                    expired = True
                elif resident.keep_alive_s is not None:  # a client's, within the cap
                    expired = now - resident.last_used >= resident.keep_alive_s
                else:
                    expired = self.hooks.model_expired(resident=resident.info(), now=now,
                                                       cache=self.config.cache)
                if expired:
                    taken.append(self._take_out_locked(
                        resident, kind="expire", detail=f"idle {now - resident.last_used:.1f}s"))
        for item in taken:
            self._close(*item)
        return [resident.name for resident, *_ in taken]

    def trim_if_idle(self) -> bool:
        """Give freed memory back to the OS when no generation runs and one ended since
        the last time: collect Python's cyclic garbage (requests leave cycles: frames,
        exceptions, generators), then ``malloc_trim``. Generation threads free their
        buffers into glibc's arenas, which keep them; without this a server's idle RSS
        creeps up with the requests it served."""
        with self._cond:
            if not self._heap_dirty or any(r.users for r in self._residents.values()):
                return False
            self._heap_dirty = False
        gc.collect()
        release_free_heap()
        return True

    def start_reaper(self, interval: float | None = None) -> None:
        """Reap in a background thread every ``interval`` seconds until ``close()``; trim
        the heap when idle."""
        if self._reaper is not None:
            return
        interval = interval or self.config.cache.reap_interval_seconds

        # Event.wait overflows on huge timeouts; nobody means more than an hour here.
        period = min(interval, 3600.0)

        def run() -> None:
            while not self._stop.wait(period):
                try:
                    self.reap()
                    self.trim_if_idle()
                except Exception:
                    log.exception("the reaper failed; it will try again")

        self._reaper = threading.Thread(target=run, name="sarai-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        with self._cond:
            taken = [self._take_out_locked(resident, kind="unload", detail="shutdown")
                     for resident in list(self._residents.values())
                     if resident.state == "loaded" and resident.users == 0]
        for item in taken:
            self._close(*item)


def _check_cancel(cancel: threading.Event | None, name: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"request for {name!r} cancelled while queued")


class _Use:
    """What :meth:`ModelPool.use` returns: an async context manager, and for a thread
    without an event loop a plain one that runs the same steps on the shared loop."""

    __slots__ = ("pool", "name", "queue_limit", "cancel", "_held")

    def __init__(self, pool: ModelPool, name: str, queue_limit: int | None,
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
