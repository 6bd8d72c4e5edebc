#!/usr/bin/env python3
"""Concurrent streams through the router to a managed llama-server, against llama-server
called directly with the same flags.

    python scripts/bench_llama_server.py [--concurrency 16] [--requests 64] [--max-tokens 64]
                                         [--parallel 16] [--threads 2] [--rounds 2] [--json]
    python scripts/bench_llama_server.py --default-config [--rounds 3]

For each round, in order and never at the same time:

1. **direct**: llama-server started by hand with exactly the command line the
   ``llama_server`` backend would give it (``server_argv``), on a free port;
2. **router**: a real ``sarai-router serve`` subprocess whose only model is that same GGUF
   with ``backend = "llama_server"``, pinned, so the router starts the same llama-server as
   its child.

The load is the same for both: ``--requests`` streamed chat requests, ``--concurrency`` at a
time, from one asyncio client (httpx) in this process, each asking for ``--max-tokens``
tokens. ``--ignore-eos`` is passed to the server in both cases (unless ``--allow-eos``) so
every request generates exactly that many tokens and both sides do the same work.

``--default-config``: the router side is ``sarai-router serve`` on the built-in default
config, untouched (no ``--config``, no ``sarai.toml``, ``[server] batching`` at its default),
asked for its ``fast`` model; the direct side is llama-server with the command line that
``serve`` gives that model's child (the same slots and threads). Answers may end at EOS
(the default config can't pass ``--ignore-eos``), so both sides get the default config's
sampling in every request, with the same seeds, and tok/s counts the tokens generated.
``--direct-threads N`` runs the direct side with N threads instead.

``--slots 4,8,16`` (with ``--default-config``): llama-server alone, as ``serve`` runs the
default config's fast model but with each of these ``--parallel`` values in turn, each
round; it prints the median tok/s and TTFT of each (how ``serve``'s slot count was chosen).

Figures: aggregate tok/s (completion tokens / wall time of the whole batch), TTFT
percentiles (request sent -> first content piece), latency p50, errors, and for the router
the CPU seconds the router process itself used per request. Rounds alternate direct and
router; the summary takes each side's median over rounds. The machine is shared: run it
when it is quiet and compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import httpx
import psutil
import tomli_w

from sarai_router.config import default_models_dir
from sarai_router.loading import load_config
from sarai_router.default_plugins.llama_server import server_argv
from sarai_router.default_plugins.llama_server_process import ServerProcess, free_port
from sarai_router.default_plugins.llama_server_install import build_llama_server

FAST_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAR = str(Path(sys.executable).with_name("sarai-router"))
PROMPTS = [
    "Tell me about the sea.", "Write a short poem about autumn.", "What is a router?",
    "Describe a busy market.", "Explain why the sky is blue.", "Tell a story about a cat.",
    "What do bees do?", "Describe your favourite meal.",
]


# -- the load ------------------------------------------------------------------------------

@attrs.define
class Result:
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


#: The request's sampling. ``--default-config``: the router applies the config's own
#: sampling and takes only the OpenAI keys in a request, so the direct side gets
#: ``DIRECT_SAMPLING`` as well: the config's values of llama.cpp's own keys.
SAMPLING: dict = {"temperature": 0.7}
DIRECT_SAMPLING: dict = {}


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int,
                      max_tokens: int, extra: dict) -> Result:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, **SAMPLING, **extra, "seed": index,
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]}
    result = Result()
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content") and result.ttft is None:
                        result.ttft = time.perf_counter() - started
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - started
    return result


async def run_load(base_url: str, model: str, *, requests: int, concurrency: int,
                   max_tokens: int, extra: dict | None = None) -> dict:
    extra = extra or {}
    url = f"{base_url}/v1/chat/completions"
    # A new connection per request, to both sides: llama-server sometimes closes a kept-alive
    # connection after a streamed answer without saying so, and the next request on it fails
    # (see _ChildClient in default_plugins/llama_server.py).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        # Warm-up: one request, not counted (first-use costs are not what is compared).
        await one_request(client, url, model, 0, 8, extra)
        gate = asyncio.Semaphore(concurrency)

        async def bounded(index: int) -> Result:
            async with gate:
                return await one_request(client, url, model, index, max_tokens, extra)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ok = [r for r in results if not r.error]
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": requests, "concurrency": concurrency, "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "completion_tokens": tokens, "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 1) if wall else 0.0,
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p90_s": round(percentile(ttfts, 90), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "latency_p50_s": round(statistics.median(r.latency for r in ok), 3) if ok else None,
    }


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * pct / 100
    low, high = int(k), min(int(k) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


# -- the two sides -------------------------------------------------------------------------

def write_config(folder: Path, args: argparse.Namespace) -> Path:
    model = {"backend": "llama_server", "path": str(args.model), "n_ctx": args.n_ctx,
             "max_tokens": args.max_tokens, "parallel": args.parallel,
             "n_threads": args.threads, "pinned": True}
    if not args.allow_eos:
        model["server_args"] = ["--ignore-eos"]
    return write_fast_config(folder / "sarai.toml", model, args.requests)


def write_fast_config(path: Path, model: dict, requests: int) -> Path:
    """A config whose only model, ``fast``, is ``model``, with room in the queue for
    ``requests``."""
    config = {
        "routing": {"default_model": "fast"},
        "cache": {"max_loaded": 1, "ttl_seconds": 3600},
        "plugins": {"heuristic": {"conversation_model": "fast", "multimodal_model": "fast"}},
        "server": {"queue_size": max(8, requests)},
        "models": {"fast": model},
    }
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def add_load_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The load's and llama-server's options, shared with scripts/bench_relay.py."""
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=16, help="llama-server slots")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=512, help="context per slot")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--model", type=Path, default=default_models_dir() / FAST_FILE)


