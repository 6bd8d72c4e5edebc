"""``eval``'s reports: the text report, the calibration curve, and its plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence


def render_text(report: Mapping[str, Any], *, max_misses: int | None = None) -> str:
    """A report for people: accuracy, precision/recall per model, confusion, groups, misses,
    cost."""
    lines = [f"accuracy: {report['accuracy']:.1%} ({report['correct']}/{report['cases']})", ""]
    models = report["models"]
    lines.append(_grid(["model", "expected", "chosen", "precision", "recall"],
                       [[m, r["expected"], r["chosen"], _pct(r["precision"]), _pct(r["recall"])]
                        for m, r in models.items()]))
    chosen_cols = sorted({c for row in report["confusion"].values() for c in row})
    lines += ["", "confusion (rows: expected, columns: chosen)",
              _grid(["expected \\ chosen", *chosen_cols],
                    [[e, *(row.get(c, 0) for c in chosen_cols)]
                     for e, row in report["confusion"].items()])]
    for key, title in (("by_kind", "kind"), ("by_lang", "lang")):
        table = report.get(key) or {}
        if len(table) > 1 or (table and "-" not in table):
            lines += ["", _grid([title, "cases", "right", "accuracy"],
                                [[k, v["cases"], v["correct"], _pct(v["accuracy"])]
                                 for k, v in table.items()])]
    misses = report["misses"]
    lines += ["", f"misses: {len(misses)}"]
    for miss in misses[:max_misses] if max_misses is not None else misses:
        prompt = miss["prompt"].replace("\n", " ")
        prompt = prompt if len(prompt) <= 90 else prompt[:87] + "..."
        score = ("" if miss.get("empathy") is None or "empathy" in miss["reason"]
                 else f"; empathy {miss['empathy']:.2f}")
        lines.append(f"  line {miss['line']}: expected {miss['expected']}, chose "
                     f"{miss['chosen']} ({miss['plugin']}: {miss['reason']}{score})")
        lines.append(f"    {prompt!r}")
    if max_misses is not None and len(misses) > max_misses:
        lines.append(f"  ... {len(misses) - max_misses} more (--json has them all)")
    cost = report.get("cost")
    if cost and "routed" in cost:
        lines += ["", f"estimated cost (local units; {cost['reply_tokens']} reply tokens a "
                  "request, back-to-back replay in file order):"]
        rows = []
        for label, row in cost.items():
            if isinstance(row, dict) and "requests" in row:
                loads = ", ".join(f"{m} {n}" for m, n in row["cold_loads"].items()) or "none"
                rows.append([label, row["mean_latency_s"], row["total_s"], loads,
                             row["ram_gb_s"]])
        lines.append(_grid(["strategy", "mean latency s", "total s", "cold loads", "RAM GB·s"],
                           rows))
        sources = {c["source"] for c in cost["models"].values()}
        lines.append("  model figures: " + "; ".join(
            f"{m} {c['tokens_per_second']:.1f} tok/s, load {c['load_s']:.2f} s, "
            f"{c['ram_mb']:.0f} MB" for m, c in cost["models"].items())
            + f" ({', '.join(sorted(sources))})")
    elif cost:
        lines += ["", f"estimated cost: unavailable ({cost.get('note')})"]
    residency = report.get("residency")
    if residency:
        options = ", ".join(f"{k} {v}" for k, v in residency["settings"].items())
        lines += ["", f"routing that knows what is loaded ({options}) against both off, "
                  "same replay:"]
        rows = []
        for label in ("with", "without"):
            row = residency[label]
            loads = ", ".join(f"{m} {n}" for m, n in (row["cold_loads"] or {}).items()) or "none"
            rows.append([label, _pct(row["accuracy"]), loads, row["mean_latency_s"],
                         row["total_s"]])
        lines.append(_grid(["", "accuracy", "cold loads", "mean latency s", "total s"], rows))
    return "\n".join(lines)


def render_calibration(result: Mapping[str, Any]) -> str:
    curve = result["curve"]
    models = sorted({m for row in curve for m in row["share"]})
    rows = [[r["empathy_threshold"], r["max_chars"], _pct(r["accuracy"]),
             *(_pct(r["share"][m]) for m in models), r["mean_latency_s"]] for r in curve]
    best = result["best"]
    target = result["target"] + (f" (accuracy >= {result['min_accuracy']:.0%})"
                                 if result["target"] == "latency" else "")
    latency = ("" if best["mean_latency_s"] is None
               else f", estimated mean latency {best['mean_latency_s']} s")
    current = result["current"]
    return "\n".join([
        _grid(["threshold", "max_chars", "accuracy", *(f"to {m}" for m in models),
               "mean latency s"], rows),
        "",
        f"target: {target}; best of {len(curve)} settings on {result['cases']} cases: "
        f"empathy_threshold {best['empathy_threshold']}, max_chars {best['max_chars']} "
        f"-> accuracy {best['accuracy']:.1%}{latency} "
        f"(current: {current['empathy_threshold']}, {current['max_chars']})",
        "",
        result["toml"].rstrip(),
    ])


def render_plot(curve: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Accuracy against the threshold, one line per ``max_chars``; and latency against
    accuracy. Needs matplotlib (``pip install 'sarai-router[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'sarai-router[bench]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for chars in sorted({r["max_chars"] for r in curve}):
        rows = sorted((r for r in curve if r["max_chars"] == chars),
                      key=lambda r: r["empathy_threshold"])
        left.plot([r["empathy_threshold"] for r in rows], [r["accuracy"] for r in rows],
                  marker=".", label=f"max_chars {chars}")
        if all(r["mean_latency_s"] is not None for r in rows):
            right.plot([r["mean_latency_s"] for r in rows], [r["accuracy"] for r in rows],
                       marker=".", label=f"max_chars {chars}")
    left.set_xlabel("empathy_threshold")
    left.set_ylabel("accuracy")
    left.set_title("accuracy vs threshold")
    left.legend(fontsize=7)
    right.set_xlabel("estimated mean latency per request (s)")
    right.set_ylabel("accuracy")
    right.set_title("accuracy vs latency")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _grid(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    table = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in table)
