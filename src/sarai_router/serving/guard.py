"""What stands between the network and the app: request ids, the Host allowlist, the API
key, and uvicorn's HTTP protocol with a deadline for each request's headers.

A local model server is reachable from every web page the user opens: a page can make
the browser send requests to 127.0.0.1. Three things keep such pages out:

- **Host allowlist** (DNS rebinding): a page on ``evil.example`` whose name is made to
  resolve to 127.0.0.1 still sends ``Host: evil.example``. IP literals (the page's origin
  is then the IP itself), ``localhost`` and ``*.localhost`` are always answered; other
  names only when ``[server] allowed_hosts`` lists them (``"*"``: any). Others get 421.
- **JSON only**: a page can POST ``text/plain`` or a form without asking (no CORS
  preflight), never ``application/json``; the app refuses anything else with 415.
- **CORS off** unless ``[server] cors_origins`` lists origins.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import uuid
from typing import Callable, Sequence

from ..events import request_scope
from .openai import DIALECT, ApiError, internal_error

log = logging.getLogger(__name__)

#: Paths that answer without the API key: load balancers and probes have none, and a browser
#: loads the ``/ui`` page's static files (which hold no data) before it can ask for the key.
OPEN_PATHS = frozenset({"/health", "/ui", "/ui/app.js", "/ui/app.css"})
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def _answer(error: ApiError, scope, receive, send) -> None:
    await error.response()(scope, receive, send)


class RequestIdMiddleware:
    """Outermost: gives every request an id (the client's ``x-request-id`` when it is a
    sane token), sends it back in ``x-request-id``, and turns anything that escaped the
    app into a generic 500 carrying that id, logged with its traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else f"req_{uuid.uuid4().hex[:20]}"
        # Ollama's clients read {"error": "..."}: every error on its paths takes that shape.
        dialect = DIALECT.set("ollama" if scope.get("path", "").startswith("/api/")
                              else "openai")
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            with request_scope("http", request_id):
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception:  # noqa: BLE001 - our bug: logged in full, answered generically
                    log.exception("unhandled error on %s %s (request id %s)",
                                  scope.get("method"), scope.get("path"), request_id)
                    if not started:
                        await _answer(internal_error(), scope, receive, send_with_id)
        finally:
            DIALECT.reset(dialect)


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """Whether a ``Host`` header may be answered (see the module's docstring)."""
    if "*" in names:
        return True
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, with or without a port
        return host.find("]") > 0
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        name = host
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith(".localhost") or name in names


