#!/usr/bin/env python3
"""Requests alternating between two models that don't fit together (``[cache] max_loaded =
1``), through the router: ``queue_order = "fifo"`` against ``"grouped"``.

    python scripts/bench_grouped_queue.py [--burst 12] [--requests 108] [--max-tokens 16]
                                          [--max-wait 30] [--backend llama_cpp] [--json]

For each order, a real ``sarai-router serve`` runs the two default models (fast and
quality, neither pinned, ``max_loaded = 1``). Bursts of ``--burst`` streamed requests are
sent at once, alternating fast, quality, fast, ... (10 ms apart, so that they arrive in
that order), the next burst once every answer of the last one is in, until ``--requests``
have been sent.

Figures per order: loads (``sarai_model_loads_total`` in ``/metrics``) in the first burst
and per 100 requests, the worst and the mean wait (request sent -> first token: queueing,
loads and the prompt), wall time, errors, and from ``/metrics`` how often a request went
ahead of an older one and the longest an older one had then been overtaken
(``sarai_queue_longest_overtaken_seconds``), which the fairness limit bounds.
``--max-wait`` is ``max_queue_wait_seconds``, the fairness limit of ``grouped``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from sarai_router.config import default_models_dir
from sarai_router.testing import start_serve
FAST_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUALITY_FILE = "gemma-3-270m-q4_k_m.gguf"
ORDERS = ("fifo", "grouped")
MODELS = ("fast", "quality")
STAGGER_S = 0.01


async def one(client: httpx.AsyncClient, url: str, model: str, index: int,
              max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
            "seed": index, "messages": [{"role": "user", "content": f"Name a colour ({index})."}]}
    row = {"model": model, "wait": None, "error": ""}
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                row["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return row
            async for line in response.aiter_lines():
                if row["wait"] is None and line.startswith("data: ") and '"content":' in line \
                        and '"content":""' not in line:
                    row["wait"] = time.perf_counter() - started
    except httpx.HTTPError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    if row["wait"] is None and not row["error"]:
        row["wait"] = time.perf_counter() - started  # an empty answer: its end
    return row


async def bursts(base: str,
                 args: argparse.Namespace) -> tuple[list[list[dict]], float, float]:
    """The answers of each burst, the wall time, and the loads after the first burst."""
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.burst + 2, max_keepalive_connections=0)
    done: list[list[dict]] = []
    first_loads = 0.0
    async with httpx.AsyncClient(timeout=900, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        sent = 0
        while sent < args.requests:
            tasks = []
            for i in range(min(args.burst, args.requests - sent)):
                tasks.append(asyncio.create_task(
                    one(client, url, MODELS[i % 2], sent + i, args.max_tokens)))
                await asyncio.sleep(STAGGER_S)
            done.append(await asyncio.gather(*tasks))
            sent += len(tasks)
            if len(done) == 1:
                first_loads = await asyncio.to_thread(loads, base)
        wall = time.perf_counter() - started
    return done, wall, first_loads


def scrape(base: str) -> dict[str, float]:
    """Loads, overtakes and the longest overtaken wait, from the router's /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = {"loads": 0.0, "overtakes": 0.0, "longest_overtaken_s": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sarai_model_loads_total":
                found["loads"] += sample.value
            elif sample.name == "sarai_queue_overtakes_total":
                found["overtakes"] = sample.value
            elif sample.name == "sarai_queue_longest_overtaken_seconds":
                found["longest_overtaken_s"] = round(sample.value, 2)
    return found


def loads(base: str) -> float:
    return scrape(base)["loads"]


