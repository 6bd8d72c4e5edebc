#!/usr/bin/env python3
"""Figures for docs/RELIABILITY.md: a real ``sarai-router serve`` against upstreams that
misbehave, a client that trickles a body no endpoint reads, and (``--audio``)
transcriptions that queue, run too long, or lose their client.

    python scripts/hostile_upstreams.py [--audio | --audio-only] [--json FILE]

The upstream is ``tests/bad_upstream.py``'s ``BadUpstream``: a real HTTP server on
127.0.0.1 forced to misbehave (garbage, a 20 MB line, a web page, a cut stream, a token
every 0.3 s for ever, keep-alive comments for ever, the API key echoed across the points
where messages are cut). For each case the script prints the status and ``code`` the
client got, how long it took, whether any five characters of the key reached the client,
and whether the server then still answered a plain request. Only 127.0.0.1 is contacted.
The machine is shared: times from a busy machine are slow, not wrong.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bad_upstream import PROBE_KEY, BadUpstream, key_fragments  # noqa: E402

SAR = str(Path(sys.executable).with_name("sarai-router"))
KEY_ENV = "SARAI_HOSTILE_PROBE_KEY"
TOTAL_SECONDS = 3
BODY_TIMEOUT = 2
CASES = [  # (model, stream, max_tokens, what)
    ("garbage", False, 8, "200 KB of random bytes"),
    ("garbage", True, 8, "200 KB of random bytes"),
    ("longline", False, 8, "one 20 MB line, no newline"),
    ("html", False, 8, "a web page with status 200"),
    ("notjson", False, 8, "data: lines that are not JSON"),
    ("empty", False, 8, "200 and no body"),
    ("cutearly", False, 8, "a role chunk, then the end"),
    ("cut", False, 8, "one token, then the end"),
    ("cut", True, 8, "one token, then the end"),
    ("trickle", False, 3, "a token every 0.3 s for ever"),
    ("trickle", True, 3, "a token every 0.3 s for ever"),
    ("keepalive", True, 8, "one token, then keep-alive comments for ever"),
    ("echo300", False, 8, "500, the key across character 300"),
    ("echo1000", False, 8, "400, the key across character 1000"),
    ("midecho", True, 8, "an error event, the key across character 1000"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(upstream: BadUpstream, folder: Path, baseline: bool = False) -> str:
    names = sorted({c[0] for c in CASES} | {"fine"})
    models = "".join(f"""
[models.{name}{suffix}]
backend = "openai"
base_url = "{upstream.base_url(name)}"
api_key_env = "{KEY_ENV}"
max_tokens = 8
timeout_seconds = 5
{"" if baseline else f"total_timeout_seconds = {TOTAL_SECONDS}"}
""" for name in names for suffix in ("", "_s"))
    return f"""[paths]
models_dir = "{folder.as_posix()}"

[routing]
default_model = "fine"

[server]
body_timeout_seconds = {BODY_TIMEOUT}