class HostGuard:
    """Answers 421 to a request whose ``Host`` is not allowed (DNS rebinding)."""

    def __init__(self, app, allowed_hosts: Sequence[str] = ()):
        self.app = app
        self.names = frozenset(h.strip().lower().rstrip(".") for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = _header(scope, b"host")
            # No Host at all is HTTP/1.0 from a script: browsers always send one.
            if raw is not None and not host_allowed(raw.decode("latin-1"), self.names):
                shown = raw.decode("latin-1")[:80]
                await _answer(ApiError(
                    421, f"this server does not answer for host {shown!r}: add it to "
                    "[server] allowed_hosts to allow it", code="invalid_host",
                    param="Host"), scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Refuse requests without ``Authorization: Bearer <key>`` (except OPEN_PATHS); the
    scheme's case does not matter (RFC 9110)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    def _authorized(self, scope) -> bool:
        raw = _header(scope, b"authorization") or b""
        scheme, _, token = raw.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not self._authorized(scope):
                await _answer(ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", type="authentication_error",
                    headers={"www-authenticate": "Bearer"}), scope, receive, send)
                return
        await self.app(scope, receive, send)


def cors_middleware(app, origins: Sequence[str]):
    """Starlette's CORS middleware for ``origins``, whose refused preflights answer in
    OpenAI's error shape like every other error."""
    from starlette.middleware.cors import CORSMiddleware

    class Cors(CORSMiddleware):
        def preflight_response(self, request_headers):
            response = super().preflight_response(request_headers)
            if response.status_code != 400:
                return response
            headers = {k: v for k, v in response.headers.items()
                       if k.lower() not in ("content-length", "content-type")}
            return ApiError(400, f"{response.body.decode()}: see [server] cors_origins",
                            code="cors_refused", headers=headers).response()

    return Cors(app, allow_origins=list(origins), allow_methods=["GET", "POST"],
                allow_headers=["*"], expose_headers=["x-request-id", "x-sarai-model",
                                                     "x-sarai-route-reason",
                                                     "x-sarai-route-plugin"])


def _raw_response(status: int, reason: str, error: ApiError) -> bytes:
    """A whole HTTP/1.1 response, for the protocol level where no app runs."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_h11_protocol(header_timeout: float, body_timeout: float | None = None):
    """uvicorn's h11 protocol, with three changes:

    - each request's line and headers must arrive within ``header_timeout`` seconds of the
      connection (or of the previous response), else the connection is closed: uvicorn
      itself waits forever, so slow-header clients (slowloris) could hold sockets open;
    - once a response is sent, the rest of a request body the app did not read must arrive
      within ``body_timeout`` seconds, else the connection is closed: uvicorn reads and
      drops it for as long as it trickles in (``GET /health`` with a large
      ``Content-Length`` and a byte a second would hold the socket forever);
    - a request h11 cannot parse gets an OpenAI-shaped error (431 when its head is over
      the size limit) instead of uvicorn's plain-text 400.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    unread_body_timeout = header_timeout if body_timeout is None else body_timeout

    class GuardedH11Protocol(H11Protocol):
        _body_cycle = None  # the request whose unread body the deadline is for

        def connection_made(self, transport) -> None:
            #: The timer of each deadline armed: "head" (the next request's headers) and
            #: "body" (the unread body of a request already answered).
            self._deadlines: dict[str, asyncio.TimerHandle] = {}
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            for which in list(self._deadlines):
                self._disarm(which)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if "body" in self._deadlines and (self.cycle is not self._body_cycle or
                                              self.conn.their_state is not h11.SEND_BODY):
                self._disarm("body")  # the unread body is in
                if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                    self._arm_head_deadline()  # the next request on this connection
            if self.conn.their_state is not h11.IDLE:  # the request's head is complete
                self._disarm("head")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                self._arm_head_deadline()  # the next request on this connection
            elif self.conn.their_state is h11.SEND_BODY:
                self._body_cycle = self.cycle
                self._arm("body", unread_body_timeout, self._body_too_slow)

        def _arm(self, which: str, seconds: float, on_expiry: Callable[[], None]) -> None:
            self._disarm(which)
            self._deadlines[which] = self.loop.call_later(seconds, on_expiry)

        def _disarm(self, which: str) -> None:
            handle = self._deadlines.pop(which, None)
            if handle is not None:
                handle.cancel()

        def _body_too_slow(self) -> None:
            self._deadlines.pop("body", None)
            if (not self.transport.is_closing() and self.cycle is self._body_cycle
                    and self.conn.their_state is h11.SEND_BODY):
                # Answered already: nothing to say, and nothing more to read.
                self.transport.close()

        def _arm_head_deadline(self) -> None:
            self._arm("head", header_timeout, self._head_too_slow)

        def _head_too_slow(self) -> None:
            self._deadlines.pop("head", None)
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # a partial request: say why it ends
                self.transport.write(_raw_response(408, "Request Timeout", ApiError(
                    408, f"the request's headers did not arrive within {header_timeout:g} s",
                    code="request_timeout")))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._disarm("head")
            buffered = len(self.conn.trailing_data[0])
            if buffered > self.conn._max_incomplete_event_size:
                error = ApiError(431, "the request's line and headers are larger than "
                                 "[server] max_header_bytes", code="headers_too_large")
                reason = "Request Header Fields Too Large"
            else:
                error = ApiError(400, "the request is not valid HTTP/1.1",
                                 code="invalid_http_request")
                reason = "Bad Request"
            self.transport.write(_raw_response(error.status, reason, error))
            self.transport.close()

    return GuardedH11Protocol


def limit_body(app, max_bytes: int):
    """``app`` (a plugin's route) with ``[server] max_body_bytes`` applied, as the server's
    own routes apply it: a declared ``Content-Length`` over the limit is a 413 before the
    handler runs; a body that grows over it while the handler reads it, a 413 there."""
    from starlette.exceptions import HTTPException

    too_large = f"the body is larger than [server] max_body_bytes = {max_bytes}"

    async def limited(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = (_header(scope, b"content-length") or b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, too_large)  # answered (and counted) by the app's handler
        size = 0

        async def counted():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await app(scope, counted, send)

    return limited
