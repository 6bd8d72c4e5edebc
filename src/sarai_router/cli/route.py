"""``route`` (explain a decision, loads no model) and ``query`` (route and answer)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import SaraiError
from .common import (EXIT_INTERRUPTED, EXIT_USAGE, TEXT, AppContext, CliError, audio_option,
                     cli_error, dim, emit_json, image_option, json_option, progressbar,
                     request_from_options, say, transcript_line)


@click.command()
@click.argument("prompt", required=False, default="", type=TEXT)
@image_option
@audio_option
@json_option
@click.pass_obj
def route(app: AppContext, prompt: str, images: tuple[str, ...], audio: str | None,
          as_json: bool) -> None:
    """Explain the routing decision for PROMPT (loads no chat model).

    With --audio that no model takes, the clip is transcribed first (the speech model
    loads) and the decision is made on what was said, as `query` does.
    """
    request = request_from_options(prompt, images, audio, app.config())
    try:
        if request.audio is None:
            from ..events import begin_request
            from ..router import Router

            router = Router(app.config())
            begin_request()
            decision = router.route(request)
        else:
            from ..engine import Engine

            engine = Engine(app.config(), report=say, progressbar=progressbar)
            router = engine.router
            try:
                decision = engine.decide(request)
            finally:
                engine.close()
    except SaraiError as exc:
        raise cli_error(exc) from None
    if as_json:
        emit_json({**decision.to_dict(),
                   "fallback_chain": router.fallback_chain(decision.model),
                   "plugin_errors": list(router.hooks.errors)})
        return
    click.echo(f"model:   {decision.model}")
    click.echo(f"plugin:  {decision.plugin}")
    click.echo(f"reason:  {decision.reason}")
    if decision.transcript is not None:
        t = decision.transcript
        click.echo(f"audio:   {t.text!r} ({t.language or 'language unknown'}, "
                   f"{t.duration:.1f} s clip, transcribed in {t.seconds:.2f} s by {t.plugin})")
    signals = ", ".join(f"{k}={_fmt_signal(v)}" for k, v in decision.signals.items())
    click.echo(f"signals: {signals}")
    for warning in decision.warnings:
        click.echo(click.style(f"warning: {warning}", fg="yellow"))
    for error in router.hooks.errors:
        click.echo(click.style(f"plugin error: {error}", fg="red"), err=True)


def _say_route(decision) -> None:
    if decision.transcript is not None:
        click.echo(dim(transcript_line(decision.transcript)), err=True)
    click.echo(dim(decision.summary()), err=True)


def _fmt_signal(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


@click.command()
@click.argument("prompt", required=False, default="", type=TEXT)
@image_option
@audio_option
@click.option("--model", metavar="NAME", type=TEXT,
              help="Answer with this configured model, bypassing routing.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap the answer's length.")
@click.option("--temperature", type=click.FloatRange(min=0.0),
              help="Sampling temperature, 0 = greedy (default: the model's, see "
                   "`models list --json`).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.option("--no-stream", is_flag=True, help="Print the answer once it is complete.")
@json_option
@click.pass_obj
def query(app: AppContext, prompt: str, images: tuple[str, ...], audio: str | None,
          model: str | None, max_tokens: int | None, temperature: float | None, seed: int | None,
          no_stream: bool, as_json: bool) -> None:
    """Route PROMPT and stream the answer (model and reason on stderr).

    With --audio, PROMPT is optional: a clip the model can't take is transcribed, routed
    on what was said (plus PROMPT) and answered as text.
    """
    from ..backend import GenerationParams
    from ..engine import Completion, Engine

    engine = Engine(app.config(), report=say, progressbar=progressbar)
    request = request_from_options(prompt, images, audio, app.config())
    streaming = not (no_stream or as_json)
    printed = False
    try:
        # One-shot: nothing to pre-warm for; the process ends with this answer.
        decision = engine.prepare(
            request, model=model, prewarm=False,
            on_route=None if as_json else _say_route)
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        completion = Completion(decision=decision)
        for piece in engine.stream(request, decision, params, completion):
            if streaming:
                click.echo(piece, nl=False)
                sys.stdout.flush()
                printed = True
    except SaraiError as exc:
        if printed:
            click.echo()
        raise cli_error(exc) from None
    except KeyboardInterrupt:
        if printed:
            click.echo()
        raise CliError("interrupted", EXIT_INTERRUPTED) from None
    finally:
        engine.close()
    if as_json:
        emit_json(completion.to_dict())
        return
    if streaming:
        click.echo()
    else:
        click.echo(completion.text)
    data = completion.to_dict()
    t = data["timings"]
    first = "-" if t["first_token_s"] is None else f"{t['first_token_s']:.2f}s"
    answered = completion.decision  # another model if a fallback answered
    for step in answered.fallbacks:
        click.echo(dim(f"[{step.to_model}] fell back from {step.from_model} ({step.reason})"),
                   err=True)
    click.echo(dim(
        f"[{answered.model}] {data['usage']['completion_tokens']} tokens, "
        f"{t['tokens_per_second']:.1f} tok/s, first token {first}, load {t['load_s']:.2f}s, "
        f"total {t['total_s']:.2f}s"
        + ("; stopped: it kept repeating itself (runaway guard)"
           if completion.stopped_by == "runaway_guard" else "")
        + ("; stopped: it ran past its time limit"
           if completion.stopped_by == "time_limit" else "")), err=True)


__all__ = ["route", "query", "EXIT_USAGE"]
