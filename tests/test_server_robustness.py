"""A real ``sarai-router serve`` under hostile faults: clients that hang up while
queued, a stop (SIGTERM) with a long queue, a model file deleted under a loaded model.

Everything syncs on the server's state (``/v1/models``, ``/metrics``), never on elapsed time;
the one deadline (the exit after SIGTERM) is generous and says what it measured.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sarai_router.testing import start_serve

from conftest import FAST_FILE
from test_server import Server, metric


#: Long enough that the prompt's evaluation is real work (each queued client would cost it).
LONG_PROMPT = ("Resume este texto en una frase. " + "El perro corre por el parque y juega "
               "con una pelota roja mientras su dueño lee un libro bajo un árbol. " * 25)
COUNT = "Count from 1 to 1000, separated by commas: 1, 2, 3,"


def start_server(folder: Path, config_toml: str) -> Server:
    config = folder / "sarai.toml"
    config.write_text(config_toml, encoding="utf-8")
    started = start_serve(config, echo=False, log_path=folder / "server.log",
                          env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"})
    return Server(started.url, started.process, started.log_path)


def stop(server: Server) -> None:
    server.stop()


def config_text(models_dir: Path, *, queue_size: int, grace: float) -> str:
    # fast: one thread (two generations must not oversubscribe two cores), a context and a
    # cap long enough for an answer that holds the model while others queue.
    return f"""
[paths]
models_dir = "{models_dir.as_posix()}"

[cache]
ttl_seconds = 60
max_loaded = 3

[plugins.heuristic]
conversation_model = "fast"
multimodal_model = "fast"

[models.fast]
path = "{{models_dir}}/{FAST_FILE}"
n_ctx = 2048
max_tokens = 1500
n_threads = 1
pinned = true

[server]
queue_size = {queue_size}
shutdown_grace_seconds = {grace}
"""


def raw_post(server: Server, body: dict) -> http.client.HTTPConnection:
    """Send a chat request and return the open connection without reading the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn


def fast_row(server: Server) -> dict:
    return server.models()["fast"]["resident"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("robust")
    copy = folder / "copy.gguf"
    shutil.copyfile(models_dir / FAST_FILE, copy)
    extra = f"""
[models.copy]
path = "{copy.as_posix()}"
n_ctx = 512
max_tokens = 4
n_threads = 1
"""
    srv = start_server(folder, config_text(models_dir, queue_size=8, grace=10) + extra)
    srv.copy = copy
    try:
        yield srv
    finally:
        stop(srv)
    assert srv.process.returncode == 0, srv.log()[-3000:]


@pytest.mark.models
def test_clients_that_leave_while_queued_never_reach_the_model(server):
    before = server.metrics()
    started = metric(before, "sarai_generations_started_total", model="fast")
    dropped = metric(before, "sarai_generations_dropped_total", model="fast")
    # A holds the model with a long answer while five others queue behind it.
    holder = raw_post(server, {"model": "fast", "max_tokens": 1500, "temperature": 0,
                               "messages": [{"role": "user", "content": COUNT}]})
    server.wait_until(lambda: metric(server.metrics(), "sarai_generations_started_total",
                                     model="fast") == started + 1, 60, "A to start")
    queued = [raw_post(server, {"model": "fast", "max_tokens": 64,
                                "messages": [{"role": "user", "content": LONG_PROMPT}]})
              for _ in range(5)]
    server.wait_until(lambda: fast_row(server)["queued"] == 6, 60, "five requests to queue")
    for conn in queued:  # hang up while queued
        conn.sock.close()
        conn.close()
    server.wait_until(lambda: metric(server.metrics(), "sarai_generations_dropped_total",
                                     model="fast") == dropped + 5, 60,
                      "the five to be dropped from the queue")
    row = fast_row(server)
    assert (row["active"], row["queued"]) == (1, 1), "only A is left, still generating"
    holder.sock.close()  # A's client leaves too: its answer stops
    holder.close()
    server.wait_until(lambda: fast_row(server)["users"] == 0, 60, "A to stop")
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "Hola"}]}
    ).encode(), key=None)
    assert status == 200, body
    after = server.metrics()
    # Three generations started: A, the next request, and nothing for the five that left.
    assert metric(after, "sarai_generations_started_total", model="fast") == started + 2
    assert metric(after, "sarai_generations_dropped_total", model="fast") == dropped + 5
    assert metric(after, "sarai_request_errors_total", status="499",
                  code="client_closed_request") >= 6


@pytest.mark.models
def test_a_loaded_model_keeps_answering_when_its_file_is_deleted(server):
    ask = json.dumps({"model": "copy", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "Hola"}]}).encode()
    status, body = server.post("/v1/chat/completions", ask, key=None)
    assert status == 200, body
    assert server.models()["copy"]["loaded"]
    server.copy.unlink()
    status, body = server.post("/v1/chat/completions", ask, key=None)
    assert status == 200, body
    assert body["model"] == "copy"


@pytest.mark.models
def test_sigterm_with_a_long_queue_answers_503_at_once_and_exits_within_the_grace(
        tmp_path, models_dir):
    grace = 5.0
    margin = 30.0  # generous: a busy 2-core machine; what counts is that it is bounded
    server = start_server(tmp_path, config_text(models_dir, queue_size=16, grace=grace))
    try:
        body = {"model": "fast", "max_tokens": 1500, "temperature": 0,
                "messages": [{"role": "user", "content": COUNT}]}
        queued_body = {"model": "fast", "max_tokens": 64,
                       "messages": [{"role": "user", "content": LONG_PROMPT}]}
        with ThreadPoolExecutor(11) as pool:
            first = pool.submit(server.post, "/v1/chat/completions",
                                json.dumps(body).encode(), None)
            server.wait_until(lambda: fast_row(server)["active"] == 1, 60, "the answer to start")
            rest = [pool.submit(server.post, "/v1/chat/completions",
                                json.dumps(queued_body).encode(), None) for _ in range(10)]
            server.wait_until(lambda: fast_row(server)["queued"] == 11, 60, "ten to queue")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=grace + margin) for future in [first, *rest]]
        for status, data in answers:
            assert status == 503, data
            assert data["error"]["code"] == "server_shutting_down"
        code = server.process.wait(timeout=max(0.0, signalled + grace + margin - time.monotonic()))
        exited_after = time.monotonic() - signalled
        print(f"SIGTERM with 1 answer + 10 queued: exit {code} after {exited_after:.2f}s "
              f"(grace {grace}s)")
        assert code == 0, server.log()[-3000:]
        log = server.log()
        assert "Traceback" not in log
        assert "still running after [server] shutdown_grace_seconds" not in log
    finally:
        stop(server)
