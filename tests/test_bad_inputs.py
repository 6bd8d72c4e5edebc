"""The bad-input corpus (``http_bad_inputs.py``) against a real ``sarai-router serve``.

Every request is sent byte for byte over a socket to a server on 127.0.0.1 (the real
models, an API key, small limits; see ``SERVER_TOML``). Each case must get its status, an
OpenAI-shaped error with its ``code``, no server path or traceback in the body, and leave
the server answering ``/health``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from bad_upstream import PROBE_KEY, BadUpstream, key_fragments
from sarai_router.testing import start_serve

from conftest import FAST_FILE, base_toml
from http_bad_inputs import API_KEY, CASES, PROBE_KEY_ENV, SERVER_TOML, Case


#: A test double, clearly one: the llama_cpp backend claiming no tools, JSON output or
#: logprobs, as a backend without them would (no real backend here lacks them).
TEXT_ONLY_DOUBLE = '''
from sarai_router import hookimpl
from sarai_router.backend import Capabilities
from sarai_router.default_plugins.llama_cpp import LlamaCppBackend


class TextOnlyDouble(LlamaCppBackend):
    def capabilities(self, spec):
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx)


@hookimpl
def register_backends(register):
    register("textonly_double", TextOnlyDouble())
'''


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body


def exchange(port: int, request: bytes, timeout: float = 30) -> Answer:
    """Send ``request`` as is; read one response (Content-Length or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all (431)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            body += chunk
        return Answer(status, headers, body)


def build(case: Case, port: int) -> bytes:
    if case.raw is not None:
        return case.raw
    headers = {"host": f"127.0.0.1:{port}", "authorization": f"Bearer {API_KEY}",
               "content-type": "application/json", "connection": "close"}
    headers.update(case.headers)
    lines = [f"{case.method} {case.path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
    if case.method not in ("GET", "DELETE") or case.body:
        lines.append(f"content-length: {len(case.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + case.body


@pytest.fixture(scope="module")
def upstream():
    server = BadUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory, models_dir, upstream):
    folder = tmp_path_factory.mktemp("corpus")
    broken = folder / "broken.gguf"
    # A valid magic and version, then a header that claims more than any file could hold.
    broken.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16 + os.urandom(4096))
    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / "textonly_double.py").write_text(TEXT_ONLY_DOUBLE, encoding="utf-8")
    config = folder / "sarai.toml"
    config.write_text(
        base_toml(models_dir, fast="pinned = true\nn_threads = 1", quality="n_threads = 1")
        + f'\n[plugins]\ndirs = ["{plugins.as_posix()}"]\n'
        + SERVER_TOML.format(broken=broken.as_posix(), missing=(folder / "gone.gguf").as_posix(),
                             fast=(models_dir / FAST_FILE).as_posix(), upstream=upstream.url),
        encoding="utf-8")
    log = folder / "server.log"
    server = start_serve(config, args=["--api-key", API_KEY], echo=False, log_path=log,
                         env={**os.environ, PROBE_KEY_ENV: PROBE_KEY}, timeout=90)
    try:
        yield server.port, folder, models_dir, log
    finally:
        server.stop(timeout=20)


def leaks(body: bytes, folder: Path, models_dir: Path) -> list[str]:
    text = body.decode("utf-8", errors="replace")
    found = [marker for marker in (str(folder), str(models_dir), sys.prefix, "site-packages",
                                   "Traceback", ".gguf") if marker in text]
    found += re.findall(r'File "[^"]+", line \d+', text)
    return found


@pytest.mark.models
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(corpus_server, case: Case):
    port, folder, models_dir, _log = corpus_server
    answer = exchange(port, build(case, port))
    assert answer.status == case.status, answer.body[:500]
    assert answer.headers.get("content-type", "").startswith("application/json")
    if case.path.startswith("/api/"):  # Ollama's shape; the code in a header of ours
        data = json.loads(answer.body)
        assert set(data) == {"error"} and isinstance(data["error"], str) and data["error"]
        assert answer.headers.get("x-sarai-error-code") == case.code, data
    else:
        error = json.loads(answer.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == case.code, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "authentication_error",
                                 "server_error", "rate_limit_error")
        assert error["param"] is None or isinstance(error["param"], str)
    assert not leaks(answer.body, folder, models_dir), answer.body[:500]
    assert not key_fragments(answer.body.decode("utf-8", "replace"), PROBE_KEY), answer.body
    health = exchange(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            "Connection: close\r\n\r\n".encode())
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"


