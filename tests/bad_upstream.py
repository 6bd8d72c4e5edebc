"""A misbehaving OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 forced to
misbehave. A test double, clearly one: no real endpoint can be made to send garbage, cut
its stream, ignore ``max_tokens`` or echo the key on demand.

Each behaviour is a base URL path: ``{url}/{behaviour}/v1`` (the router then posts to
``/{behaviour}/v1/chat/completions``). The server speaks raw HTTP/1.1 over a socket, so
that it can send exactly the bytes a broken upstream sends: no framing but the
connection's end, a line without an end, bytes that are not text.

Behaviours (``BEHAVIOURS``):

- ``garbage``: 200 ``text/event-stream``, 200 KB of random bytes, then the end.
- ``longline``: 200, one 20 MB line with no newline (sent until the client hangs up).
- ``html``: 200 ``text/html``, a web page instead of an event stream.
- ``notjson``: 200, SSE ``data:`` lines whose payload is not JSON.
- ``empty``: 200, then the end: no byte of body.
- ``cutearly``: 200, a role chunk with no text, then the end (no finish reason, no [DONE]).
- ``cut``: 200, one chunk of text, then the end (no finish reason, no [DONE]).
- ``trickle``: 200, a token every ``TRICKLE_SECONDS`` for ever, whatever ``max_tokens``.
- ``keepalive``: 200, one token, then SSE comments every ``TRICKLE_SECONDS`` for ever.
- ``silent``: 200, one token, then nothing (the connection stays open).
- ``echo300``: 500 with a text body whose key (the request's ``Authorization`` value)
  straddles character 300, where a non-JSON message is cut.
- ``echo1000``: 400 with a JSON ``error.message`` whose key straddles character 1000.
- ``midecho``: 200, one token, then an SSE error event whose message has the key
  straddling character 1000.
- ``fine``: a correct, short stream (``Hola`` + finish reason + [DONE]).
- ``kept``: ``fine``'s stream in chunked framing, the connection kept open for the next
  request (``connections`` counts the connections it was asked on).
- ``hangup``: every other request (the 1st, 3rd, ...) is read and its connection closed
  without a byte of answer, as llama-server closes a kept-alive connection unannounced;
  the others get ``fine``'s stream.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

TRICKLE_SECONDS = 0.3
BEHAVIOURS = ("garbage", "longline", "html", "notjson", "empty", "cutearly", "cut", "trickle",
              "keepalive", "silent", "echo300", "echo1000", "midecho", "fine", "hangup", "kept")


def _chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    payload = {"id": "bad-1", "object": "chat.completion.chunk", "created": 0,
               "model": "bad", "choices": [{"index": 0, "delta": delta,
                                            "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def _head(status: int = 200, content_type: str = "text/event-stream",
          length: int | None = None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}",
             "connection: close"]
    if length is not None:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


#: The API key the tests give a model of this upstream: distinctive, so that any five
#: characters of it in an answer are a leak, not a coincidence.
PROBE_KEY = "sk-UGprobe-7f3a9c1e5b2d8064"


def straddling(key: str, at: int, lead: str = "the endpoint refused token ") -> str:
    """A message in which ``key`` starts 5 characters before character ``at``."""
    start = at - 5
    filler = (lead + "x" * start)[:start]
    return filler + key + " was refused" + "." * 50


class BadUpstream:
    """The server; ``url`` is its root, ``requests`` counts requests per behaviour and
    ``closed`` the streams a client ended before the server did."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        #: connections per behaviour (``kept`` serves many requests on one)
        self.connections: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="bad-upstream", daemon=True).start()

    def base_url(self, behaviour: str) -> str:
        assert behaviour in BEHAVIOURS, behaviour
        return f"{self.url}/{behaviour}/v1"

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            first = True
            while self._serve_one(conn, first):
                first = False

    def _serve_one(self, conn: socket.socket, first: bool) -> bool:
        """One request on ``conn``; whether the connection stays open for another."""
        try:
            path, headers = self._read_request(conn)
        except (OSError, ValueError):
            return False
        behaviour = path.strip("/").split("/")[0]
        with self._lock:
            self.requests[behaviour] = self.requests.get(behaviour, 0) + 1
            if first:
                self.connections[behaviour] = self.connections.get(behaviour, 0) + 1
            if behaviour == "hangup":
                if self.requests[behaviour] % 2:
                    return False  # closed unanswered
                behaviour = "fine"
        if behaviour == "kept":
            events = _chunk("Hola", role=True) + _chunk(finish="stop") + b"data: [DONE]\n\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                         % (len(events), events))
            return True
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            self._answer(conn, behaviour, key)
        except OSError:  # the client hung up: what a router that stops reading does
            with self._lock:
                self.closed[behaviour] = self.closed.get(behaviour, 0) + 1
        return False

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[str, dict[str, str]]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("no request")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return lines[0].split()[1], headers

    def _forever(self, conn: socket.socket, piece: bytes) -> None:
        while not self._stop.is_set():
            time.sleep(TRICKLE_SECONDS)
            conn.sendall(piece)

    def _answer(self, conn: socket.socket, behaviour: str, key: str) -> None:
        send = conn.sendall
        if behaviour == "garbage":
            send(_head() + os.urandom(200 * 1024))
        elif behaviour == "longline":
            send(_head() + b"data: ")
            block = b"a" * (1 << 20)
            for _ in range(20):
                send(block)
        elif behaviour == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>\n"
            send(_head(content_type="text/html", length=len(page)) + page)
        elif behaviour == "notjson":
            send(_head() + b"data: {'content': 'hola'}\n\ndata: hola\n\n")
        elif behaviour == "empty":
            send(_head())
        elif behaviour == "cutearly":
            send(_head() + _chunk(role=True, text=""))
        elif behaviour == "cut":
            send(_head() + _chunk("Hola", role=True))
        elif behaviour == "trickle":
            send(_head() + _chunk(role=True, text=""))
            self._forever(conn, _chunk(" tok"))
        elif behaviour == "keepalive":
            send(_head() + _chunk("Hola", role=True))
            self._forever(conn, b": ping\n\n")
        elif behaviour == "silent":
            send(_head() + _chunk("Hola", role=True))
            self._stop.wait(60)
        elif behaviour == "echo300":
            body = straddling(key, 300).encode()
            send(_head(500, "text/plain", len(body)) + body)
        elif behaviour == "echo1000":
            body = json.dumps({"error": {"message": straddling(key, 1000),
                                         "type": "invalid_request_error"}}).encode()
            send(_head(400, "application/json", len(body)) + body)
        elif behaviour == "midecho":
            error = json.dumps({"error": {"message": straddling(key, 1000)}})
            send(_head() + _chunk("Hola", role=True) + f"data: {error}\n\n".encode())
        elif behaviour == "fine":
            send(_head() + _chunk("Hola", role=True) + _chunk(finish="stop")
                 + b"data: [DONE]\n\n")
        else:
            body = b'{"error": {"message": "unknown behaviour"}}'
            send(_head(400, "application/json", len(body)) + body)


def key_fragments(text: str, key: str, shortest: int = 5) -> list[str]:
    """The pieces of ``key`` (``shortest`` characters or more) that appear in ``text``."""
    found = []
    for start in range(len(key) - shortest + 1):
        piece = key[start:start + shortest]
        if piece in text:
            found.append(piece)
    return found
