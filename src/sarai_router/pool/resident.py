"""What the pool holds of one model: the :class:`Resident` record (loading, loaded,
unloading or dead; its users, slots and waiters) and its snapshots."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import attrs

from ..backend import LoadedModel
from ..config import ModelSpec
from ..types import ResidentInfo

log = logging.getLogger(__name__)

__all__ = ["KEEP_ALIVE_0", "Resident", "model_alive"]

#: The detail of an unload a client's ``keep_alive: 0`` asked for.
KEEP_ALIVE_0 = "keep_alive 0"


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
