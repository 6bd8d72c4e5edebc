"""Routing decision cost per call, wall time and CPU time, on `sarai-router bench`'s inputs.

    python scripts/decision_cost.py [--seconds 2] [--rounds 3] [--config FILE]

`bench.measure_decisions` times each decision by the wall clock (``perf_counter_ns``); on a
shared machine its p99 is mostly the scheduler (a decision preempted for a few ms). This
script times the same decisions (the bench's 79-character query and its 2,000-character
input, every default plugin, no model) by both the wall clock and the thread's CPU clock
(``thread_time_ns``), which a preemption does not inflate, and prints p50/p99 of each, best
round of ``--rounds``, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sarai_router.bench import BUILTIN_QUERIES, measure_decisions, percentile  # noqa: E402
from sarai_router.bench.settings import LONG_INPUT_CHARS  # noqa: E402
from sarai_router.loading import load_config  # noqa: E402
from sarai_router.router import Router  # noqa: E402
from sarai_router.types import ChatRequest  # noqa: E402


def inputs() -> dict[str, str]:
    # the same two inputs as bench.measure_decisions
    sentence = "Necesito ayuda con una pregunta larga sobre mi trabajo y mis planes. "
    long_text = (sentence * (LONG_INPUT_CHARS // len(sentence) + 1))[:LONG_INPUT_CHARS]
    return {"short": BUILTIN_QUERIES[0], "long": long_text}


def one_round(router: Router, text: str, seconds: float) -> dict[str, float]:
    request = ChatRequest.from_prompt(text)
    for _ in range(50):
        router.route(request)
    wall, cpu = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall) < 200:
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        router.route(request)
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        wall.append((w1 - w0) / 1000.0)
        cpu.append((c1 - c0) / 1000.0)
    return {"decisions": len(wall),
            "wall_p50_us": round(percentile(wall, 50), 1),
            "wall_p99_us": round(percentile(wall, 99), 1),
            "cpu_p50_us": round(percentile(cpu, 50), 1),
            "cpu_p99_us": round(percentile(cpu, 99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config")
    args = parser.parse_args()
    config = load_config(args.config)
    router = Router(config)
    out: dict = {"load_average_start": os.getloadavg()}
    for label, text in inputs().items():
        rounds = [one_round(router, text, args.seconds) for _ in range(args.rounds)]
        best = min(rounds, key=lambda r: r["wall_p99_us"])
        model = router.route(ChatRequest.from_prompt(text)).model
        out[label] = {"chars": len(text), "model": model, "best_round": best,
                      "cpu_p99_us_each_round": [r["cpu_p99_us"] for r in rounds]}
    bench = measure_decisions(config, args.seconds)
    out["bench.measure_decisions"] = {k: {"p50_us": v["p50_us"], "p99_us": v["p99_us"]}
                                      for k, v in bench.items() if isinstance(v, dict)}
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
