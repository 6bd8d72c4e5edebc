"""The HTTP/1.1 client of streamed answers: an asyncio protocol whose responses are parsed
by llhttp (``httptools``, the C parser uvicorn uses), for the one request the relay sends
per answer (``POST .../chat/completions``, streamed back).

Why not httpx here: reading a streamed body through httpx, httpcore and h11 (all pure
Python) was the largest share of the router's CPU per relayed token (27 %, ~69 µs of
~0.23 ms in a py-spy profile of 16 relayed streams); a protocol fed by the event loop with
llhttp's callbacks does that work in C. Everything else (``embed``, health checks) stays
on httpx. Failures are raised as httpx's own exceptions (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``), so that
callers map them as before. Proxies are not needed: the router's clients never honoured
them (``trust_env = False``).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from typing import Any, AsyncIterator, Mapping
from urllib.parse import unquote

import httptools
import httpx

__all__ = ["CLOSED_UNANSWERED", "RelayClient", "RelayResponse"]

#: what is raised when a connection closes before any byte of the answer (httpcore's words)
CLOSED_UNANSWERED = "Server disconnected without sending a response."
#: a response's body held unread beyond this pauses the socket's reads until it is taken
_HIGH_WATER = 256 * 1024


class _Target:
    """Where one URL's requests go, and the first bytes of each request (built once)."""

    __slots__ = ("key", "host", "port", "tls", "head")

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parsed = httpx.URL(url)
        self.tls = parsed.scheme == "https"
        self.host = parsed.host
        self.port = parsed.port or (443 if self.tls else 80)
        self.key = (parsed.scheme, self.host, self.port)
        default_port = parsed.port is None or parsed.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"POST {parsed.raw_path.decode('ascii')} HTTP/1.1",
                 f"host: {host if default_port else f'{host}:{self.port}'}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if parsed.userinfo and "authorization" not in {k.lower() for k in headers}:
            # as httpx does: credentials in the URL are sent as basic auth
            user, _, password = parsed.userinfo.decode("ascii").partition(":")
            token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode())
            lines.append(f"authorization: Basic {token.decode('ascii')}")
        self.head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection to an upstream, one response at a time; llhttp's callbacks fill the
    current response's status and body."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self.loop = loop
        #: the scheme, host and port it is connected to (its pool)
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.status = 0
        self.headers_done = False
        #: the body's end is marked (a length, or chunks), not the connection's close
        self.framed = False
        self.complete = False
        #: the complete response allows another request on this connection
        self.reusable = False
        self.received = False  # any byte of the current response
        self.error: BaseException | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - never asked for
            self._fail(httpx.RemoteProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the upstream's answer is not HTTP/1.1: "
                                                 f"{exc}"))
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.framed and exc is None and self.error is None:
            self.complete = True  # a body without length or chunks ends where the bytes do
        if not self.complete and self.error is None:
            if not self.received:
                self.error = httpx.RemoteProtocolError(CLOSED_UNANSWERED)
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            else:  # closed mid-answer: what a body without its end looks like
                self.error = httpx.RemoteProtocolError("peer closed connection without "
                                                       "sending complete message body")
        self._wake()

    # -- llhttp's callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        # asked now: once this callback returns, llhttp says False for every message
        self.reusable = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- the reader's side

    def start(self) -> None:
        """Ready for the next response (a kept-alive connection's next request)."""
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.received = 0, False, False, False
        self.framed = False
        self.error, self.chunks, self.buffered, self.reusable = None, [], 0, False

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the parser has something new, at most ``timeout`` s: else ReadTimeout.
        One loop timer serves many waits: when it fires before the current deadline (set
        by a wait that ended early), it is set again for what is left."""
        waiter = self.waiter = self.loop.create_future()
        self.deadline = self.loop.time() + timeout
        timer = self.timer
        if timer is None or timer.when() > self.deadline:  # none, or set for later
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(self.deadline, self._expire)
        try:
            await waiter
        finally:
            self.waiter = None

    def _expire(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._expire)
            return
        waiter.set_exception(httpx.ReadTimeout("timed out"))

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks, self.buffered = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def drop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RelayResponse:
    """A streamed response: ``status_code``, then its body as it arrives."""

    def __init__(self, client: "RelayClient", connection: _Connection) -> None:
        self._client = client
        self._connection = connection
        self.status_code = connection.status

    async def receive(self, timeout: float) -> bytes:
        """The body's next bytes (b"" at its end), waiting at most ``timeout`` s for them."""
        connection = self._connection
        while True:
            if connection.chunks:
                return connection.take()
            if connection.complete:
                return b""
            if connection.error is not None:
                raise connection.error
            await connection.wait(timeout)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while data := await self.receive(self._client.read_timeout):
            yield data

    async def aclose(self) -> None:
        """Back to the pool when the answer was read to its end and may be kept; closed
        otherwise (a client that left mid-answer: the upstream sees the hang-up)."""
        connection = self._connection
        if (connection.complete and connection.reusable and not connection.closed
                and not connection.chunks):
            self._client._keep(connection)
        else:
            connection.drop()


class RelayClient:
    """Streamed ``POST`` requests over pooled HTTP/1.1 connections (``keep_alive``: the
    idle ones kept), on the event loop that made it."""

    def __init__(self, headers: Mapping[str, str], *, connect_timeout: float,
                 read_timeout: float, keep_alive: int) -> None:
        self.headers = dict(headers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keep_alive = keep_alive
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post(self, url: str, body: bytes) -> RelayResponse:
        """Send ``body`` to ``url``; the response once its head has come."""
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target(url, self.headers)
        connection = self._idle_connection(target) or await self._connect(target)
        connection.start()
        assert connection.transport is not None
        connection.transport.write(b"%s%d\r\n\r\n%s" % (target.head, len(body), body))
        try:
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self.read_timeout)
        except BaseException:
            connection.drop()
            raise
        return RelayResponse(self, connection)

    def _idle_connection(self, target: _Target) -> _Connection | None:
        idle = self._idle.get(target.key)
        while idle:
            connection = idle.pop()
            if not connection.closed and not connection.transport.is_closing():  # type: ignore[union-attr]
                return connection
        return None

    def _keep(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) < self.keep_alive:
            idle.append(connection)
        else:
            connection.drop()

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if target.tls:
            if self._ssl is None:
                import certifi  # httpx's own certificate store, as its clients use

                self._ssl = ssl.create_default_context(cafile=certifi.where())
            context = self._ssl
        connection = _Connection(loop, target.key)
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: connection, target.host, target.port, ssl=context,
                server_hostname=target.host if context else None), self.connect_timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout("timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return connection

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.drop()
        self._idle.clear()
