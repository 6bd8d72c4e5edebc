"""Loading a model: a request's place in the load queue, making room within the budget
(asking the cache hooks which idle model to evict), pre-warming, and the load itself."""

from __future__ import annotations

import logging
import threading
import time

from ..config import ModelSpec
from ..errors import BackendError, Cancelled, PoolError, QueueFull, not_configured
from ..load_queue import Ticket
from ..memory import model_rss_mb, process_rss_mb
from .resident import Resident, model_alive

log = logging.getLogger(__name__)

__all__ = ["PoolLoading"]


def _check_cancel(cancel: threading.Event | None, name: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"request for {name!r} cancelled while queued")


class PoolLoading:
    """The part of :class:`~sarai_router.pool.ModelPool` that loads models and makes room
    for them (``self`` is the pool)."""

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
        """How many of these residents count against ``[cache] max_loaded`` (the added
        ones do not)."""
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