[plugins.heuristic]
conversation_model = "fine"
multimodal_model = "fine"
{models}"""


def start_server(config: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([SAR, "--config", str(config), "serve", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the server exited:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    sys.exit("the server did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def chat(url: str, model: str, stream: bool, max_tokens: int, timeout: float = 120) -> dict:
    body = {"model": model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hola"}]}
    started = time.monotonic()
    try:
        response = httpx.post(url + "/v1/chat/completions", json=body,
                              timeout=httpx.Timeout(timeout, read=timeout))
    except httpx.TimeoutException:
        return {"status": None, "seconds": round(time.monotonic() - started, 2),
                "key_fragments": 0, "note": f"no answer within {timeout:g} s"}
    seconds = time.monotonic() - started
    text = response.text
    row = {"status": response.status_code, "seconds": round(seconds, 2),
           "key_fragments": len(key_fragments(text, PROBE_KEY))}
    if response.status_code >= 400:
        row["code"] = response.json()["error"]["code"]
        return row
    if stream:
        events = [json.loads(line[6:]) for line in re.findall(r"^data: (?!\[DONE\]).*$", text,
                                                              flags=re.M)]
        chunks = [e for e in events if e.get("choices")]
        row["content"] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        row["finish_reason"] = chunks[-1]["choices"][0]["finish_reason"] if chunks else None
        row["error_event"] = next((e["error"]["code"] for e in events if "error" in e), None)
        row["done"] = "data: [DONE]" in text
    else:
        choice = response.json()["choices"][0]
        row["content"] = choice["message"]["content"]
        row["finish_reason"] = choice["finish_reason"]
    return row


def slow_body(url: str, most: float) -> float:
    """Seconds a ``GET /health`` with ``Content-Length: 100000`` and then one byte a
    second keeps its connection (at most ``most``)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        sock.recv(65536)
        started = time.monotonic()
        sock.settimeout(1.0)
        while time.monotonic() - started < most:
            try:
                sock.sendall(b"x")
                if sock.recv(4096) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        return time.monotonic() - started


def upstream_figures(baseline: bool = False) -> dict:
    upstream = BadUpstream()
    folder = Path(tempfile.mkdtemp(prefix="sarai-hostile-"))
    config = folder / "sarai.toml"
    config.write_text(config_text(upstream, folder, baseline), encoding="utf-8")
    process, url = start_server(config, folder / "server.log", {KEY_ENV: PROBE_KEY})
    rows = []
    try:
        for model, stream, max_tokens, what in CASES:
            row = chat(url, model + ("_s" if stream else ""), stream, max_tokens,
                       timeout=20 if baseline else 120)
            after = chat(url, "fine", False, 8)
            row.update(case=f"{what}{' (streamed)' if stream else ''}", model=model,
                       next_request=after["status"] == 200 and after["content"] == "Hola")
            rows.append(row)
            print(json.dumps(row), flush=True)
        held = slow_body(url, 30 if baseline else 90)
        print(json.dumps({"case": "GET /health, Content-Length 100000, 1 byte/s",
                          "connection_held_seconds": round(held, 2)}), flush=True)
        alive = process.poll() is None
    finally:
        stop(process)
        upstream.close()
    return {"upstream": rows, "slow_body_held_seconds": round(held, 2), "alive": alive,
            "upstream_connections_closed_by_router": dict(upstream.closed)}


def wav(samples: bytes, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples)
    return out.getvalue()


#: The default models, not pinned: the transcription endpoint needs none of them loaded.
AUDIO_MODELS = """[models.fast]
path = "{models_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"

[models.quality]
path = "{models_dir}/gemma-3-270m-q4_k_m.gguf"

"""