def test_the_corpus_is_large_and_every_5xx_is_a_model_or_its_upstream():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
    assert {c.code for c in CASES if c.status >= 500} == {
        "model_unavailable", "upstream_unavailable", "backend_error"}
    assert all(c.code == "model_unavailable" or "upstream" in c.name
               for c in CASES if c.status >= 500)


@pytest.mark.models
def test_no_case_is_answered_with_a_500_in_the_log(corpus_server):
    """Run after the corpus (pytest keeps file order): nothing was our bug."""
    *_, log = corpus_server
    text = log.read_text()
    # (An upstream's "answered 500" is in the log too: only this server's own counts.)
    assert "answered 500 (request id" not in text and "unhandled error" not in text, \
        text[-3000:]


@pytest.mark.models
def test_the_server_leaves_a_slow_client_after_its_header_deadline(corpus_server):
    from http_bad_inputs import HEADER_TIMEOUT

    port, *_ = corpus_server
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        data = b""
        while True:  # the server must end the connection; the socket timeout fails the test
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


@pytest.mark.models
def test_an_idle_connection_is_closed_too(corpus_server):
    from http_bad_inputs import HEADER_TIMEOUT

    port, *_ = corpus_server
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 20) as sock:
        assert sock.recv(4096) == b""  # closed without a word: nothing was asked


@pytest.mark.models
def test_cors_lets_the_configured_origin_in(corpus_server):
    from http_bad_inputs import CORS_ORIGIN

    port, *_ = corpus_server
    answer = exchange(port, (f"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Origin: {CORS_ORIGIN}\r\nAccess-Control-Request-Method: POST\r\n"
                             "Access-Control-Request-Headers: authorization, content-type\r\n"
                             "Connection: close\r\n\r\n").encode())
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == CORS_ORIGIN


# -- an upstream that misbehaves, seen by a streaming client ------------------------------


def _post_chat(port: int, body: dict, timeout: float = 30) -> Answer:
    data = json.dumps(body).encode()
    return exchange(port, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Authorization: Bearer {API_KEY}\r\n"
                           "Content-Type: application/json\r\nConnection: close\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n").encode() + data,
                    timeout=timeout)


def _events(body: bytes) -> list:
    """The SSE events of a (chunked) streamed answer, in order."""
    text = body.decode("utf-8", "replace")
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in re.findall(r"^data: .*$", text, flags=re.M)]


def _content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