def default_serve_spec():
    """The fast model as `serve` runs it on the built-in default config."""
    from sarai_router.default_plugins.batching import plan
    from sarai_router.engine import share_cores

    served = plan(load_config(None), "auto")
    if "fast" not in served.batched:
        raise SystemExit(f"serve would not batch the default config: {served.message}")
    return share_cores(served.config).models["fast"]


def run_direct(config_path: Path | None, binary: str, args: argparse.Namespace,
               slots: int = 0) -> dict:
    spec = default_serve_spec() if config_path is None else load_config(config_path).models["fast"]
    if slots:
        spec = attrs.evolve(spec, settings=attrs.evolve(spec.settings, parallel=slots))
    if args.direct_threads:
        spec = attrs.evolve(spec, settings=attrs.evolve(spec.settings,
                                                        n_threads=args.direct_threads))
    port = free_port()
    argv = server_argv(spec, binary, port)
    server = ServerProcess("direct", argv, port)
    server.start(timeout=300)
    try:
        figures = asyncio.run(run_load(server.base_url, "fast", requests=args.requests,
                                       concurrency=args.concurrency,
                                       max_tokens=args.max_tokens,
                                       extra=DIRECT_SAMPLING))
    finally:
        server.stop()
    figures["command"] = " ".join(Path(a).name if a.startswith("/") else a for a in argv)
    figures["flags"] = _flags(argv)
    return figures


def _flags(argv: list[str]) -> str:
    """A llama-server command line without the program's path and the port."""
    words = [Path(a).name if a.startswith("/") else a for a in argv[1:]]
    if "--port" in words:
        at = words.index("--port")
        del words[at:at + 2]
    return " ".join(words)