def write_config(folder: Path, order: str, args: argparse.Namespace) -> Path:
    models_dir = args.models_dir
    common = {"backend": args.backend, "n_ctx": 512, "max_tokens": args.max_tokens,
              "pinned": False}
    if args.backend == "llama_server":
        common.update(parallel=1, n_threads=os.cpu_count() or 1)
    config = {
        "routing": {"default_model": "fast"},
        "cache": {"max_loaded": 1, "ttl_seconds": 3600, "queue_order": order,
                  "max_queue_wait_seconds": args.max_wait},
        "plugins": {"heuristic": {"conversation_model": "fast", "multimodal_model": "fast"}},
        "server": {"queue_size": args.burst},
        "models": {
            "fast": {**common, "path": str(models_dir / FAST_FILE)},
            "quality": {**common, "path": str(models_dir / QUALITY_FILE),
                        **({"chat_format": "gemma"} if args.backend == "llama_cpp" else {})},
        },
    }
    path = folder / f"{order}.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def run_order(config_path: Path, args: argparse.Namespace, log: Path) -> dict:
    # The kit's start_serve: fails with the server's log if it does not answer in time.
    server = start_serve(config_path, env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"},
                         echo=False, log_path=log.with_suffix(f".{config_path.stem}.log"),
                         timeout=120)
    base = server.url
    try:
        results, wall, first_burst_loads = asyncio.run(bursts(base, args))
        figures = scrape(base)
        total_loads = figures["loads"]
    finally:
        server.stop(timeout=30)
    rows = [row for burst in results for row in burst]
    ok = [r for r in rows if not r["error"]]
    waits = [r["wait"] for r in ok]
    first = [r["wait"] for r in results[0] if not r["error"]]
    return {
        "requests": len(rows), "errors": len(rows) - len(ok),
        "first_error": next((r["error"] for r in rows if r["error"]), None),
        "first_burst_loads": first_burst_loads,
        "first_burst_worst_wait_s": round(max(first), 2) if first else None,
        "loads": total_loads,
        "loads_per_100_requests": round(100 * total_loads / len(rows), 1),
        "worst_wait_s": round(max(waits), 2) if waits else None,
        "mean_wait_s": round(statistics.mean(waits), 2) if waits else None,
        "wall_s": round(wall, 1),
        "overtakes": figures["overtakes"],
        "longest_overtaken_s": figures["longest_overtaken_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=12, help="requests sent at once")
    parser.add_argument("--requests", type=int, default=108)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="[cache] max_queue_wait_seconds (grouped)")
    parser.add_argument("--backend", choices=("llama_cpp", "llama_server"), default="llama_cpp")
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name in (FAST_FILE, QUALITY_FILE):
        if not (args.models_dir / name).is_file():
            parser.error(f"model file not found: {name} (run `sarai-router models pull`)")
    if args.backend == "llama_server":
        from sarai_router.default_plugins.llama_server_install import build_llama_server

        os.environ["SARAI_ROUTER_LLAMA_SERVER"] = str(
            build_llama_server(report=lambda m: print(m, file=sys.stderr)))
    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        folder = Path(tmp)
        for order in ORDERS:
            sides[order] = run_order(write_config(folder, order, args), args,
                                     folder / "serve.log")
            if not args.json:
                print(f"{order}: {sides[order]}", file=sys.stderr)
    summary = {"setup": {"burst": args.burst, "requests": args.requests,
                         "max_tokens": args.max_tokens, "max_queue_wait_seconds": args.max_wait,
                         "backend": args.backend, "cpus": os.cpu_count(),
                         "load_average": os.getloadavg()},
               **sides}
    summary["target"] = {
        f"grouped: the first {args.burst} answered with <= 4 loads":
            sides["grouped"]["first_burst_loads"] <= 4 and sides["grouped"]["errors"] == 0,
        "grouped: nobody overtaken past the fairness limit":
            sides["grouped"]["longest_overtaken_s"] <= args.max_wait,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"bursts of {args.burst} requests alternating fast/quality, max_loaded = 1, "
          f"{args.requests} requests, {args.backend}")
    print(f"{'order':9}{'loads, first burst':>20}{'loads / 100 req':>17}{'worst wait':>12}"
          f"{'mean wait':>11}{'wall':>8}{'errors':>8}{'longest overtaken':>19}")
    for order in ORDERS:
        s = sides[order]
        print(f"{order:9}{s['first_burst_loads']:>20.0f}{s['loads_per_100_requests']:>17}"
              f"{s['worst_wait_s']:>11}s{s['mean_wait_s']:>10}s{s['wall_s']:>7}s"
              f"{s['errors']:>8}{s['longest_overtaken_s']:>18}s")
    for target, met in summary["target"].items():
        print(f"{target}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
