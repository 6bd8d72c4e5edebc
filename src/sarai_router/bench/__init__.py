"""``sarai-router bench``: the field report's study on the configured models, and the
router's own cost (``study``), rendered as text, markdown or a plot (``reports``)."""

from .machine import mean, percentile
from .reports import render_markdown, render_plot, render_text
from .settings import (BUILTIN_MIX, BUILTIN_QUERIES, BenchError, BenchSettings, Targets,
                       parse_range, read_mix)
from .study import direct_peer, measure_decisions, overhead_model, planned_steps, run_bench

__all__ = ["BUILTIN_MIX", "BUILTIN_QUERIES", "BenchError", "BenchSettings", "Targets",
           "direct_peer", "measure_decisions", "mean", "overhead_model", "parse_range",
           "percentile", "planned_steps", "read_mix", "render_markdown", "render_plot",
           "render_text", "run_bench"]
