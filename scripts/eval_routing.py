"""Run the routing evaluation (or calibration) from the command line, until `sarai-router eval`
wires the same functions into the CLI.

    python scripts/eval_routing.py eval/routing-test.jsonl                 # eval/eval.toml
    python scripts/eval_routing.py FILE.jsonl --config my.toml --json
    python scripts/eval_routing.py eval/routing-dev.jsonl --calibrate [--target latency] \
        [--plot curve.png]
    python scripts/eval_routing.py FILE.jsonl --bench-report bench.json  # measured tok/s, RAM

Exit status: 0, or 2 with a one-line error for a bad case file or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sarai_router.config import ConfigError, load_config  # noqa: E402
from sarai_router.evaluation import (  # noqa: E402
    CaseError,
    calibrate,
    evaluate,
    load_cases,
    model_costs,
    render_calibration,
    render_plot,
    render_text,
)
from sarai_router.router import Router  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, help="JSONL case file")
    parser.add_argument("--config", default=str(ROOT / "eval" / "eval.toml"))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--calibrate", action="store_true",
                        help="sweep empathy_threshold x max_chars and pick one")
    parser.add_argument("--target", choices=("accuracy", "latency"), default="accuracy")
    parser.add_argument("--min-accuracy", type=float, default=0.95,
                        help="with --target latency: the accuracy a setting must keep")
    parser.add_argument("--plot", type=Path, help="with --calibrate: write the curve as a PNG")
    parser.add_argument("--bench-report", type=Path,
                        help="a `sarai-router bench --json` report: use its measured figures")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
        cases = load_cases(args.cases, config.models)
        bench = json.loads(args.bench_report.read_text()) if args.bench_report else None
    except (ConfigError, CaseError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"Error: {args.bench_report}: {exc}", file=sys.stderr)
        return 2
    costs = model_costs(config, bench)
    if args.calibrate:
        result = calibrate(config, cases, target=args.target, min_accuracy=args.min_accuracy,
                           costs=costs)
        print(json.dumps(result, indent=2) if args.json else render_calibration(result))
        if args.plot:
            render_plot(result["curve"], args.plot)
        return 0
    report = evaluate(Router(config), cases, config=config, costs=costs)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
