"""What the router did, as one stream of events: every ``observe`` plugin sees every one.

The core emits through ``Hooks.emit(kind, model=None, **data)``; each observer (a plugin's
``observe`` hook, or the core's own subscribers such as the server's metrics) receives the
same frozen :class:`Event`. An observer that raises is logged and counted, and the request
goes on unharmed.

Request-scoped events carry ``request_id`` in their data: the HTTP ``x-request-id`` of a
served request, a fresh id for each CLI request, or a fresh id per ``Engine.prepare`` for a
Python caller that opened no :func:`request_scope`.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import attrs

__all__ = ["EVENT_KINDS", "Event", "REQUEST_ID", "SOURCE", "begin_request", "new_request_id",
           "request_scope"]


def _read_only(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` as a read-only mapping: a copy, unless it is one already (``Hooks.emit``
    hands over a dict of its own, wrapped, so each event costs no copy)."""
    return data if type(data) is MappingProxyType else MappingProxyType(dict(data))


@attrs.frozen
class Event:
    """One thing that happened.

    ``kind``: what (see :data:`EVENT_KINDS`); ``model``: the model it concerns, or None;
    ``time``: wall clock (``time.time()``); ``data``: a read-only mapping that serialises
    to JSON (``json.dumps(dict(event.data))``).
    """

    kind: str
    model: str | None
    time: float
    data: Mapping[str, Any] = attrs.field(converter=_read_only)

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-ready data."""
        return {"kind": self.kind, "model": self.model, "time": self.time,
                "data": dict(self.data)}


#: Every kind the core emits, with its main data keys. Request-scoped kinds carry
#: ``request_id`` too.
EVENT_KINDS: Mapping[str, str] = MappingProxyType({
    "routed": "request_id, plugin, reason, signals, fallback (no plugin chose: the default "
              "model), source (cli, http, python)",
    "queued": "request_id, position (how many waited before it)",
    "generation_started": "request_id, load_s (0 when the model was loaded already)",
    "generation_finished": "request_id, prompt_tokens, completion_tokens, ttft_s, "
                           "generation_s, total_s, tokens_per_second, finish_reason, "
                           "stopped_by, placement (the replica, for a model with several)",
    "generation_dropped": "request_id (cancelled while queued: the model never saw it)",
    "runaway_stopped": "request_id, reason (the runaway guard ended the answer)",
    "time_limit_stopped": "request_id, reason (max_request_seconds or "
                          "max_token_sampling_seconds ended the answer)",
    "fallback": "request_id, from_model, to_model, reason",
    "transcribed": "request_id, language, seconds, chars, plugin",
    "model_loading": "(a load starts)",
    "model_loaded": "load_s, rss_mb",
    "model_unloaded": "reason (expire, unload, shutdown, keep_alive: a client's keep_alive 0), "
                      "rss_mb",
    "model_evicted": "reason, by (the model it made room for), rss_mb",
    "load_failed": "error",
    "model_crashed": "detail (a loaded instance died and was dropped)",
    "unload_unverified": "expected_mb, freed_mb (RSS did not drop by about the model's size)",
    "queue_full": "queue_size (a request was refused: the model's queue was full)",
    "prewarm_started": "reason, load_s, rss_mb (a background pre-load finished loading)",
    "prewarm_used": "(a request came for a pre-warmed model)",
    "prewarm_wasted": "reason (unloaded before any request used it)",
    "prewarm_skipped": "reason (no room without evicting)",
    "request_refused": "request_id, status, code, message (an HTTP request answered "
                       "with an error status, or failed mid-stream)",
})

#: The id of the request being answered (the server's outermost middleware sets it).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("sarai_request_id", default="")
#: Which front end the request came through: "http", "cli", or "python".
SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("sarai_request_source",
                                                             default="python")
# Set by request_scope: the front end owns the id, so Engine.prepare must not replace it.
_SCOPED: contextvars.ContextVar[bool] = contextvars.ContextVar("sarai_request_scoped",
                                                               default=False)


def new_request_id() -> str:
    import uuid  # here: ``sarai-router route`` imports this module and counts milliseconds

    return f"req_{uuid.uuid4().hex[:20]}"


@contextmanager
def request_scope(source: str, request_id: str | None = None) -> Iterator[str]:
    """One request of a front end: its events carry ``request_id`` (fresh if not given)
    and ``source``."""
    request_id = request_id or new_request_id()
    tokens = (REQUEST_ID.set(request_id), SOURCE.set(source), _SCOPED.set(True))
    try:
        yield request_id
    finally:
        for var, token in zip((REQUEST_ID, SOURCE, _SCOPED), tokens):
            var.reset(token)


def begin_request() -> str:
    """The id of the request starting now: the front end's, or a fresh one when no
    :func:`request_scope` is open (each ``Engine.prepare`` is then its own request)."""
    if _SCOPED.get():
        return REQUEST_ID.get()
    request_id = new_request_id()
    REQUEST_ID.set(request_id)
    return request_id
