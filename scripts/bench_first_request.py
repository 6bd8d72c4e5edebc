#!/usr/bin/env python3
"""One user, one request: what `query` and `chat` pay in process against a managed llama-server.

    python scripts/bench_first_request.py [--rounds 3] [--max-tokens 16]

For each model of the built-in default config, rounds alternate the two ways of running it,
never at the same time:

1. **in process**: the model as written (``llama_cpp``), as ``query`` runs it;
2. **llama_server**: the same model as ``serve`` runs it when llama-server is installed
   (``sarai_router.default_plugins.batching.plan``), a child process on a free port.

Each run is a fresh engine: load the model, answer one short prompt, close. Figures: the
load (file to ready: for the child, until its ``/health`` says loaded), the first token
after the request (load excluded), and the whole request. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from sarai_router.backend import GenerationParams
from sarai_router.default_plugins.batching import plan
from sarai_router.loading import load_config
from sarai_router.engine import Engine
from sarai_router.default_plugins.llama_server_install import build_llama_server
from sarai_router.types import ChatRequest

PROMPT = "Say hello to a new user in one sentence."


def one(config, name: str, max_tokens: int) -> dict:
    engine = Engine(config)
    try:
        started = time.perf_counter()
        request = ChatRequest(messages=({"role": "user", "content": PROMPT},))
        completion = engine.complete(request, GenerationParams(max_tokens=max_tokens),
                                     model=name)
        total = time.perf_counter() - started
    finally:
        engine.close()
    timings = completion.timings
    return {"load_s": round(timings.load_s, 3),
            "first_token_s": round(timings.first_token_s or 0.0, 3),
            "total_s": round(total, 3), "tokens": completion.usage.completion_tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    build_llama_server(report=lambda m: print(m, file=sys.stderr))
    in_process = load_config(None)
    served = plan(in_process, "auto")
    ways = {"in process": in_process, "llama_server": served.config}
    results: dict[str, dict[str, list[dict]]] = {}
    for number in range(1, args.rounds + 1):
        for name in in_process.models:
            for way, config in ways.items():
                figures = one(config, name, args.max_tokens)
                results.setdefault(name, {}).setdefault(way, []).append(figures)
                print(f"round {number}: {name:8} {way:13} {figures}", file=sys.stderr)
    summary = {name: {way: {key: statistics.median(r[key] for r in runs)
                            for key in ("load_s", "first_token_s", "total_s")}
                      for way, runs in by_way.items()}
               for name, by_way in results.items()}
    if args.json:
        print(json.dumps({"rounds": results, "median": summary}, indent=2))
        return 0
    print(f"one request of {args.max_tokens} tokens on a fresh engine, median of "
          f"{args.rounds} rounds")
    print(f"{'model':10}{'way':15}{'load s':>9}{'first token s':>15}{'total s':>10}")
    for name, by_way in summary.items():
        for way, figures in by_way.items():
            print(f"{name:10}{way:15}{figures['load_s']:>9.3f}{figures['first_token_s']:>15.3f}"
                  f"{figures['total_s']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
