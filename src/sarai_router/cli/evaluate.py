"""``eval``: measure routing on a labelled JSONL file, or choose the heuristic's thresholds.

Loads no model: every case goes through the same Router as ``route``, and the cost estimate
reads the model files' sizes and headers (or a ``bench --json`` report). See eval/README.md
for the case format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import SaraiError
from .common import EXIT_USAGE, AppContext, CliError, cli_error, emit_json, json_option


@click.command("eval")
@click.argument("cases_file", metavar="FILE.jsonl", type=click.Path(dir_okay=False))
@json_option
@click.option("--calibrate", is_flag=True,
              help="Sweep [plugins.heuristic] empathy_threshold x max_chars on FILE and print "
                   "the curve, the best setting and the TOML snippet to paste.")
@click.option("--target", type=click.Choice(["accuracy", "latency"]),
              help="With --calibrate: pick the most accurate setting (default), or the lowest "
                   "estimated latency that keeps --min-accuracy.")
@click.option("--min-accuracy", type=click.FloatRange(0.0, 1.0), default=None,
              help="With --target latency: the accuracy a setting must keep (default 0.95).")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True),
              help="With --calibrate: also write the curve as a PNG to FILE (needs "
                   "matplotlib: pip install 'sarai-router[bench]').")
@click.option("--bench-report", "bench_file", type=click.Path(dir_okay=False),
              help="A `sarai-router bench --json` report: cost from its measured tok/s, load "
                   "time and RAM instead of the estimate from the model files.")
@click.option("--reply-tokens", type=click.IntRange(min=1), default=100, show_default=True,
              help="Tokens each answer is assumed to have in the cost estimate.")
@click.pass_obj
def evaluate(app: AppContext, cases_file: str, as_json: bool, calibrate: bool,
             target: str | None, min_accuracy: float | None, plot_file: str | None,
             bench_file: str | None, reply_tokens: int) -> None:
    """Route every case of FILE.jsonl and compare with its label (loads no model).

    \b
    A case is one JSON object a line: {"prompt": "...", "expect": "MODEL"}, optionally
    with "images": [paths], "audio": path, or "messages": [...] in place of "prompt";
    "conversation": ID chains cases into one conversation's turns (for sticky_turns).
    Prints the accuracy, precision and recall per expected model, the confusion matrix,
    every miss with the plugin and reason that decided it, and an estimated cost (latency
    with cold loads, RAM-GB*s) against sending everything to each single model.
    """
    from .. import evaluation as ev
    from ..router import Router

    for flag, value in (("--target", target), ("--min-accuracy", min_accuracy),
                        ("--plot", plot_file)):
        if value is not None and not calibrate:
            raise CliError(f"{flag} applies to --calibrate", EXIT_USAGE)
    if min_accuracy is not None and target != "latency":
        raise CliError("--min-accuracy applies to --target latency", EXIT_USAGE)
    if plot_file:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'sarai-router[bench]' "
                           "(or matplotlib)", EXIT_USAGE) from None
    config = app.config()
    bench_report = _read_bench_report(bench_file) if bench_file else None
    try:
        cases = ev.load_cases(cases_file, config.models)
        costs = ev.model_costs(config, bench_report)
        if calibrate:
            result = ev.calibrate(config, cases, target=target or "accuracy",
                                  min_accuracy=0.95 if min_accuracy is None else min_accuracy,
                                  costs=costs, reply_tokens=reply_tokens)
        else:
            report = ev.evaluate(Router(config), cases, config=config, costs=costs,
                                 reply_tokens=reply_tokens)
    except ev.CaseError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except SaraiError as exc:
        raise cli_error(exc) from None
    if not calibrate:
        if as_json:
            emit_json(report)
        else:
            click.echo(ev.render_text(report))
        return
    if plot_file:
        try:
            ev.render_plot(result["curve"], plot_file)
        except OSError as exc:
            raise CliError(f"--plot: cannot write {plot_file}: {exc.strerror or exc}") from None
    if as_json:
        emit_json(result)
    else:
        click.echo(ev.render_calibration(result))
        if plot_file:
            click.echo(click.style(f"plot written to {plot_file}", dim=True), err=True)


def _read_bench_report(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--bench-report: {path}: file not found", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"--bench-report: cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"--bench-report: {path} is not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise CliError(f"--bench-report: {path} is not a `sarai-router bench --json` report "
                       "(expected an object with \"models\")", EXIT_USAGE)
    return data


__all__ = ["evaluate"]
