"""Unloading a model: evicted, expired (the reaper), asked for (an operator, a client's
``keep_alive``), dead, or at shutdown; closing it outside the pool's lock, and checking that
its memory came back.

In two steps: under the lock, an idle model is taken out of the residents (nobody can start
using it any more; it shows as "unloading"); then, with the lock released, it is closed, the
heap trimmed and the RSS drop checked. Closing a 250 MB model takes tens of milliseconds:
/health, /metrics and other requests must not wait for it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

from ..errors import ModelBusy, ModelPinned, PoolError, not_configured
from ..memory import model_rss_mb, process_rss_mb, release_free_heap
from .resident import KEEP_ALIVE_0, Resident, model_alive

log = logging.getLogger(__name__)

__all__ = ["PoolUnloading"]


#: A verified unload must give back at least this share of what the load took.
UNLOAD_VERIFY_RATIO = 0.5
#: Below this size an unload is not checked: RSS noise is of the same order.
UNLOAD_VERIFY_MIN_MB = 16.0


class PoolUnloading:
    """The part of :class:`~sarai_router.pool.ModelPool` that takes models out and closes
    them (``self`` is the pool)."""

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

    def unload_when_idle(self, name: str, *, timeout: float | None = None,
                         cancel: threading.Event | None = None) -> bool:
        """An operator's unload: wait until no request uses or waits for ``name``, then
        unload it. Requests keep being served meanwhile; the model goes as soon as it is
        idle. Returns False if it was not resident.

        Raises :class:`ModelPinned` for a pinned model (the config holds it), and
        :class:`ModelBusy` if it is still in use after ``timeout`` seconds (default: the
        pool's ``wait_seconds``) or ``cancel`` is set.
        """
        spec = self.spec_of(name)
        if spec is None:
            raise PoolError(f"cannot unload {not_configured(name, self.names())}")
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
