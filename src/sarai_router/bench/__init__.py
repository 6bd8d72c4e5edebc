"""``sarai-router bench``: the field report's study on the configured models, and the
router's own cost (``study``), rendered as text, markdown or a plot (``reports``)."""

from .reports import render_markdown, render_plot, render_text
from .study import (BUILTIN_MIX, BUILTIN_QUERIES, BenchError, BenchSettings, Targets,
                    direct_peer, measure_decisions, mean, overhead_model, parse_range,
                    percentile, planned_steps, read_mix, run_bench)

__all__ = ["BUILTIN_MIX", "BUILTIN_QUERIES", "BenchError", "BenchSettings", "Targets",
           "direct_peer", "measure_decisions", "mean", "overhead_model", "parse_range",
           "percentile", "planned_steps", "read_mix", "render_markdown", "render_plot",
           "render_text", "run_bench"]
