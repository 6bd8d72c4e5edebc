#!/usr/bin/env python3
"""Soak a real ``sarai-router serve``: many streamed requests from concurrent clients, with
the quality model loading and unloading under them, and idle RSS before and after.

    python scripts/soak.py [--requests 2000] [--clients 16] [--max-seconds 5400] [--json FILE]

What it does, in order:

1. starts ``sarai-router serve`` on 127.0.0.1 (a free port) with the built-in default config
   (both real models), the quality model's TTL cut to ``--quality-ttl`` seconds and the
   reaper every 0.5 s, so that quality loads and unloads again and again (TTL churn);
2. warm-up: one answer from each model, then waits (on ``/v1/models``) until quality has
   expired and only the pinned model is loaded, lets the reaper trim, and reads the
   server's idle RSS;
3. the soak: ``--clients`` asyncio clients stream ``--requests`` chat completions in all
   (``model: "auto"``); each block of 100 requests starts with 20 that route to quality and
   goes on with conversation that routes to fast, long enough for quality to expire before
   the next block. Bounded in count and in time (``--max-seconds``: no new request after it);
4. waits again for only the pinned model to be loaded, reads idle RSS, stops the server.

It reports the 5xx count, broken streams (no ``[DONE]``, no finish_reason, an error event,
a dropped connection), latency and time-to-first-token percentiles, quality's loads and
unloads, and idle RSS after the warm-up vs after the soak (target: within 5 %).
Only 127.0.0.1 is ever contacted. The machine is shared: figures from a busy machine are
slow, not wrong; compare RSS, counts and errors rather than latencies between runs.
"""

from __future__ import annotations

import argparse
import asyncio
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

import httpx
import psutil

SAR = str(Path(sys.executable).with_name("sarai-router"))
HOST = "127.0.0.1"

#: Routed to quality by the default heuristic (a multimodal keyword, not emotional).
QUALITY_PROMPTS = [
    "Describe esta imagen de un perro en el parque",
    "Explica este diagrama de una red de ordenadores",
    "What does this screenshot of a spreadsheet show?",
    "Analiza la foto de un paisaje de montaña",
]
#: Routed to fast (short emotional conversation, or nothing special: the default model).
FAST_PROMPTS = [
    "Hola, ¿cómo estás?",
    "Me siento un poco triste hoy",
    "¡Muchas gracias por tu ayuda!",
    "What is the capital of France?",
    "Cuéntame algo bonito",
    "Estoy muy contento, hoy aprobé el examen",
    "Give me one word that rhymes with cat.",
]
BLOCK = 100
QUALITY_PER_BLOCK = 20


MB = 1024 * 1024


