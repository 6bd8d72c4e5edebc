"""The replicas of one remote model: least-busy (or prefix-affine) choice among the healthy
ones, and exponential cooldowns for those that fail."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

import attrs

from .balance import BalanceSettings, PrefixIndex, PrefixKey
from .redaction import redact_url

log = logging.getLogger(__name__)

BASE_COOLDOWN_SECONDS = 1.0


def endpoint_url(base_url: str, path: str) -> str:
    """``{base_url}/{path}`` keeping the base URL's query (``?api-version=...``) at the end."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{path}",
                       parts.query, ""))


@attrs.define(eq=False)
class Replica:
    """One endpoint of a model and what the router knows of its health (this process only)."""

    url: str
    shown: str  # the URL as it may be shown
    chat_url: str = ""
    inflight: int = 0
    failures: int = 0  # consecutive
    cooldown_until: float = 0.0
    last_error: str = ""
    requests: int = 0
    errors: int = 0
    #: time.monotonic() of the latest token any stream got from it
    last_token_at: float = 0.0

    def state(self, now: float) -> str:
        if now < self.cooldown_until:
            return "cooling"
        return "probing" if self.failures else "healthy"

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"url": self.shown, "state": self.state(now), "inflight": self.inflight,
                "consecutive_failures": self.failures,
                "cooldown_seconds_left": round(max(0.0, self.cooldown_until - now), 2),
                "last_error": self.last_error or None, "requests": self.requests,
                "errors": self.errors}


class ReplicaSet:
    """Least-busy (or prefix-affine) choice among healthy replicas, with exponential
    cooldowns (thread-safe: the sync path runs on worker threads, the async one on the
    event loop)."""

    def __init__(self, urls: Sequence[str], *, max_cooldown: float,
                 clock=time.monotonic, balance: BalanceSettings | None = None):
        self.replicas = [Replica(url=u, shown=redact_url(u),
                                 chat_url=endpoint_url(u, "chat/completions")) for u in urls]
        self.max_cooldown = max_cooldown
        #: ``balance = "prefix"`` with more than one replica: where each prefix was served
        self.balance = balance if balance is not None and balance.balance == "prefix" \
            and len(self.replicas) > 1 else None
        self.index = None if self.balance is None else PrefixIndex(
            self.balance.prefix_index_blocks)
        self.clock = clock
        self._lock = threading.Lock()
        self._turn = 0  # rotates ties so equally busy replicas share the load

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The least busy replica that may take a request now, counted in; None if none."""
        return self.choose(exclude)[0]

    def choose(self, exclude: Sequence[Replica] = (),
               key: PrefixKey | None = None) -> tuple[Replica | None, str]:
        """The replica for a request, counted in, and how it was placed: ``"hit"`` (it
        holds the request's prefix), ``"miss"`` (a request with history placed least busy)
        or ``""`` (no prefix balancing for it). None if no replica may take it now.

        A replica whose cooldown is over takes the next request, to probe it; otherwise the
        prefix's replica (``balance = "prefix"``, see :mod:`.balance`) or the least busy.
        """
        with self._lock:
            now = self.clock()
            n = len(self.replicas)
            best: Replica | None = None
            probe = False
            for i in range(n):
                replica = self.replicas[(self._turn + i) % n]
                if replica in exclude or now < replica.cooldown_until:
                    continue
                if replica.failures:
                    if replica.inflight:
                        continue  # probing: one request at a time until it answers
                    best, probe = replica, True  # its cooldown is over: it probes
                    break
                if best is None or replica.inflight < best.inflight:
                    best = replica
            placed = ""
            if best is not None and not probe and key is not None and self.index is not None:
                best, placed = self._by_prefix(key, best, exclude)
            if best is not None:
                self._turn = (self._turn + 1) % n
                best.inflight += 1
                best.requests += 1
                if key is not None and self.index is not None:
                    self.index.record(key, best)
            return best, placed

    def _by_prefix(self, key: PrefixKey, least: Replica,
                   exclude: Sequence[Replica]) -> tuple[Replica, str]:
        """The replica of ``key``'s history when it may take it, else ``least``."""
        if not key.history:
            return least, ""
        assert self.index is not None and self.balance is not None
        owner, matched = self.index.longest(key)
        if (not isinstance(owner, Replica) or owner in exclude or owner.failures
                or matched < self.balance.prefix_min_match * key.history_chars):
            return least, "miss"
        overloaded = (owner.inflight - least.inflight > self.balance.prefix_overload_inflight
                      and owner.inflight > least.inflight * self.balance.prefix_overload_ratio)
        return (least, "miss") if overloaded else (owner, "hit")

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1

    def succeeded(self, replica: Replica) -> None:
        with self._lock:
            if replica.failures:
                log.info("endpoint %s answers again", replica.shown)
            replica.failures = 0
            replica.cooldown_until = 0.0

    def failed(self, replica: Replica, error: str) -> float:
        """Cool ``replica`` down; returns the cooldown in seconds.

        Requests that were already in flight when it started failing fail together: they
        are one outage, so a replica already cooling down keeps its cooldown.
        """
        with self._lock:
            now = self.clock()
            replica.errors += 1
            replica.last_error = error
            if now < replica.cooldown_until:
                return replica.cooldown_until - now
            replica.failures += 1
            cooldown = min(self.max_cooldown,
                           BASE_COOLDOWN_SECONDS * 2 ** (replica.failures - 1))
            replica.cooldown_until = now + cooldown
            if self.index is not None:
                self.index.forget(replica)
        log.warning("endpoint %s failed (%s); cooling down for %.0f s", replica.shown, error,
                    cooldown)
        return cooldown

    def next_ready_in(self) -> float:
        with self._lock:
            now = self.clock()
            return max(0.0, min((r.cooldown_until - now for r in self.replicas), default=0.0))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            return [r.snapshot(now) for r in self.replicas]