@pytest.mark.models
def test_a_cut_stream_ends_with_an_error_event_then_finish_reason_length(corpus_server):
    port, *_ = corpus_server
    answer = _post_chat(port, {"model": "up_cut", "stream": True, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status == 200
    events = _events(answer.body)
    assert _content(events) == "Hola"
    error, last, done = events[-3:]
    assert error["error"]["code"] == "backend_error"
    assert "without a finish reason or [DONE]" in error["error"]["message"]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["sarai"] == {"stopped_by": "error"}
    assert done == "[DONE]"
    assert not any(isinstance(e, dict) and e.get("choices") and
                   e["choices"][0]["finish_reason"] == "stop" for e in events)


@pytest.mark.models
def test_a_mid_stream_error_event_carries_no_part_of_the_key(corpus_server):
    port, *_ = corpus_server
    answer = _post_chat(port, {"model": "up_midecho", "stream": True, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]})
    events = _events(answer.body)
    error = next(e for e in events if isinstance(e, dict) and "error" in e)
    assert "[reda" in error["error"]["message"]
    assert not key_fragments(answer.body.decode(), PROBE_KEY), error


@pytest.mark.models
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_bounds_an_upstream_that_ignores_it(corpus_server, upstream, stream):
    port, *_ = corpus_server
    closed = upstream.closed.get("trickle", 0)
    started = time.monotonic()
    answer = _post_chat(port, {"model": "up_trickle", "stream": stream, "max_tokens": 3,
                               "messages": [{"role": "user", "content": "hi"}]})
    elapsed = time.monotonic() - started
    assert answer.status == 200
    if stream:
        events = _events(answer.body)
        assert _content(events) == " tok" * 3
        assert [e["choices"][0]["finish_reason"] for e in events
                if isinstance(e, dict) and e.get("choices")][-1] == "length"
    else:
        choice = json.loads(answer.body)["choices"][0]
        assert choice["message"]["content"] == " tok" * 3
        assert choice["finish_reason"] == "length"
    assert elapsed < 10, elapsed  # the upstream sends a token every 0.3 s, for ever
    deadline = time.monotonic() + 3  # it notices at its next token
    while upstream.closed.get("trickle", 0) < closed + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.closed.get("trickle", 0) == closed + 1  # the router hung up on it


@pytest.mark.models
def test_a_never_ending_upstream_is_cut_at_total_timeout_seconds(corpus_server):
    from http_bad_inputs import UPSTREAM_TOTAL_SECONDS

    port, *_ = corpus_server
    started = time.monotonic()
    answer = _post_chat(port, {"model": "up_keepalive", "stream": True, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]})
    elapsed = time.monotonic() - started
    events = _events(answer.body)
    assert _content(events) == "Hola"
    assert "total_timeout_seconds" in events[-3]["error"]["message"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert UPSTREAM_TOTAL_SECONDS <= elapsed < UPSTREAM_TOTAL_SECONDS + 3, elapsed


@pytest.mark.models
def test_after_the_bad_upstreams_the_next_request_is_served_normally(corpus_server):
    port, *_ = corpus_server
    answer = _post_chat(port, {"model": "up_fine", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status == 200
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "Hola"


@pytest.mark.models
def test_a_body_no_endpoint_reads_cannot_hold_the_connection(corpus_server):
    """GET /health with a large Content-Length is answered at once; the body that then
    trickles in must arrive within body_timeout_seconds, else the connection closes."""
    from http_bad_inputs import BODY_TIMEOUT

    port, *_ = corpus_server
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 20) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Content-Length: 100000\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < BODY_TIMEOUT + 15:
            try:
                sock.sendall(b"x")
                sock.settimeout(1.0)
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                continue  # still open: one more byte, a second later
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the connection is still open"
    assert closed_after < BODY_TIMEOUT + 3, closed_after


@pytest.mark.models
def test_a_body_sent_in_time_keeps_the_connection_for_the_next_request(corpus_server):
    port, *_ = corpus_server
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()

    def one_answer(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head_, flags=re.I).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        return head_

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: 10\r\n\r\n")
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"0123456789")  # the unread body, at once: nothing to hold against it
        sock.sendall(head + b"\r\n")  # the next request on the same connection
        assert one_answer(sock).startswith(b"HTTP/1.1 200")


def _read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it ends the connection (a reset ends it too); the
    socket's timeout fails the test when it never does."""
    pieces = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            pieces.append(chunk)
    return b"".join(pieces)


@pytest.mark.models
@pytest.mark.parametrize("piece", [b"X-Long: " + b"a" * 30000, b"X-Some: header\r\n"],
                         ids=["one-unending-header", "many-headers"])
def test_a_head_trickled_past_max_header_bytes_is_refused_before_its_deadline(
        corpus_server, piece):
    """The head grows over several reads and never ends: 431 as soon as it is over the
    limit (the parser holds a header it has not finished, so this counts the bytes read)."""
    from http_bad_inputs import HEADER_TIMEOUT

    port, *_ = corpus_server
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        try:
            for _ in range(2000):  # far over the 16 KiB default, a piece at a time
                for start in range(0, len(piece), 1000):
                    sock.sendall(piece[start:start + 1000])
                    time.sleep(0.0005)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending
        data = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
    assert time.monotonic() - started < HEADER_TIMEOUT + 10


@pytest.mark.models
def test_a_complete_head_over_max_header_bytes_in_one_read_is_refused(corpus_server):
    port, *_ = corpus_server
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))  # ~21 KB
    answer = exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
    assert answer.status == 431
    assert json.loads(answer.body)["error"]["code"] == "headers_too_large"


@pytest.mark.models
def test_the_header_deadline_holds_for_the_next_request_on_a_kept_alive_connection(
        corpus_server):
    from http_bad_inputs import HEADER_TIMEOUT

    port, *_ = corpus_server
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 20) as sock:
        sock.sendall(head + b"\r\n")
        data = b""
        while b'"status"' not in data:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        sock.sendall(head)  # the next request's head, never finished
        data = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]


@pytest.mark.models
def test_pipelined_requests_are_answered_in_order(corpus_server):
    port, *_ = corpus_server
    one = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    last = f"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(one + one + last.encode())
        data = _read_until_closed(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", data)
    assert statuses == [b"200", b"200", b"401"], data[:1000]  # the last asked without the key