def _region(addr: str) -> tuple[int, int]:
    """(start, size) of a mapping's ``start-end`` address range."""
    start, _, end = addr.partition("-")
    return int(start, 16), int(end, 16) - int(start, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_config(folder: Path, quality_ttl: float, clients: int) -> Path:
    from sarai_router.config import builtin_config_text

    text = builtin_config_text()
    text = re.sub(r"(?m)^reap_interval_seconds = .*$", "reap_interval_seconds = 0.5", text)
    # Every client may wait for the same model: none of them should get a 429.
    text = re.sub(r"(?m)^queue_size = \d+", f"queue_size = {clients}", text)
    head, sep, tail = text.rpartition("ttl_seconds = 60")  # the quality model's own TTL
    path = folder / "sarai.toml"
    path.write_text(head + f"ttl_seconds = {quality_ttl:g}" + tail if sep else text,
                    encoding="utf-8")
    return path


class Server:
    def __init__(self, folder: Path, config: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = folder / "server.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [SAR, "--config", str(config), "serve", "--host", HOST, "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.process.pid)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def models(self) -> dict[str, dict]:
        return {row["id"]: row for row in self.get("/v1/models").json()["data"]}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$")
        wanted = {f'{k}="{v}"' for k, v in labels.items()}
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            match = pattern.match(line)
            if match and wanted <= set((match.group(1) or "").split(",")):
                total += float(match.group(2))
        return total

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / (1024 * 1024)

    def memory_map(self) -> dict[str, float]:
        """Resident MB by kind of mapping (Linux): where RSS is, to see what grew."""
        kinds: dict[str, float] = {}
        try:
            maps = self.ps.memory_maps(grouped=False)
        except (psutil.Error, NotImplementedError):
            return kinds
        for region in maps:
            path = region.path
            if path == "[heap]":
                kind = "heap (main arena)"
            elif path.startswith("[stack"):
                kind = "main stack"
            elif not path or path.startswith("[anon"):
                start, size = _region(region.addr)
                # glibc's other arenas live in heaps aligned to 64 MB; thread stacks are 8 MB.
                kind = ("anon: malloc arenas" if start % (64 * MB) == 0
                        else "anon: thread stacks" if abs(size - 8 * MB) <= 64 * 1024
                        else "anon: other (mmapped blocks, buffers)")
            elif path.endswith(".gguf"):
                kind = f"file {Path(path).name}"
            elif ".so" in path:
                kind = "shared libraries"
            else:
                kind = "other files"
            kinds[kind] = kinds.get(kind, 0.0) + region.rss / (1024 * 1024)
        return {k: round(v, 1) for k, v in sorted(kinds.items())}

    def wait(self, predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited ({self.process.returncode}); log:\n"
                                 + self.log.read_text()[-3000:])
            try:
                if predicate():
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")

    def idle_rss(self, settle: float) -> dict[str, float]:
        """Wait until only pinned models are loaded and no request runs, let the reaper
        trim, then read RSS a few times (the median)."""
        self.wait(lambda: all(row["state"] == ("loaded" if row["pinned"] else "unloaded")
                              for name, row in self.models().items() if name != "auto"),
                  600, "only the pinned models to be loaded")
        time.sleep(settle)  # a few reaper rounds: its idle heap trim
        samples = []
        for _ in range(5):
            samples.append(self.rss_mb())
            time.sleep(0.2)
        return {"rss_mb": round(statistics.median(samples), 1),
                "loaded": [n for n, r in self.models().items() if r.get("loaded") and n != "auto"],
                "threads": self.ps.num_threads(),
                "by_mapping_mb": self.memory_map()}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.returncode


async def one_request(client: httpx.AsyncClient, url: str, prompt: str,
                      max_tokens: int) -> dict:
    """Stream one answer; what happened to it."""
    body = {"model": "auto", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    result = {"status": None, "broken": "", "ttft": None, "latency": None, "model": None,
              "pieces": 0}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            result["status"] = response.status_code
            result["model"] = response.headers.get("x-sarai-model")
            if response.status_code != 200:
                await response.aread()
                return result
            finish = done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    result["broken"] = f"error event: {chunk['error'].get('code')}"
                    continue
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        if result["ttft"] is None:
                            result["ttft"] = time.perf_counter() - started
                        result["pieces"] += 1
                    if choice.get("finish_reason"):
                        finish = True
            if not result["broken"] and not (finish and done):
                result["broken"] = f"ended without {'[DONE]' if not done else 'finish_reason'}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result["broken"] = f"{type(exc).__name__}: {exc}"
    result["latency"] = time.perf_counter() - started
    return result


def prompt_for(index: int) -> str:
    position = index % BLOCK
    if position < QUALITY_PER_BLOCK:
        return QUALITY_PROMPTS[index % len(QUALITY_PROMPTS)]
    return FAST_PROMPTS[index % len(FAST_PROMPTS)]


async def soak(url: str, requests: int, clients: int, max_tokens: int,
               max_seconds: float, progress: bool) -> tuple[list[dict], float]:
    next_index = 0
    results: list[dict] = []
    deadline = time.monotonic() + max_seconds
    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(600.0, connect=30.0)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            results.append(await one_request(client, url, prompt_for(index), max_tokens))
            if progress and len(results) % 50 == 0:
                bad = sum(1 for r in results if r["broken"] or (r["status"] or 0) >= 500)
                print(f"  {len(results)}/{requests} done, {bad} bad, "
                      f"{time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results, time.monotonic() - started


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--quality-ttl", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=5400.0,
                        help="no new request after this many seconds of soak")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds idle before reading RSS (reaper rounds)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the server's environment (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--json", dest="json_file", help="also write the report here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="sarai-soak-"))
    config = write_config(folder, args.quality_ttl, args.clients)
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1",
           **dict(item.split("=", 1) for item in args.env)}
    server = Server(folder, config, env)
    report: dict = {"settings": vars(args), "log": str(server.log)}
    try:
        server.wait(lambda: server.get("/health").status_code == 200, 300, "the server")
        report["rss_start_mb"] = round(server.rss_mb(), 1)
        for model in ("fast", "quality"):  # warm-up: every model loaded once
            response = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
                "model": model, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": "Hola"}]})
            response.raise_for_status()
        report["idle_after_warmup"] = server.idle_rss(args.settle)
        loads_before = server.metric("sarai_model_loads_total", model="quality")
        if not args.quiet:
            print(f"warm-up done: idle RSS {report['idle_after_warmup']['rss_mb']} MB; "
                  f"soaking with {args.requests} requests from {args.clients} clients",
                  file=sys.stderr, flush=True)
        results, seconds = asyncio.run(soak(server.url, args.requests, args.clients,
                                            args.max_tokens, args.max_seconds, not args.quiet))
        report["idle_after_soak"] = server.idle_rss(args.settle)
        statuses: dict[str, int] = {}
        for r in results:
            key = str(r["status"]) if r["status"] is not None else "no response"
            statuses[key] = statuses.get(key, 0) + 1
        ok = [r for r in results if r["status"] == 200 and not r["broken"]]
        report["soak"] = {
            "requests": len(results),
            "seconds": round(seconds, 1),
            "requests_per_second": round(len(results) / seconds, 2) if seconds else None,
            "statuses": statuses,
            "5xx": sum(1 for r in results if (r["status"] or 0) >= 500),
            "broken_streams": sum(1 for r in results if r["broken"]),
            "broken_examples": sorted({r["broken"] for r in results if r["broken"]})[:5],
            "by_model": {m: sum(1 for r in results if r["model"] == m)
                         for m in sorted({r["model"] for r in results if r["model"]})},
            "latency_s": percentiles([r["latency"] for r in ok]),
            "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
            "quality_loads": int(server.metric("sarai_model_loads_total", model="quality")
                                 - loads_before),
            "quality_unloads": int(server.metric("sarai_model_unloads_total", model="quality")),
            "runaway_stops": int(server.metric("sarai_runaway_stops_total")),
        }
        before = report["idle_after_warmup"]["rss_mb"]
        after = report["idle_after_soak"]["rss_mb"]
        report["idle_rss_change_pct"] = round(100 * (after - before) / before, 2)
        report["idle_rss_within_5pct"] = abs(after - before) <= 0.05 * before
    finally:
        report["exit_code"] = server.stop()
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json_file:
        Path(args.json_file).write_text(text + "\n", encoding="utf-8")
    soak_report = report.get("soak", {})
    healthy = (soak_report.get("5xx") == 0 and soak_report.get("broken_streams") == 0
               and report.get("idle_rss_within_5pct"))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
