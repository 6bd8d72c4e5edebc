"""The speech model is a resident of the pool like the chat models, and audio in a chat
request is a transcription like any other.

Real parts throughout: the pulled whisper model (faster-whisper, base int8), the real GGUF
models, and a real ``sarai-router serve`` on 127.0.0.1 for the server's side.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from sarai_router.cli import cli
from sarai_router.default_plugins.whisper import RESIDENT_NAME, WhisperBackend, speech_model, \
    settings_of
from sarai_router.engine import Engine
from sarai_router.types import AudioInput

from conftest import base_toml
from test_audio import ENGLISH, SPANISH, wav_bytes, wav_samples, whisper_dir  # noqa: F401 - a fixture
from test_server import API_KEY, Server, launch, metric


def _spanish() -> AudioInput:
    return AudioInput(data=SPANISH.read_bytes(), mime="audio/wav", source="es_triste.wav")


def _status(engine: Engine) -> dict[str, dict]:
    return {row["name"]: row for row in engine.pool.status()}


# -- the pool: budget, max_loaded, events ---------------------------------------------------


@pytest.mark.models
def test_the_speech_model_is_budgeted_and_evicted_like_a_model(make_config, whisper_dir):
    probe = make_config()
    quality_mb = Engine(probe).pool.estimator(probe.models["quality"])
    whisper_mb = WhisperBackend().estimate_ram_mb(speech_model(settings_of(probe), probe))
    assert whisper_mb > 100  # the weights file, ~138 MB
    # Room for quality, or for the speech model with fast, never for quality and the
    # speech model together; max_loaded = 1 counts chat models only.
    config = make_config(cache=f"ttl_seconds = 60\nmax_loaded = 1\n"
                               f"ram_budget_mb = {quality_mb + whisper_mb - 1:.0f}",
                         fast="n_threads = 1", quality="n_threads = 1")
    engine = Engine(config)
    events: list[tuple[str, str | None, dict]] = []
    engine.hooks.subscribe(lambda e: events.append((e.kind, e.model, e.data)), "test")
    try:
        engine.pool.ensure_loaded("fast")
        transcript = engine.transcribe(_spanish())
        assert "triste" in transcript.text.lower()
        rows = _status(engine)
        assert rows["fast"]["state"] == "loaded"  # not evicted: whisper is no chat model
        speech = rows[RESIDENT_NAME]
        assert speech["state"] == "loaded" and speech["backend"] == "faster_whisper"
        assert speech["rss_mb"] >= whisper_mb and speech["ttl_seconds"] == 60
        assert engine.pool.resident_mb() == pytest.approx(
            rows["fast"]["rss_mb"] + speech["rss_mb"], abs=0.2)
        kinds = [(kind, model) for kind, model, _ in events]
        assert ("model_loading", RESIDENT_NAME) in kinds
        assert ("model_loaded", RESIDENT_NAME) in kinds

        engine.pool.ensure_loaded("quality")  # no room for both: the idle ones go
        rows = _status(engine)
        assert rows[RESIDENT_NAME]["state"] == "unloaded" and rows["fast"]["state"] == "unloaded"
        [evicted] = [data for kind, model, data in events
                     if kind == "model_evicted" and model == RESIDENT_NAME]
        assert evicted["by"] == "quality" and "ram_budget_mb" in evicted["reason"]

        # And the other way round: the speech model makes room for itself.
        assert "triste" in engine.transcribe(_spanish()).text.lower()
        rows = _status(engine)
        assert rows[RESIDENT_NAME]["state"] == "loaded" and rows["quality"]["state"] == "unloaded"
        assert any(kind == "model_evicted" and model == "quality" and data["by"] == RESIDENT_NAME
                   for kind, model, data in events)
    finally:
        engine.close()
    unloaded = [data for kind, model, data in events
                if kind == "model_unloaded" and model == RESIDENT_NAME]
    assert unloaded and unloaded[-1]["reason"] == "shutdown"


def test_a_model_named_like_the_speech_model_is_a_config_error(write_config):
    config = write_config('[models.whisper]\npath = "{models_dir}/x.gguf"\n')
    result = CliRunner().invoke(cli, ["config", "check", str(config)])
    assert result.exit_code != 0
    assert "plugins.whisper.model: [models.whisper] takes the name the speech model has" \
        in result.output, result.output


# -- the server ------------------------------------------------------------------------------

#: Short enough for a test to see it expire; the reaper looks every half second.
SPEECH_TTL = 3
#: Every transcription's bound on this server (the model's load included): far more than
#: a short clip takes, 25 s measured under a load average of 12 on 2 cores. The tests here
#: end long transcriptions by leaving, not by this bound (test_audio.py tests the bound).
BOUND_SECONDS = 120


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory, models_dir, whisper_dir):
    folder = tmp_path_factory.mktemp("speech-resident")
    srv = launch(folder, base_toml(models_dir, fast="pinned = true\nn_threads = 1",
                                   quality="n_threads = 1",
                                   cache="ttl_seconds = 60\nmax_loaded = 2\n"
                                         "reap_interval_seconds = 0.5")
                 + "\n[server]\nqueue_size = 1\n"
                 + f"\n[plugins.whisper]\nmax_seconds = 300\nttl_seconds = {SPEECH_TTL}\n"
                   f"timeout_seconds = {BOUND_SECONDS}\n", "--api-key", API_KEY)
    try:
        yield srv
    finally:
        srv.stop(timeout=60)


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return wav_bytes(np.concatenate([wav_samples(ENGLISH)] * 85))


def _admin_row(srv: Server, name: str = RESIDENT_NAME) -> dict:
    status, body = srv.get("/admin/models")
    assert status == 200, body
    return {row["name"]: row for row in json.loads(body)["models"]}[name]


def _transcribe(srv: Server, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/audio/transcriptions", timeout=120,
                      headers={"authorization": f"Bearer {API_KEY}"},
                      files={"file": ("clip.wav", data, "audio/wav")},
                      data={"model": "whisper", "language": "en", **fields})


def _audio_chat(data: bytes) -> dict:
    return {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "input_audio",
         "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}]}]}


def _events(srv: Server) -> list[dict]:
    """The server's recent events, as ``/admin/events`` replays them."""
    frames = []
    with httpx.stream("GET", srv.url + "/admin/events", timeout=30,
                      headers={"authorization": f"Bearer {API_KEY}"}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                frame = json.loads(line[6:])
                if frame.get("type") == "live":
                    break
                frames.append(frame)
    return frames


def _wait_for(what, timeout: float) -> float:
    started = time.monotonic()
    while not what():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.models
def test_ps_admin_metrics_and_events_show_the_speech_model_until_its_ttl(speech_server):
    srv = speech_server
    row = _admin_row(srv)
    assert row["state"] == "unloaded" and row["rss_mb"] is None  # listed before its first use
    before = srv.metrics()
    with SPANISH.open("rb") as file:
        assert "triste" in srv.client().audio.transcriptions.create(
            model="whisper", file=file).text.lower()
    row = _admin_row(srv)
    assert row["state"] == "loaded" and row["rss_mb"] > 100 and row["ttl_seconds"] == SPEECH_TTL
    assert row["backend"] == "faster_whisper" and not row["pinned"]
    status, body = srv.get("/admin/models")
    admin = json.loads(body)
    assert admin["resident_mb"] == pytest.approx(
        sum(m["rss_mb"] or 0 for m in admin["models"]), abs=0.2)
    assert admin["resident_mb"] >= row["rss_mb"] + _admin_row(srv, "fast")["rss_mb"] - 0.2

    ps = CliRunner().invoke(cli, ["models", "ps", "--server", srv.url, "--api-key", API_KEY])
    assert ps.exit_code == 0, ps.output
    [line] = [line for line in ps.output.splitlines() if line.startswith(RESIDENT_NAME)]
    assert line.split()[1] == "loaded" and f"{row['rss_mb']:.0f} MB" in line

    samples = srv.metrics()
    assert metric(samples, "sarai_model_loaded", model=RESIDENT_NAME) == 1.0
    assert metric(samples, "sarai_model_ram_mb", model=RESIDENT_NAME, kind="accounted") \
        == pytest.approx(row["rss_mb"], abs=0.1)
    assert metric(samples, "sarai_model_loads_total", model=RESIDENT_NAME) \
        == metric(before, "sarai_model_loads_total", model=RESIDENT_NAME) + 1

    # Ollama's /api/ps lists what an Ollama client may address: chat and embedding
    # models, not the speech model.
    status, body = srv.get("/api/ps")
    assert status == 200 and RESIDENT_NAME not in [m["name"] for m in json.loads(body)["models"]]

    # Idle for its TTL: the reaper unloads it.
    waited = _wait_for(lambda: _admin_row(srv)["state"] == "unloaded", SPEECH_TTL + 30)
    samples = srv.metrics()
    assert metric(samples, "sarai_model_loaded", model=RESIDENT_NAME) == 0.0
    assert metric(samples, "sarai_model_unloads_total", model=RESIDENT_NAME,
                  reason="expire") >= 1
    kinds = [(e.get("kind"), e.get("model")) for e in _events(srv)]
    for kind in ("model_loading", "model_loaded", "model_unloaded"):
        assert (kind, RESIDENT_NAME) in kinds, kinds
    print(f"speech model unloaded {waited:.1f} s after it was seen loaded "
          f"(ttl_seconds = {SPEECH_TTL}, reaper every 0.5 s)")

    # The operator's load and unload (the /ui page's buttons, `models load/unload`).
    status, body = srv.post("/admin/models/load", json.dumps({"model": RESIDENT_NAME}).encode())
    assert status == 200 and body["loaded"], body
    assert _admin_row(srv)["state"] == "loaded"
    status, body = srv.post("/admin/models/unload",
                            json.dumps({"model": RESIDENT_NAME}).encode())
    assert status == 200 and body["unloaded"], body
    assert _admin_row(srv)["state"] == "unloaded"


@pytest.mark.models
def test_whisper_is_not_a_chat_model(speech_server):
    srv = speech_server
    status, body = srv.post("/v1/chat/completions", json.dumps({
        "model": RESIDENT_NAME, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hola"}]}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    status, body = srv.post("/api/chat", json.dumps({
        "model": RESIDENT_NAME, "stream": False,
        "messages": [{"role": "user", "content": "hola"}]}).encode())
    assert status == 404, body
    status, body = srv.get("/v1/models")
    assert RESIDENT_NAME not in [m["id"] for m in json.loads(body)["data"]]


def _send(srv: Server, path: str, body: bytes, content_type: str) -> socket.socket:
    """Send a whole request on a socket of its own and leave it open, unread: closing it
    is the client leaving."""
    sock = socket.create_connection(("127.0.0.1", urlsplit(srv.url).port))
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {API_KEY}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    return sock


def _multipart(clip: bytes) -> tuple[bytes, str]:
    boundary = "sarai-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"long.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() \
        + clip + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.models
def test_audio_in_a_chat_waits_in_the_transcription_queue(speech_server, long_clip):
    """queue_size = 1: one long transcription runs, one waits; audio in a chat request is a
    third transcription, refused like one (429), on both dialects."""
    srv = speech_server
    body, content_type = _multipart(long_clip)
    held = [_send(srv, "/v1/audio/transcriptions", body, content_type) for _ in range(2)]
    try:
        _wait_for(lambda: (_admin_row(srv)["in_flight"], _admin_row(srv)["queued"]) == (1, 1),
                  120)
        status, answer = srv.post("/v1/chat/completions",
                                  json.dumps(_audio_chat(SPANISH.read_bytes())).encode())
        assert status == 429 and answer["error"]["code"] == "queue_full", answer
        assert RESIDENT_NAME in answer["error"]["message"]
        status, answer = srv.post("/api/chat", json.dumps({
            "model": "auto", "stream": False, "messages": [{
                "role": "user", "content": "",
                "images": [base64.b64encode(SPANISH.read_bytes()).decode()]}]}).encode())
        assert status == 429, answer
    finally:
        for sock in held:  # the two clients leave: their work stops
            sock.close()
    _wait_for(lambda: (_admin_row(srv)["in_flight"], _admin_row(srv)["queued"]) == (0, 0), 60)
    # Its turn come, the same chat is transcribed and answered.
    status, answer = srv.post("/v1/chat/completions",
                              json.dumps(_audio_chat(SPANISH.read_bytes())).encode())
    assert status == 200, answer
    assert "triste" in answer["sarai"]["route"]["transcript"]["text"].lower()


@pytest.mark.models
def test_audio_in_a_chat_whose_client_leaves_stops_its_transcription(speech_server, long_clip):
    srv = speech_server
    body = json.dumps(_audio_chat(long_clip)).encode()
    line = "client went away; stopped its transcription"
    seen = srv.log().count(line)
    with _send(srv, "/v1/chat/completions", body, "application/json"):
        _wait_for(lambda: _admin_row(srv)["in_flight"] == 1, 120)  # transcribing
    left = time.monotonic()
    _wait_for(lambda: srv.log().count(line) > seen, 30)
    answered = time.monotonic() - left
    # ...and its work stopped: the speech model is free for the next one.
    freed = _wait_for(lambda: _admin_row(srv)["in_flight"] == 0, 30) + answered
    started = time.monotonic()
    with SPANISH.open("rb") as file:
        assert "triste" in srv.client().audio.transcriptions.create(
            model="whisper", file=file, language="es").text.lower()
    print(f"chat audio: client gone -> answered 499 after {answered:.2f} s, speech model "
          f"free after {freed:.2f} s; next clip {time.monotonic() - started:.2f} s")
    assert answered < 2
