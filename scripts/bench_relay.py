#!/usr/bin/env python3
"""What the router costs in front of an engine: llama-server called directly, against the
router relaying the same llama-server as an ``openai`` model, and against the router running
its own llama-server as a managed ``llama_server`` model with the same flags.

    python scripts/bench_relay.py [--concurrency 16] [--requests 64] [--max-tokens 64]
                                  [--rounds 3] [--parallel 16] [--threads 2] [--json]

Each round, never two sides at once:

1. llama-server starts by hand with the command line the ``llama_server`` backend would give
   it (``server_argv``: the same slots, threads, ``--no-repack`` on a CPU with AMX), and
   ``sarai-router serve`` starts with one ``openai`` model whose ``base_url`` is that server;
   the load goes to the server **direct** and through the router (**openai**), the order
   alternating between rounds;
2. both stop, and ``serve`` starts with the same GGUF as a pinned ``llama_server`` model
   (**managed**: the router starts the same command line as its child); the load goes
   through it.

The load (from ``bench_llama_server.py``): ``--requests`` streamed chat requests,
``--concurrency`` at a time, each exactly ``--max-tokens`` tokens (``--ignore-eos``).
Figures per side: aggregate tok/s, TTFT p50, errors; for the router sides the serve
process's own CPU time (user + system, not its children's) over the tokens it relayed: the
**router CPU per token**, which the machine's noise moves far less than the throughput.
The summary gives each ratio's median over rounds, each round's router side against the
direct side of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

from bench_llama_server import add_load_arguments, run_load, write_fast_config
from sarai_router.default_plugins.llama_server import server_argv
from sarai_router.default_plugins.llama_server_process import ServerProcess, free_port
from sarai_router.default_plugins.llama_server_install import build_llama_server
from sarai_router.loading import load_config
from sarai_router.testing import start_serve



def managed_model(args: argparse.Namespace) -> dict:
    return {"backend": "llama_server", "path": str(args.model), "n_ctx": args.n_ctx,
            "max_tokens": args.max_tokens, "parallel": args.parallel,
            "n_threads": args.threads, "pinned": True, "server_args": ["--ignore-eos"]}


def write_config(folder: Path, name: str, model: dict, args: argparse.Namespace) -> Path:
    return write_fast_config(folder / f"{name}.toml", model, args.requests)


def load(base_url: str, args: argparse.Namespace, serve=None) -> dict:
    """The load against ``base_url``; with ``serve``, its CPU per relayed token."""
    process = psutil.Process(serve.process.pid) if serve is not None else None
    before = process.cpu_times() if process else None
    figures = asyncio.run(run_load(base_url, "fast", requests=args.requests,
                                   concurrency=args.concurrency, max_tokens=args.max_tokens))
    if process is not None:
        after = process.cpu_times()
        cpu = (after.user + after.system) - (before.user + before.system)
        # run_load's warm-up request (8 tokens) is inside the window: counted as tokens too.
        tokens = figures["completion_tokens"] + 8
        figures["router_cpu_s"] = round(cpu, 3)
        figures["router_cpu_ms_per_token"] = round(1000 * cpu / max(1, tokens), 4)
    return figures


def serve(config: Path, env: dict) -> object:
    return start_serve(config, echo=False, env=env, timeout=300,
                       log_path=config.with_suffix(".log"))


def one_round(number: int, folder: Path, binary: str, args: argparse.Namespace,
              env: dict) -> dict:
    spec = load_config(write_config(folder, "managed", managed_model(args), args)
                       ).models["fast"]
    port = free_port()
    argv = server_argv(spec, binary, port)
    direct = ServerProcess("direct", argv, port)
    direct.start(timeout=300)
    figures: dict = {}
    try:
        relay = write_config(folder, "openai", {
            "backend": "openai", "base_url": f"{direct.base_url}/v1",
            "max_tokens": args.max_tokens, "max_concurrency": args.parallel + 4,
            "pinned": True}, args)
        router = serve(relay, env)
        try:
            order = ("direct", "openai") if number % 2 else ("openai", "direct")
            for side in order:
                figures[side] = (load(direct.base_url, args) if side == "direct"
                                 else load(router.url, args, router))
        finally:
            router.stop()
    finally:
        direct.stop()
    router = serve(folder / "managed.toml", env)
    try:
        figures["managed"] = load(router.url, args, router)
    finally:
        router.stop()
    figures["command"] = " ".join(Path(a).name if a.startswith("/") else a for a in argv)
    return figures


def summarize(rounds: list[dict]) -> dict:
    def ratios(side: str, key: str) -> float:
        return round(statistics.median(r[side][key] / r["direct"][key] for r in rounds), 3)

    def median(side: str, key: str) -> float:
        return round(statistics.median(r[side][key] for r in rounds), 4)

    out = {"rounds": len(rounds), "errors": {s: sum(r[s]["errors"] for r in rounds)
                                             for s in ("direct", "openai", "managed")}}
    for side in ("direct", "openai", "managed"):
        out[side] = {"aggregate_tok_s": median(side, "aggregate_tok_s"),
                     "ttft_p50_s": median(side, "ttft_p50_s")}
    for side in ("openai", "managed"):
        out[side].update(tok_s_ratio=ratios(side, "aggregate_tok_s"),
                         ttft_p50_ratio=ratios(side, "ttft_p50_s"),
                         router_cpu_ms_per_token=median(side, "router_cpu_ms_per_token"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, rounds=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model} (run `sarai-router models pull`)")
    binary = str(build_llama_server(report=lambda m: print(m, file=sys.stderr)))
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1", "SARAI_ROUTER_LLAMA_SERVER": binary}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        for number in range(1, args.rounds + 1):
            figures = one_round(number, Path(tmp), binary, args, env)
            rounds.append(figures)
            print(f"round {number}: " + " | ".join(
                f"{side} {figures[side]['aggregate_tok_s']} tok/s, TTFT p50 "
                f"{figures[side]['ttft_p50_s']} s"
                + (f", CPU {figures[side]['router_cpu_ms_per_token']} ms/token"
                   if side != "direct" else "")
                + (f", {figures[side]['errors']} errors" if figures[side]["errors"] else "")
                for side in ("direct", "openai", "managed")), file=sys.stderr)
    summary = summarize(rounds)
    summary["setup"] = {"concurrency": args.concurrency, "requests": args.requests,
                        "max_tokens": args.max_tokens, "parallel": args.parallel,
                        "threads": args.threads, "model": args.model.name,
                        "cpus": os.cpu_count(), "command": rounds[0]["command"]}
    if args.json:
        print(json.dumps({**summary, "per_round": rounds}, indent=2))
        return 0
    print(f"{args.requests} streamed requests of {args.max_tokens} tokens, {args.concurrency} "
          f"at a time; llama-server --parallel {args.parallel}, {args.threads} threads; "
          f"median of {args.rounds} alternating rounds")
    print(f"{'':22}{'tok/s':>8}{'ratio':>8}{'TTFT p50':>10}{'ratio':>8}{'CPU ms/token':>14}"
          f"{'errors':>8}")
    for side, label in (("direct", "llama-server direct"), ("openai", "router, openai"),
                        ("managed", "router, llama_server")):
        row = summary[side]
        print(f"{label:22}{row['aggregate_tok_s']:>8}{row.get('tok_s_ratio', 1):>8}"
              f"{row['ttft_p50_s']:>10}{row.get('ttft_p50_ratio', 1):>8}"
              f"{row.get('router_cpu_ms_per_token', '-'):>14}{summary['errors'][side]:>8}")
    print("targets: tok/s ratio >= 0.98 (openai), >= 0.97 (llama_server); TTFT p50 ratio "
          "<= 1.1; router CPU <= 0.1 ms/token; 0 errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