def audio_figures(bound: float) -> dict:
    with wave.open(str(ROOT / "tests" / "fixtures" / "en_picture.wav")) as w:
        speech = w.readframes(w.getnframes())
    long_clip = wav(speech * 85)  # ~280 s
    short = (ROOT / "tests" / "fixtures" / "es_triste.wav").read_bytes()
    folder = Path(tempfile.mkdtemp(prefix="sarai-hostile-audio-"))
    results = {}
    for name, whisper in (("bounded", f"max_seconds = 300\ntimeout_seconds = {bound:g}"),
                          ("patient", "max_seconds = 300")):
        config = folder / f"{name}.toml"
        config.write_text(AUDIO_MODELS + f"[server]\nqueue_size = 1\n\n[plugins.whisper]\n"
                          f"{whisper}\n", encoding="utf-8")
        log = folder / f"{name}.log"
        process, url = start_server(config, log, {"SARAI_ROUTER_NO_PLUGINS": "1"})

        def transcribe(data: bytes, language: str = "en") -> tuple[int, float]:
            started = time.monotonic()
            response = httpx.post(url + "/v1/audio/transcriptions", timeout=900,
                                  files={"file": ("clip.wav", data, "audio/wav")},
                                  data={"model": "whisper", "language": language})
            return response.status_code, time.monotonic() - started

        try:
            transcribe(short, "es")  # loads the model
            results[f"{name}_short_clip_seconds"] = round(transcribe(short, "es")[1], 2)
            if name == "bounded":
                status, seconds = transcribe(long_clip)
                # The next clip waits for the abandoned work to stop at its next check.
                next_status, next_seconds = transcribe(short, "es")
                results["timeout"] = {"status": status, "seconds": round(seconds, 2),
                                      "timeout_seconds": bound, "next_status": next_status,
                                      "next_clip_seconds": round(next_seconds, 2)}
                started = time.monotonic()
                chat = httpx.post(url + "/v1/chat/completions", timeout=900,
                                  json=audio_chat(long_clip))
                results["chat_audio_timeout"] = {
                    "status": chat.status_code, "seconds": round(time.monotonic() - started, 2),
                    "code": chat.json().get("error", {}).get("code")}
                answers: list = []
                threads = [threading.Thread(target=lambda: answers.append(transcribe(long_clip)))
                           for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                results["four_at_once_queue_size_1"] = sorted(s for s, _ in answers)
            else:
                results["cancel"] = cancel_figure(url, long_clip, log, transcribe, short)
                results["chat_audio_cancel"] = cancel_figure(url, long_clip, log, transcribe,
                                                             short, chat=True)
            print(json.dumps(results), flush=True)
        finally:
            stop(process)
    return results


def audio_chat(clip: bytes) -> dict:
    """A chat request whose audio (``input_audio``) is transcribed first."""
    return {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(),
                                                "format": "wav"}}]}]}


def cancel_figure(url: str, long_clip: bytes, log: Path, transcribe, short: bytes,
                  chat: bool = False) -> dict:
    """A client that sends the long clip (to the transcription endpoint, or in a chat
    request), leaves 1.5 s later: when the server answers it (the log line), and how long
    the next short clip then takes (it waits for the abandoned work to stop)."""
    port = int(url.rsplit(":", 1)[1])
    if chat:
        body = json.dumps(audio_chat(long_clip)).encode()
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n")
    else:
        boundary = "hostile-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
                f"whisper\r\n--{boundary}\r\nContent-Disposition: form-data; "
                f"name=\"language\"\r\n\r\nen\r\n--{boundary}\r\nContent-Disposition: "
                f"form-data; name=\"file\"; filename=\"long.wav\"\r\nContent-Type: "
                f"audio/wav\r\n\r\n").encode() + long_clip + f"\r\n--{boundary}--\r\n".encode()
        head = ("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n")
    line = "client went away; stopped its transcription"
    seen = log.read_text().count(line)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(1.5)
    left = time.monotonic()
    while log.read_text().count(line) <= seen and time.monotonic() - left < 600:
        time.sleep(0.05)
    stopped = time.monotonic() - left
    status, seconds = transcribe(short, "es")
    return {"answered_seconds_after_the_client_left": round(stopped, 2),
            "next_status": status, "next_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", action="store_true", help="also the transcription bounds")
    parser.add_argument("--audio-timeout", type=float, default=12.0)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--baseline", action="store_true",
                        help="for a sarai-router without total_timeout_seconds (the figures "
                        "before the checks): no such key, 20 s per request")
    parser.add_argument("--audio-only", action="store_true",
                        help="only the transcription bounds (no upstream cases)")
    args = parser.parse_args()
    if args.audio_only:
        figures = {"audio": audio_figures(args.audio_timeout)}
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
        return
    figures = upstream_figures(args.baseline)
    if args.audio:
        figures["audio"] = audio_figures(args.audio_timeout)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    bad = [r for r in figures["upstream"] if r["status"] in (200, None)
           and r.get("finish_reason") != "length" or r["key_fragments"] or not r["next_request"]]
    sys.exit(1 if bad or not figures["alive"] else 0)


if __name__ == "__main__":
    main()
