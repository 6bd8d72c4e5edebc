#!/usr/bin/env python3
"""Measure what the HTTP server costs compared with calling the engine in process.

    python scripts/measure_server.py [--runs 15] [--json]

Uses the built-in default config (the two real models, their real n_ctx), with the quality
model's TTL shortened so its unload can be watched. In order, never at the same time:

1. in process: the quality model's cold load time, RSS before/after it, then per-request
   latency (median of --runs, same prompt, max_tokens 4, temperature 0, fixed seed) and
   streaming tok/s (max_tokens 64) on the fast model;
2. a real ``sarai-router serve`` subprocess: the same two figures over HTTP (keep-alive
   connection, raw http.client so that no client library's cost is counted), then the
   server's RSS with only the pinned model, after loading quality, and after its TTL unload.

The machine is shared: run it when it is quiet, and compare medians, not single runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from sarai_router.backend import GenerationParams
from sarai_router.config import builtin_config_text
from sarai_router.loading import load_config
from sarai_router.engine import Completion, Engine
from sarai_router.memory import process_rss_mb
from sarai_router.types import ChatRequest

PROMPT = "Hola, ¿cómo estás?"
SHORT = dict(max_tokens=4, temperature=0.0, seed=1)
STREAM = dict(max_tokens=64, temperature=0.0, seed=1)
QUALITY_TTL = 3
SAR = str(Path(sys.executable).with_name("sarai-router"))


def write_config(folder: Path, threads: int) -> Path:
    text = builtin_config_text()
    text = re.sub(r"(?m)^reap_interval_seconds = .*$", "reap_interval_seconds = 0.5", text)
    if threads:
        text = re.sub(r"(?m)^(n_batch = .*)$", rf"\1\nn_threads = {threads}", text)
    # The quality model's own ttl_seconds is the last one in the file.
    head, sep, tail = text.rpartition("ttl_seconds = 60")
    path = folder / "sarai.toml"
    path.write_text(head + f"ttl_seconds = {QUALITY_TTL}" + tail if sep else text)
    return path


def in_process(config_path: Path, runs: int) -> dict:
    config = load_config(config_path)
    engine = Engine(config)
    try:
        engine.pool.load_pinned()
        rss_before = process_rss_mb()
        started = time.perf_counter()
        resident = engine.pool.ensure_loaded("quality")
        cold_load = time.perf_counter() - started
        rss_loaded = process_rss_mb()
        engine.pool.unload("quality")
        rss_unloaded = process_rss_mb()

        request = ChatRequest.from_prompt(PROMPT)
        latencies, tokens = [], set()
        for _ in range(runs + 1):
            started = time.perf_counter()
            completion = engine.complete(request, GenerationParams(**SHORT), model="fast")
            latencies.append(time.perf_counter() - started)
            tokens.add(completion.usage.completion_tokens)
        latencies = latencies[1:]  # the first run warms caches

        rates = []
        for _ in range(3):
            decision = engine.route(request, model="fast")
            completion = Completion(decision=decision)
            started = time.perf_counter()
            for _piece in engine.stream(request, decision, GenerationParams(**STREAM), completion):
                pass
            rates.append(completion.usage.completion_tokens / (time.perf_counter() - started))
        return {
            "quality_cold_load_s": cold_load,
            "quality_load_event_s": resident.load_seconds,
            "rss_mb_fast_only": rss_before,
            "rss_mb_quality_loaded": rss_loaded,
            "rss_mb_quality_unloaded": rss_unloaded,
            "request_median_ms": statistics.median(latencies) * 1000,
            "request_tokens": sorted(tokens),
            "stream_tok_s": statistics.median(rates),
        }
    finally:
        engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[dict | None, float, int]:
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if not body.get("stream"):
        data = json.loads(resp.read())
        return data, time.perf_counter() - started, data["usage"]["completion_tokens"]
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # Read to the end (not just to [DONE]) so the keep-alive connection stays usable.
    return None, time.perf_counter() - started, tokens


def get_json(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def loaded(conn, name: str) -> bool:
    rows = {row["id"]: row for row in get_json(conn, "/v1/models")["data"]}
    return rows[name]["loaded"]


def through_server(config_path: Path, runs: int) -> dict:
    port = free_port()
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"}
    log = open(config_path.with_name("server.log"), "wb")
    server = subprocess.Popen([SAR, "--config", str(config_path), "serve", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(conn, "/health")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start; see " + log.name)
                conn.close()
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731
        messages = [{"role": "user", "content": PROMPT}]
        latencies, tokens = [], set()
        for _ in range(runs + 1):
            _, seconds, n = post(conn, {"model": "fast", "messages": messages, **SHORT})
            latencies.append(seconds)
            tokens.add(n)
        latencies = latencies[1:]
        rates = []
        for _ in range(3):
            _, seconds, n = post(conn, {"model": "fast", "messages": messages, "stream": True,
                                        "stream_options": {"include_usage": True}, **STREAM})
            rates.append(n / seconds)

        rss_fast_only = rss()
        started = time.perf_counter()
        post(conn, {"model": "quality", "messages": messages, "max_tokens": 1})
        first_quality = time.perf_counter() - started
        rss_loaded = rss()
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        load_s = float(re.search(r'sarai_model_load_seconds_sum\{model="quality"\} (\S+)',
                                 metrics).group(1))
        started = time.monotonic()
        while loaded(conn, "quality"):
            time.sleep(0.2)
        unload_after = time.monotonic() - started
        time.sleep(0.5)
        return {
            "request_median_ms": statistics.median(latencies) * 1000,
            "request_tokens": sorted(tokens),
            "stream_tok_s": statistics.median(rates),
            "quality_cold_load_s": load_s,
            "quality_first_request_s": first_quality,
            "rss_mb_fast_only": rss_fast_only,
            "rss_mb_quality_loaded": rss_loaded,
            "rss_mb_quality_unloaded": rss(),
            "ttl_unload_seen_after_s": unload_after,
        }
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0,
                        help="n_threads for both models (default: the config's, all cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config_path = write_config(Path(folder), args.threads)
        print("in process...", file=sys.stderr)
        direct = in_process(config_path, args.runs)
        print("through the server...", file=sys.stderr)
        served = through_server(config_path, args.runs)
    result = {"direct": direct, "server": served, "threads": args.threads or "all",
              "overhead_ms": served["request_median_ms"] - direct["request_median_ms"],
              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    d, s = direct, served
    print(f"runs {args.runs}, prompt {PROMPT!r}, n_threads {result['threads']}, load average "
          f"{result['load_average'][0]:.2f} on {result['cpus']} CPUs")
    print("| figure | in process | through the server |")
    print("|---|---|---|")
    print(f"| request, max_tokens 4, median | {d['request_median_ms']:.1f} ms | "
          f"{s['request_median_ms']:.1f} ms (overhead {result['overhead_ms']:+.1f} ms) |")
    print(f"| streaming, max_tokens 64, median | {d['stream_tok_s']:.1f} tok/s | "
          f"{s['stream_tok_s']:.1f} tok/s |")
    print(f"| quality cold load | {d['quality_cold_load_s']:.2f} s | "
          f"{s['quality_cold_load_s']:.2f} s (first request {s['quality_first_request_s']:.2f} s) |")
    print(f"| RSS, fast (pinned) only | {d['rss_mb_fast_only']:.0f} MB | "
          f"{s['rss_mb_fast_only']:.0f} MB |")
    print(f"| RSS, quality loaded | {d['rss_mb_quality_loaded']:.0f} MB | "
          f"{s['rss_mb_quality_loaded']:.0f} MB |")
    print(f"| RSS, quality unloaded | {d['rss_mb_quality_unloaded']:.0f} MB (explicit) | "
          f"{s['rss_mb_quality_unloaded']:.0f} MB (TTL {QUALITY_TTL}s, seen after "
          f"{s['ttl_unload_seen_after_s']:.1f} s) |")


if __name__ == "__main__":
    main()
