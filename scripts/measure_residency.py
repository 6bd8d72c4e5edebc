"""Measure the heuristic's ``borderline_margin`` and ``sticky_turns`` with ``eval``'s replay.

    python scripts/measure_residency.py [eval/routing-conversations.jsonl] [--field-costs]

For each memory setting (eval/eval.toml as is: fast pinned, both fit; and one model at a
time: ``max_loaded = 1``, nothing pinned) and each option value, the cases are routed in
file order on the simulated pool (what ``sarai-router eval`` does) and the table shows
accuracy against the per-turn labels, cold loads and the estimated latency. The model
figures are the GGUF-header estimates of the default models, or with ``--field-costs`` the
field report's 3B/7B pair (8.9 and 4.3 tok/s; 2.2 and 4.8 GB loading at
``COLD_LOAD_MB_PER_S``), where a load costs more next to a generation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sarai_router.loading import load_config  # noqa: E402
from sarai_router.evaluation import (ModelCost, evaluate, load_cases, model_costs,  # noqa: E402
                                     with_heuristic)
from sarai_router.router import Router  # noqa: E402
from sarai_router.types import COLD_LOAD_MB_PER_S  # noqa: E402

OPTIONS = ({}, {"borderline_margin": 0.05}, {"borderline_margin": 0.1},
           {"borderline_margin": 0.15}, {"sticky_turns": 1}, {"sticky_turns": 2},
           {"sticky_turns": 3}, {"borderline_margin": 0.1, "sticky_turns": 1})


def one_at_a_time(config):
    models = {name: attrs.evolve(spec, pinned=False) for name, spec in config.models.items()}
    return attrs.evolve(config, cache=attrs.evolve(config.cache, max_loaded=1), models=models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="?", type=Path,
                        default=ROOT / "eval" / "routing-conversations.jsonl")
    parser.add_argument("--config", type=Path, default=ROOT / "eval" / "eval.toml")
    parser.add_argument("--field-costs", action="store_true")
    args = parser.parse_args()
    base = load_config(args.config)
    cases = load_cases(args.cases, base.models)
    costs = model_costs(base)
    if args.field_costs:
        costs = {"fast": ModelCost(8.9, 2200 / COLD_LOAD_MB_PER_S, 2200, "field report"),
                 "quality": ModelCost(4.3, 4800 / COLD_LOAD_MB_PER_S, 4800, "field report")}
    print(f"{args.cases.name}: {len(cases)} cases; model figures: " + "; ".join(
        f"{m} {c.tokens_per_second:.1f} tok/s, load {c.load_s:.2f} s" for m, c in costs.items()))
    for label, config in (("both fit (eval.toml)", base),
                          ("one model at a time (max_loaded 1)", one_at_a_time(base))):
        print(f"\n{label}")
        print("| options | accuracy | cold loads | mean latency s | total s |")
        print("|---|---|---|---|---|")
        for options in OPTIONS:
            trial = with_heuristic(config, **{"borderline_margin": 0.0, "sticky_turns": 0,
                                              **options})
            report = evaluate(Router(trial), cases, config=trial, costs=costs, compare=False)
            routed = report["cost"]["routed"]
            loads = sum(routed["cold_loads"].values())
            name = ", ".join(f"{k} {v}" for k, v in options.items()) or "off"
            print(f"| {name} | {report['accuracy']:.1%} | {loads} | "
                  f"{routed['mean_latency_s']:.3f} | {routed['total_s']} |")


if __name__ == "__main__":
    main()
