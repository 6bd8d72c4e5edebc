"""The ``admin`` plugin's event hub: every event of this process, kept for a few minutes
and fanned out to the open event streams (``GET /admin/events``)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, Callable

#: How many recent events, at most, a new event stream is sent first (the page's feed and
#: its throughput and latency charts start from them)...
RECENT_EVENTS = 1000
#: ... and how far back they may go.
RECENT_SECONDS = 15 * 60
#: Events waiting for a slow reader before it starts losing them (it is told how many).
SUBSCRIBER_BACKLOG = 2000


def event_json(event: Any) -> dict[str, Any]:
    """An ``observe`` event as the stream sends it: kind, model, time (wall clock), data."""
    return {"kind": str(event.kind), "model": event.model, "time": float(event.time),
            "data": dict(event.data or {})}


class Subscriber:
    """One open event stream: frames handed over from any thread to its event loop."""

    def __init__(self, put: Callable[[str], None], wake: Callable[[Callable[[], None]], None]):
        self._put = put
        self._wake = wake
        self.lost = 0
        self.closed = False
        self.pending = 0
        self._lock = threading.Lock()

    def offer(self, frame: str) -> None:
        with self._lock:
            if self.closed:
                return
            if self.pending >= SUBSCRIBER_BACKLOG:
                self.lost += 1  # a reader that stopped reading must not grow the server
                return
            self.pending += 1
        try:
            self._wake(lambda: self._put(frame))
        except RuntimeError:  # its loop is closed: nobody reads any more
            self.closed = True

    def taken(self) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self.closed = True
        try:
            self._wake(lambda: self._put(""))  # an empty frame ends the stream
        except RuntimeError:
            pass


class EventHub:
    """Every event of this process, kept for :data:`RECENT_SECONDS` and fanned out to the
    open event streams. Safe to call from any thread (generations run on worker threads).

    One per process: the ``observe`` hook is not told which engine an event came from, and
    a server process runs one engine.
    """

    def __init__(self, keep: int = RECENT_EVENTS, keep_seconds: float = RECENT_SECONDS):
        self.keep_seconds = keep_seconds
        self._recent: deque[tuple[float, str]] = deque(maxlen=keep)
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self.published = 0
        #: Set while a server runs (``startup`` to ``shutdown``): a one-shot command such as
        #: ``route`` or ``bench`` has nobody to show its events to, and pays nothing.
        self.active = False

    def publish(self, event: Any) -> None:
        frame = json.dumps({"type": "event", **event_json(event)}, default=str,
                           ensure_ascii=False, allow_nan=False)
        with self._lock:
            self.published += 1
            self._recent.append((time.time(), frame))
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.offer(frame)

    def recent(self) -> list[str]:
        """The frames of the last :attr:`keep_seconds`, oldest first."""
        since = time.time() - self.keep_seconds
        with self._lock:
            return [frame for when, frame in self._recent if when >= since]

    def subscribe(self, put: Callable[[str], None],
                  wake: Callable[[Callable[[], None]], None]) -> Subscriber:
        subscriber = Subscriber(put, wake)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def close_all(self) -> None:
        with self._lock:
            subscribers, self._subscribers = list(self._subscribers), set()
        for subscriber in subscribers:
            subscriber.close()

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


HUB = EventHub()
