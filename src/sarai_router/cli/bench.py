"""``sarai-router bench``: the field report's study on the configured models, and the router's cost."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import AttachmentError, SaraiError
from ..types import read_attachment
from .common import (EXIT_INTERRUPTED, EXIT_USAGE, TEXT, AppContext, CliError, check_model_names,
                     cli_error, emit_json, progressbar, say)


def _range_option(value: str | None, param: click.Parameter) -> tuple[float, float | None] | None:
    from ..bench import parse_range

    if value is None:
        return None
    try:
        return parse_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _range_callback(ctx: click.Context, param: click.Parameter, value: str | None):
    return _range_option(value, param)


@click.command()
@click.argument("models", nargs=-1, type=TEXT)
@click.option("--query", "queries", multiple=True, type=TEXT,
              help="A query of the study (repeatable); replaces the 5 built-in ones.")
@click.option("--queries", "n_queries", type=click.IntRange(min=1),
              help="Use only the first N queries (built-in or given).")
@click.option("--iterations", type=click.IntRange(min=1), default=3, show_default=True,
              help="Times each query runs per model (after one warm-up that is not counted).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=100, show_default=True,
              help="Tokens per answer, fixed for every model.")
@click.option("--seed", type=int, default=42, show_default=True, help="Sampling seed, so runs compare.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True)
@click.option("--mix", "mix_file", type=click.Path(exists=True, dir_okay=False),
              help="Traffic mix for the dual strategy: JSONL, one prompt a line "
                   '("text" or {"prompt": "text"}). Default: 10 built-in prompts.')
@click.option("--mix-iterations", type=click.IntRange(min=1), default=1, show_default=True,
              help="Times the mix is replayed.")
@click.option("--baseline", "baseline_model", type=TEXT,
              help="The dual strategy's one-model baseline (default: the slowest model measured).")
@click.option("--overhead-model", type=TEXT,
              help="Model for the router-vs-direct overhead test (default: the first llama_cpp one).")
@click.option("--no-overhead", is_flag=True, help="Skip the router overhead test.")
@click.option("--no-dual", is_flag=True, help="Skip the dual strategy (routed vs one model).")
@click.option("--no-warmup", is_flag=True, help="Count the first generation too.")
@click.option("--audio", "audio_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A speech clip (repeatable): time its transcription (real-time factor) "
                   "and the routed answer.")
@click.option("--audio-only", is_flag=True,
              help="With --audio: only the speech section (and the decision cost).")
@click.option("--decision-seconds", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, help="Time spent timing routing decisions, per input size.")
@click.option("--target-tps", callback=_range_callback,
              help="Fast model throughput target, e.g. 7-15 (default: [bench] config).")
@click.option("--target-speedup", callback=_range_callback,
              help="Speedup of the fastest vs the slowest model, e.g. 2-2.5.")
@click.option("--target-p50", type=click.FloatRange(min=0.0, min_open=True),
              help="P50 latency target in seconds for routed traffic.")
@click.option("--target-ram-mb", type=click.FloatRange(min=0.0, min_open=True),
              help="Peak RSS target in MB.")
@click.option("--target-overhead", type=click.FloatRange(min=0.0, max=10.0),
              help="Minimum router/direct tok/s ratio, e.g. 0.98.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every figure.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False, writable=True),
              help="Also write the report as markdown to FILE.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True),
              help="Also write a PNG plot to FILE (needs matplotlib: pip install 'sarai-router[bench]').")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.pass_obj
def bench(app: AppContext, models: tuple[str, ...], queries: tuple[str, ...],
          n_queries: int | None, iterations: int, max_tokens: int, seed: int,
          temperature: float, mix_file: str | None, mix_iterations: int,
          baseline_model: str | None, overhead_model: str | None, no_overhead: bool,
          no_dual: bool, no_warmup: bool, audio_files: tuple[str, ...], audio_only: bool,
          decision_seconds: float, target_tps, target_speedup, target_p50,
          target_ram_mb, target_overhead, as_json: bool, markdown_file: str | None,
          plot_file: str | None, no_progress: bool) -> None:
    """Benchmark MODELS (default: all configured): tok/s, latency, routing, overhead, memory;
    with --audio, speech to text too."""
    import attrs

    from ..bench import (BUILTIN_MIX, BUILTIN_QUERIES, BenchSettings, Targets, direct_peer,
                         planned_steps, read_mix, render_markdown, render_plot, render_text,
                         run_bench)
    from ..engine import Engine
    from ..evaluation import residency_settings

    config = app.config()
    if audio_only and not audio_files:
        raise CliError("--audio-only needs at least one --audio FILE", EXIT_USAGE)
    if audio_only and models:
        raise CliError("--audio-only benches no chat model on its own: drop MODELS",
                       EXIT_USAGE)
    try:
        audio = tuple((Path(f).name, read_attachment(Path(f), config.server.max_body_bytes))
                      for f in audio_files)
    except AttachmentError as exc:
        raise CliError(f"--audio {exc}", EXIT_USAGE) from None
    if audio_only:
        no_dual = no_overhead = True
    chosen = () if audio_only else models or tuple(config.models)
    for label, names in (("MODELS", chosen), ("--baseline", (baseline_model,)),
                         ("--overhead-model", (overhead_model,))):
        check_model_names(config, label, names)
    if overhead_model and overhead_model not in chosen:
        raise CliError(f"--overhead-model {overhead_model!r} is not among the benched models "
                       f"({', '.join(chosen)})", EXIT_USAGE)
    if overhead_model and direct_peer(config, overhead_model) is None:
        raise CliError(f"--overhead-model {overhead_model!r}: the overhead test compares "
                       "against the engine called directly, which its backend does not offer",
                       EXIT_USAGE)
    if plot_file:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'sarai-router[bench]' "
                           "(or matplotlib)", EXIT_USAGE) from None
    try:
        mix = read_mix(mix_file) if mix_file else BUILTIN_MIX
    except SaraiError as exc:
        raise CliError(f"--mix: {exc}", EXIT_USAGE) from None
    query_set = queries or BUILTIN_QUERIES
    if n_queries:
        query_set = query_set[:n_queries]

    targets = Targets.from_config(config.bench)
    if target_tps:
        targets = attrs.evolve(targets, tps_min=target_tps[0], tps_max=target_tps[1])
    if target_speedup:
        targets = attrs.evolve(targets, speedup_min=target_speedup[0],
                               speedup_max=target_speedup[1])
    for field, value in (("p50_seconds", target_p50), ("ram_mb", target_ram_mb),
                         ("overhead_ratio", target_overhead)):
        if value is not None:
            targets = attrs.evolve(targets, **{field: value})

    needed = set(chosen) | ({baseline_model} if baseline_model else set())
    presence = Engine(config, report=say, progressbar=progressbar)
    try:
        if not no_dual:
            needed |= {presence.route(_request(p)).model for p in mix}
        for name in sorted(needed):
            presence.ensure_present(name)
    except SaraiError as exc:
        raise cli_error(exc) from None
    finally:
        presence.close()

    settings = BenchSettings(
        models=chosen, queries=tuple(query_set), iterations=iterations, max_tokens=max_tokens,
        seed=seed, temperature=temperature, warmup=not no_warmup, mix=mix,
        mix_source=Path(mix_file).name if mix_file else "built-in",
        mix_iterations=mix_iterations, baseline_model=baseline_model,
        overhead_model=overhead_model, overhead=not no_overhead, dual=not no_dual,
        decision_seconds=decision_seconds, audio=audio,
        residency=any(residency_settings(config).values()),
        command="sarai-router " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name == "sarai-router" else "",
    )
    bar = None
    if not no_progress:
        bar = click.progressbar(length=planned_steps(settings), label="benchmarking",
                                file=sys.stderr, show_pos=True)
        bar.__enter__()
    try:
        report = run_bench(config, settings, targets,
                           progress=bar.update if bar is not None else (lambda n: None))
    except SaraiError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        raise CliError("interrupted", EXIT_INTERRUPTED) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if markdown_file:
        Path(markdown_file).write_text(render_markdown(report), encoding="utf-8")
    if plot_file:
        render_plot(report, plot_file)
    if as_json:
        emit_json(report)
    else:
        click.echo(render_text(report))
        for label, written in (("markdown", markdown_file), ("plot", plot_file)):
            if written:
                click.echo(click.style(f"{label} written to {written}", dim=True), err=True)


def _request(prompt: str):
    from ..types import ChatRequest

    return ChatRequest.from_prompt(prompt)


@click.command("bench-concurrency")
@click.argument("model")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
              help="Streams at once.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1),
              help="Requests in all (default: 4 x concurrency).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--prompt", default="Escribe un párrafo sobre el mar.", show_default=True)
@click.option("--pairs", type=click.IntRange(min=0), default=40, show_default=True,
              help="Paired one-at-a-time requests, router vs direct, for the proxy overhead "
                   "(0: skip).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Rounds, alternating router and direct first; the figures add them up.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def bench_concurrency(app: AppContext, model: str, concurrency: int, n_requests: int | None,
                      max_tokens: int, prompt: str, pairs: int, rounds: int,
                      as_json: bool) -> None:
    """N concurrent streams through `serve` (a child process) vs the engine directly."""
    from ..bench.concurrency import format_concurrency, run_concurrency

    config = app.config()
    check_model_names(config, "MODEL", (model,))
    try:
        result = run_concurrency(config, app.config_path, model, concurrency=concurrency,
                                 requests=n_requests or 4 * concurrency,
                                 max_tokens=max_tokens, prompt=prompt, pairs=pairs,
                                 rounds=rounds, report=say)
    except SaraiError as exc:
        raise cli_error(exc) from None
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        raise CliError("interrupted", EXIT_INTERRUPTED) from None
    if as_json:
        emit_json(result)
    else:
        click.echo(format_concurrency(result))
