"""An upstream's server-sent events: its bytes split into lines (validated, bounded), and
the ways a stream can be bad."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Mapping

from ..backend import TokenLogprob, Usage
from .replicas import Replica

#: SSE field names besides ``data`` (https://html.spec.whatwg.org/#event-stream-interpretation)
_SSE_FIELDS = frozenset({"event", "id", "retry"})
#: The longest SSE line taken from an upstream, in bytes. A chunk with 20 top logprobs is
#: a few KB and a whole answer sent as one chunk a few hundred; a longer line is refused
#: as it arrives, never buffered whole.
MAX_SSE_LINE_BYTES = 1 << 20
#: The most of an upstream's error body read (its message is cut to 1,000 characters).
MAX_ERROR_BODY_BYTES = 64 * 1024


class _SSELines:
    """An upstream's bytes split into SSE lines (UTF-8, ``\\n`` or ``\\r\\n`` ended), at
    most MAX_SSE_LINE_BYTES each; _BadStream for bytes that are neither."""

    def __init__(self) -> None:
        #: the start of a line whose end has not come yet, in pieces (joined once, when
        #: it comes: an upstream that trickles a long line byte by byte costs O(n))
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def feed(self, data: bytes) -> list[str]:
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return []
        if self._pending:
            head = b"".join(self._pending) + data[:end]
            self._pending, self._pending_bytes = [], 0
        else:
            head = data[:end]
        self._hold(data[end + 1:])
        return self._lines(head)

    def end(self) -> list[str]:
        rest = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        return self._lines(rest) if rest else []

    def _hold(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > MAX_SSE_LINE_BYTES:
                raise _BadStream(f"it sent a line longer than {MAX_SSE_LINE_BYTES} bytes")

    @staticmethod
    def _lines(data: bytes) -> list[str]:
        """Whole lines, decoded at once (the common chunk is one event: two lines)."""
        if len(data) > MAX_SSE_LINE_BYTES and any(
                len(line) > MAX_SSE_LINE_BYTES for line in data.split(b"\n")):
            raise _BadStream(f"it sent a line longer than {MAX_SSE_LINE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadStream("it sent bytes that are not UTF-8 text") from None
        return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


async def _aread_capped(chunks: AsyncIterator[bytes]) -> bytes:
    """An error body, at most MAX_ERROR_BODY_BYTES of it."""
    out = b""
    async for data in chunks:
        out += data
        if len(out) >= MAX_ERROR_BODY_BYTES:
            break
    return out[:MAX_ERROR_BODY_BYTES]


class _FirstTokenTimeout(Exception):
    """No token within ``timeout_seconds`` although the upstream kept the stream open."""


class _MidStreamError(Exception):
    """The upstream sent an error event inside the stream."""


class _BadStream(_MidStreamError):
    """The upstream's answer is not a valid event stream: bytes that are not SSE, a line
    over MAX_SSE_LINE_BYTES, a chunk that is not JSON, or an end without a finish reason
    or ``[DONE]``. Before the first token it is a failed endpoint (the next replica or
    fallback answers, else 502); after it, the answer ends with an error."""


def _is_transport(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException, _FirstTokenTimeout,
                            OSError))


def _collect_calls(pieces: Any, calls: dict[int, dict[str, str]]) -> bool:
    """Add a chunk's ``delta.tool_calls`` pieces to ``calls`` (OpenAI streams a call's id
    and name once, its arguments in pieces); whether there were any."""
    if not isinstance(pieces, list):
        return False
    for piece in pieces:
        if not isinstance(piece, dict):
            continue
        index = piece.get("index") if isinstance(piece.get("index"), int) else len(calls)
        call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        if isinstance(piece.get("id"), str):
            call["id"] = piece["id"]
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                call[key] += function[key]
    return bool(pieces)


def _token_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """A chunk's ``logprobs.content`` as TokenLogprobs; () when absent or malformed."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return ()

    def raw(item: Mapping[str, Any]) -> tuple[int, ...]:
        given = item.get("bytes")
        return tuple(given) if isinstance(given, list) else tuple(str(item["token"]).encode())

    try:
        return tuple(TokenLogprob(token=str(item["token"]), logprob=float(item["logprob"]),
                                  bytes=raw(item),
                                  top=tuple((str(t["token"]), float(t["logprob"]), raw(t))
                                            for t in item.get("top_logprobs") or ()))
                     for item in content)
    except (KeyError, TypeError, ValueError):
        return ()


class _Attempt:
    """One request to one replica: what its answer taught us so far."""

    __slots__ = ("replica", "placed", "started", "usage", "finish_reason", "pieces",
                 "produced", "calls", "done", "chunks", "max_chunks", "cut")

    def __init__(self, replica: Replica, placed: str = "", max_chunks: int = 0) -> None:
        self.replica = replica
        #: how the replica was chosen: "hit" / "miss" (balance = "prefix"), else ""
        self.placed = placed
        self.started = time.monotonic()
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.pieces = 0
        self.produced = False
        #: tool calls streamed so far, by index: id, name and the arguments' pieces
        self.calls: dict[int, dict[str, str]] = {}
        #: the upstream sent ``data: [DONE]``
        self.done = False
        #: chunks that carried text or a tool call's piece, and how many max_tokens allows
        #: (an upstream sends one token a chunk; 0: no limit)
        self.chunks = 0
        self.max_chunks = max_chunks
        #: the router ended the answer at max_tokens (the upstream kept going)
        self.cut = False