def wait_until_loaded(base: str, process: subprocess.Popen, failure: str,
                      model: str = "fast", timeout: float = 300) -> None:
    """Wait until ``serve`` at ``base`` reports ``model`` loaded; exit with ``failure`` if
    the process ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            row = {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=5)
                   .json()["data"]}[model]
            if row["loaded"]:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(failure)
        time.sleep(0.2)


def run_router(config_path: Path | None, args: argparse.Namespace, log: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"}
    if config_path is None:  # the built-in default config, as a new user starts it
        for name in ("SARAI_ROUTER_CONFIG", "SARAI_ROUTER_BATCHING"):
            env.pop(name, None)
        command = [SAR, "serve", "--port", str(port)]
    else:
        command = [SAR, "--config", str(config_path), "serve", "--port", str(port)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=log.parent)
    try:
        wait_until_loaded(base, process, f"serve did not start; see {log}")
        router = psutil.Process(process.pid)
        cpu_before = router.cpu_times()
        figures = asyncio.run(run_load(base, "fast", requests=args.requests,
                                       concurrency=args.concurrency,
                                       max_tokens=args.max_tokens))
        cpu_after = router.cpu_times()
        cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        # the warm-up request is inside the measured window too
        figures["router_cpu_ms_per_request"] = round(1000 * cpu / (args.requests + 1), 2)
        figures["children"] = [c.name() for c in router.children()]
        # The child's command line without its port: compared with the direct side's, it
        # shows the two ran the same llama-server the same way.
        figures["child_command"] = [_flags(c.cmdline()) for c in router.children()
                                    if "llama-server" in c.name()]
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return figures


def sweep_slots(binary: str, args: argparse.Namespace, choices: list[int]) -> int:
    runs: dict[int, list[dict]] = {n: [] for n in choices}
    for number in range(1, args.rounds + 1):
        for slots in choices:
            figures = run_direct(None, binary, args, slots)
            runs[slots].append(figures)
            print(f"round {number}: --parallel {slots}: {figures['aggregate_tok_s']} tok/s, "
                  f"TTFT p50 {figures['ttft_p50_s']} s, errors {figures['errors']}",
                  file=sys.stderr)
    best = max(statistics.median(r["aggregate_tok_s"] for r in runs[n]) for n in choices)
    print(f"{args.requests} streamed requests, {args.concurrency} at a time; llama-server "
          f"alone, median of {args.rounds} rounds")
    print(f"{'--parallel':>10}{'tok/s':>9}{'of best':>9}{'TTFT p50':>10}")
    for slots in choices:
        tok_s = statistics.median(r["aggregate_tok_s"] for r in runs[slots])
        ttft = statistics.median(r["ttft_p50_s"] for r in runs[slots])
        print(f"{slots:>10}{tok_s:>9}{tok_s / best:>9.2f}{ttft:>10}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, rounds=2)
    parser.add_argument("--allow-eos", action="store_true",
                        help="let answers end early (the two sides may then do unequal work)")
    parser.add_argument("--default-config", action="store_true",
                        help="the router side is `serve` on the built-in default config")
    parser.add_argument("--direct-threads", type=int, default=0,
                        help="threads of the direct llama-server (default: the router's)")
    parser.add_argument("--slots", default="",
                        help="with --default-config: compare these llama-server --parallel "
                             "values, llama-server alone (e.g. 4,8,16)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.default_config:
        # What the default config asks of the fast model, sent to both sides.
        fast = load_config(None).models["fast"]
        SAMPLING.clear()
        SAMPLING.update(temperature=fast.temperature)
        DIRECT_SAMPLING.update({k: getattr(fast, k) for k in ("top_k", "min_p",
                                                              "repeat_penalty")})
        spec = default_serve_spec()
        args.parallel, args.threads = spec.settings.parallel, spec.settings.n_threads
        args.n_ctx, args.model, args.allow_eos = spec.n_ctx, Path(spec.path), True
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model} (run `sarai-router models pull`)")
    binary = str(build_llama_server(report=lambda m: print(m, file=sys.stderr)))
    os.environ["SARAI_ROUTER_LLAMA_SERVER"] = binary

    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-llama-server-") as tmp:
        folder = Path(tmp)
        config_path = None if args.default_config else write_config(folder, args)
        if args.slots and args.default_config:
            return sweep_slots(binary, args, [int(n) for n in args.slots.split(",")])
        for number in range(1, args.rounds + 1):
            direct = run_direct(config_path, binary, args)
            router = run_router(config_path, args, folder / "serve.log")
            rounds.append({"direct": direct, "router": router})
            # Each round as it ends, on stderr (--json too): a long run that is
            # stopped early still shows what it measured.
            print(f"round {number}: direct {direct['aggregate_tok_s']} tok/s, TTFT p50 "
                  f"{direct['ttft_p50_s']} s | router {router['aggregate_tok_s']} tok/s, "
                  f"TTFT p50 {router['ttft_p50_s']} s", file=sys.stderr)

    def median(side: str, key: str) -> float:
        return round(statistics.median(r[side][key] for r in rounds), 3)

    summary = {
        "setup": {"concurrency": args.concurrency, "requests": args.requests,
                  "max_tokens": args.max_tokens, "parallel": args.parallel,
                  "threads": args.threads, "direct_threads": args.direct_threads or args.threads,
                  "default_config": args.default_config, "n_ctx_per_slot": args.n_ctx,
                  "model": args.model.name, "ignore_eos": not args.allow_eos,
                  "cpus": os.cpu_count(), "command": rounds[0]["direct"]["command"]},
        "rounds": rounds,
        "direct": {k: median("direct", k) for k in ("aggregate_tok_s", "ttft_p50_s",
                                                    "ttft_p90_s", "latency_p50_s")},
        "router": {k: median("router", k) for k in ("aggregate_tok_s", "ttft_p50_s",
                                                    "ttft_p90_s", "latency_p50_s",
                                                    "router_cpu_ms_per_request")},
        "errors": sum(r[s]["errors"] for r in rounds for s in ("direct", "router")),
        "same_command_line": all(r["router"]["child_command"] == [r["direct"]["flags"]]
                                 for r in rounds),
    }
    summary["tok_s_ratio"] = round(summary["router"]["aggregate_tok_s"]
                                   / summary["direct"]["aggregate_tok_s"], 3)
    summary["round_tok_s_ratios"] = [
        round(r["router"]["aggregate_tok_s"] / r["direct"]["aggregate_tok_s"], 3)
        for r in rounds]
    summary["median_round_tok_s_ratio"] = statistics.median(summary["round_tok_s_ratios"])
    summary["ttft_p50_ratio"] = round(summary["router"]["ttft_p50_s"]
                                      / summary["direct"]["ttft_p50_s"], 3)
    summary["targets"] = {"tok_s_ratio >= 0.95": summary["tok_s_ratio"] >= 0.95,
                          "ttft_p50_ratio <= 1.2": summary["ttft_p50_ratio"] <= 1.2}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    d, r = summary["direct"], summary["router"]
    print(f"{args.requests} streamed requests of {args.max_tokens} tokens, {args.concurrency} "
          f"at a time; llama-server --parallel {args.parallel}, {args.threads} threads "
          f"(direct: {args.direct_threads or args.threads}); "
          f"{'serve on the built-in default config; ' if args.default_config else ''}"
          f"median of {args.rounds} rounds")
    print(f"{'':28}{'aggregate tok/s':>16}{'TTFT p50':>10}{'TTFT p90':>10}{'latency p50':>13}")
    print(f"{'llama-server direct':28}{d['aggregate_tok_s']:>16}{d['ttft_p50_s']:>10}"
          f"{d['ttft_p90_s']:>10}{d['latency_p50_s']:>13}")
    print(f"{'router -> llama_server':28}{r['aggregate_tok_s']:>16}{r['ttft_p50_s']:>10}"
          f"{r['ttft_p90_s']:>10}{r['latency_p50_s']:>13}")
    print(f"rounds' tok/s ratios: {summary['round_tok_s_ratios']} (median "
          f"{summary['median_round_tok_s_ratio']}); the router's child ran the direct side's command line: "
        + ("yes" if summary["same_command_line"] else
           f"NO (direct: {rounds[0]['direct']['flags']}; child: "
           f"{rounds[0]['router']['child_command']})"))
    print(f"ratio: tok/s {summary['tok_s_ratio']} (target >= 0.95), TTFT p50 "
          f"{summary['ttft_p50_ratio']} (target <= 1.2); router CPU "
          f"{r['router_cpu_ms_per_request']} ms/request; errors {summary['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
