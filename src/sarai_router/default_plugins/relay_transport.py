"""httpx's async transport for streamed answers, with a cheaper read timeout.

httpcore bounds every socket read with ``anyio.fail_after``: a cancel scope that costs
~10 µs of CPU to enter and leave (anyio 4.16), paid for each chunk an upstream streams,
i.e. once per token: 15 % of the serve process's samples in a profile of 16 relayed
streams. Here the same bound is a timer on the event loop (``loop.call_later``, ~2-3 µs):
a read that waits longer than its timeout is cancelled and raises
:class:`httpcore.ReadTimeout`, as before.
Everything else (connecting, TLS, writes, the pool) is httpcore's own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import httpcore
import httpx

__all__ = ["streaming_transport"]


class _TimedReads(httpcore.AsyncNetworkStream):
    """A stream of httpcore's anyio backend whose reads are bounded by a loop timer."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, byte_stream: Any) -> None:
        self._inner = inner
        self._bytes = byte_stream  # the anyio byte stream under ``inner``

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if timeout is None:
            return await self._receive(max_bytes)
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - httpcore reads from a task
            return await self._inner.read(max_bytes, timeout)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            return await self._receive(max_bytes)
        except asyncio.CancelledError:
            if not expired:
                raise
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11 counts cancels
            if uncancel is not None:
                uncancel()
            raise httpcore.ReadTimeout("timed out") from None
        finally:
            timer.cancel()

    async def _receive(self, max_bytes: int) -> bytes:
        # The errors httpcore's anyio stream maps, mapped the same way.
        try:
            return await self._bytes.receive(max_bytes=max_bytes)
        except anyio.EndOfStream:
            return b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _wrap(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _wrap(stream: httpcore.AsyncNetworkStream) -> httpcore.AsyncNetworkStream:
    byte_stream = getattr(stream, "_stream", None)
    if byte_stream is None or not hasattr(byte_stream, "receive"):
        return stream  # not the anyio stream this knows: httpcore's reads as they are
    return _TimedReads(stream, byte_stream)


class _Backend(httpcore.AnyIOBackend):
    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _wrap(await super().connect_tcp(*args, **kwargs))


def streaming_transport(**kwargs: Any) -> httpx.AsyncHTTPTransport:
    """``httpx.AsyncHTTPTransport(**kwargs)`` whose connections read with a loop timer.
    On an httpx whose transport is built otherwise, httpx's own transport as it is."""
    transport = httpx.AsyncHTTPTransport(**kwargs)
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = _Backend()
    return transport
