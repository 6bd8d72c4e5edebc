"""The bench report as a terminal table, markdown, or a PNG plot (matplotlib, optional)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

# -- renderers ----------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    return [list(map(str, headers))] + [[_cell(c) for c in row] for row in rows]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _tables(report: Mapping[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """Every table of the report as (title, rows with a header row first)."""
    out: list[tuple[str, list[list[str]]]] = []
    models = report["models"]
    n = len(report["settings"]["queries"])
    qs = [f"Q{i + 1}" for i in range(n)]
    per_query_tables = (("Throughput (tok/s)", "tokens_per_second", "mean_tokens_per_second"),
                        ("Latency (s)", "latency_s", "mean_latency_s"),
                        ("Time to first token (s)", "ttft_s", "mean_ttft_s"))
    # `bench --audio-only` measures no chat model on its own.
    for title, key, mean_key in per_query_tables if models else ():
        rows = []
        for name, m in models.items():
            values = {q["query"]: q[key] for q in m["per_query"]}
            rows.append([name] + [values.get(i) for i in range(n)] + [m[mean_key]])
        out.append((title, _table(["model", *qs, "mean"], rows)))
    rows = [[name, m["mean_tokens_per_second"], m["speedup"], m["mean_tokens"],
             m["p50_latency_s"], m["memory"]["load_s"], m["memory"]["load_delta_mb"],
             m["memory"].get("rss_after_unload_mb")] for name, m in models.items()]
    if rows:
        out.append(("Per model", _table(["model", "tok/s", "speedup", "tokens", "P50 s",
                                         "load s", "RSS +MB at load", "RSS MB after unload"],
                                        rows)))
    dual = report.get("dual")
    if dual:
        rows = []
        for label, key in ((f"routed ({dual['mix']} mix)", "routed"),
                           (f"all to {dual['baseline_model']}", "single")):
            s = dual[key]
            share = ", ".join(f"{m} {v:.0%}" for m, v in s["share"].items())
            rows.append([label, s["mean_latency_s"], s["p50_latency_s"], s["p95_latency_s"],
                         s["tokens_per_second"], s["mean_ttft_s"], share])
        out.append((f"Dual strategy (latency x{_cell(dual['latency_speedup'])}, "
                    f"throughput x{_cell(dual['throughput_speedup'])})",
                    _table(["strategy", "mean s", "P50 s", "P95 s", "tok/s", "TTFT s", "share"],
                           rows)))
    residency = (dual or {}).get("residency") or {}
    if "with" in residency:
        options = ", ".join(f"{k} {v}" for k, v in residency["settings"].items())
        cache = residency["cache"]
        rows = []
        for label in ("with", "without"):
            r = residency[label]
            loads = ", ".join(f"{m} {n}" for m, n in r["load_events"].items()) or "none"
            rows.append([label, loads, r["load_s"], r["mean_latency_s"], r["p50_latency_s"],
                         r["p95_latency_s"]])
        out.append((f"Routing that knows what is loaded ({options}; max_loaded "
                    f"{cache['max_loaded']}, pinned: {', '.join(cache['pinned']) or 'none'}); "
                    "latency includes loads",
                    _table(["arm", "load events", "load s", "mean s", "P50 s", "P95 s"], rows)))
    overhead = report.get("overhead")
    if overhead and "arms" in overhead:
        rows = [[arm, s["tokens_per_second"], s["median_ttft_s"], s["tokens"], s["seconds"]]
                for arm, s in overhead["arms"].items()]
        out.append((f"Router overhead on {overhead['model']} ({overhead['rounds']} interleaved "
                    f"rounds): ratio {_cell(overhead['ratio'])}, TTFT "
                    f"{_cell(overhead['ttft_diff_ms'])} ms, logits-processor ratio "
                    f"{_cell(overhead['logits_processor_ratio'])}",
                    _table(["arm", "tok/s", "median TTFT s", "tokens", "seconds"], rows)))
    speech = report.get("speech")
    if speech:
        rows = [[c["clip"], c["duration_s"], c["language"], c["mean_transcribe_s"],
                 c["real_time_factor"], c["model"], c["mean_generation_s"],
                 c["tokens_per_second"], c["text"]] for c in speech["clips"]]
        s = speech["settings"]
        out.append((f"Speech to text ({speech['plugin']}: model {s.get('model')}, "
                    f"{s.get('compute_type')}, threads {s.get('threads') or 'all'}; load "
                    f"{_cell(speech['load_s'])} s; real-time factor "
                    f"{_cell(speech['real_time_factor'])})",
                    _table(["clip", "audio s", "lang", "transcribe s", "RTF", "routed to",
                            "generation s", "tok/s", "transcript"], rows)))
    decision = report["decision"]
    rows = [[label, d["chars"], d["decisions_per_second"], d["p50_us"], d["p99_us"],
             d.get("wall_p99_us"), d["model"]]
            for label, d in ((k, decision[k]) for k in ("short", "long"))]
    out.append(("Routing decision cost (no model loaded; CPU time)",
                _table(["input", "chars", "decisions/s", "p50 µs", "p99 µs", "wall p99 µs",
                        "routed to"], rows)))
    mem = report["memory"]
    out.append(("Memory", _table(["RSS at start MB", "peak RSS MB", "RSS at end MB"],
                                 [[mem["rss_at_start_mb"], mem["peak_rss_mb"],
                                   mem["rss_at_end_mb"]]])))
    rows = [[k["kpi"], k["value"], k["target"], ("met" if k["met"] else "NOT met")
             + (f" ({k['note']})" if k["note"] else "")] for k in report["kpis"]]
    out.append(("KPIs", _table(["KPI", "value", "target", "status"], rows)))
    return out


def render_text(report: Mapping[str, Any]) -> str:
    lines = [_machine_line(report), ""]
    for i, query in enumerate(report["settings"]["queries"]):
        lines.append(f"  Q{i + 1}: {query}")
    for title, rows in _tables(report):
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines += ["", title]
        for j, row in enumerate(rows):
            lines.append("  " + "  ".join(c.rjust(w) if j and k else c.ljust(w)
                                          for k, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _machine_line(report: Mapping[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    return (f"{m['cpu_model']}, {m['logical_cores']} cores, llama-cpp-python "
            f"{m['llama_cpp_python']}, load average {m['load_average_start']} -> "
            f"{m.get('load_average_end')}; {len(s['queries'])} queries x {s['iterations']} "
            f"iterations, max_tokens {s['max_tokens']}, seed {s['seed']}; "
            f"{report['elapsed_s']} s")


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = ["# sarai-router bench", "", _machine_line(report), ""]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    for name, info in report["model_files"].items():
        lines.append(f"- `{name}`: `{info['file']}` ({info['size_mb']} MB, n_ctx {info['n_ctx']}, "
                     f"{info['n_threads']} threads)")
    lines.append("")
    for i, query in enumerate(report["settings"]["queries"]):
        lines.append(f"- Q{i + 1}: {query}")
    for title, rows in _tables(report):
        lines += ["", f"### {title}", "", "| " + " | ".join(rows[0]) + " |",
                  "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def render_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    names = list(models)
    n = len(report["settings"]["queries"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(1, len(names))
    for ax, key, title in ((axes[0], "tokens_per_second", "Throughput per query (tok/s)"),
                           (axes[1], "latency_s", "Latency per query (s)")):
        for j, name in enumerate(names):
            values = {q["query"]: q[key] for q in models[name]["per_query"]}
            xs = [i + j * width for i in range(n)]
            ax.bar(xs, [values.get(i, 0) for i in range(n)], width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(n)])
        ax.set_xticklabels([f"Q{i + 1}" for i in range(n)])
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    dual = report.get("dual")
    if dual:
        stats = ("mean_latency_s", "p50_latency_s", "p95_latency_s")
        for j, (key, label) in enumerate((("routed", "routed"),
                                          ("single", f"all to {dual['baseline_model']}"))):
            ax.bar([i + j * 0.4 for i in range(3)], [dual[key][s] for s in stats], 0.4,
                   label=f"{label}: {dual[key]['tokens_per_second']:.1f} tok/s")
        ax.set_xticks([i + 0.2 for i in range(3)])
        ax.set_xticklabels(["mean", "P50", "P95"])
        ax.set_title(f"Routed vs one model: latency (s), x{dual['latency_speedup']}")
        ax.legend()
    else:
        ax.set_axis_off()
    m = report["machine"]
    fig.suptitle(f"sarai-router bench: {m['cpu_model']}, {m['logical_cores']} cores, "
                 f"max_tokens {report['settings']['max_tokens']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
