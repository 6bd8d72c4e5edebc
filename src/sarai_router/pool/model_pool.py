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

:class:`ModelPool` holds the state and answers queries; its other parts act on that state
under its lock: handing a model and a slot to a request (``slots``), loading and making
room (``loading``), taking out and closing (``unloading``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..config import Config, ModelSpec
from ..errors import PoolError
from ..load_queue import LoadQueue
from ..types import COLD_LOAD_MB_PER_S, Residency
from .loading import PoolLoading
from .resident import Resident
from .slots import PoolSlots
from .unloading import PoolUnloading

if TYPE_CHECKING:
    from ..plugins import Hooks

log = logging.getLogger(__name__)

__all__ = ["ModelPool"]


class ModelPool(PoolSlots, PoolLoading, PoolUnloading):
    """The models this process holds, within ``[cache]``'s limits (see the module)."""

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
        #: residents that are none of the config's models (a plugin's, the speech model),
        #: each with the backend that loads it: see ``add_resident``
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
        """``name``'s spec: a configured model's, or an added resident's; None if neither."""
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
