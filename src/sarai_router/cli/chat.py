"""``sarai-router chat``: a multi-turn conversation in the terminal, routed turn by turn.

Each turn shows, dim on one line, the model that answers and why; the answer streams.
Models stay loaded between turns and the reaper unloads them by TTL while you idle.
Ctrl-C stops the current generation (the partial answer stays in the history), not the
session; Ctrl-D or ``/quit`` leaves.
"""

from __future__ import annotations

import queue
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from ..backend import GenerationParams
from ..config import Config
from ..errors import (AttachmentError, ContextLengthError, RoutingError, SaraiError,
                      not_configured)
if TYPE_CHECKING:  # the engine (asyncio, the pool) loads when a chat starts, not for `route`
    from ..engine import Engine
    from ..streaming import Generation

from ..types import AudioInput, ChatRequest, message_text, read_attachment
from .common import (TEXT, AppContext, cli_error, progressbar, say, transcript_line,
                     utf8_problem)

PROMPT = "you> "

HELP = """\
/audio PATH [TEXT]  send an audio file (and TEXT); transcribed if the model can't take it
/model NAME   answer the next turns with NAME (no routing)
/auto         route each turn again (the default)
/models       the configured models and whether each is loaded now
/reset        forget the conversation so far
/help         this list
/quit         leave (Ctrl-D too); Ctrl-C stops an answer, not the session"""


def dim(text: str) -> str:
    return click.style(text, dim=True)


@click.command()
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap each answer's length.")
@click.option("--temperature", type=click.FloatRange(min=0.0),
              help="Sampling temperature, 0 = greedy (default: each model's own).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.option("--system", type=TEXT, help="A system prompt for the whole conversation.")
@click.pass_obj
def chat(app: AppContext, max_tokens: int | None, temperature: float | None, seed: int | None,
         system: str | None) -> None:
    """Talk with the router turn by turn; /help inside lists the commands."""
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    run_chat(app.config(), params, system=system)


class ChatSession:
    """The REPL's state and commands; ``run()`` drives it from a terminal (or a pipe)."""

    def __init__(self, engine: "Engine", params: GenerationParams = GenerationParams(), *,
                 system: str | None = None, echo: Callable[..., Any] = click.echo):
        self.engine = engine
        self.config = engine.config
        self.params = params
        self.system = system
        self.echo = echo
        self.model: str | None = None  # None: route every turn
        self.history: list[dict[str, str]] = []
        # The model that answered each exchange in ``history`` (routing's previous_models).
        self.answered: list[str] = []

    # -- commands

    def command(self, line: str) -> bool:
        """Run a /command; return False when the session should end."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "model":
            if not arg:
                self.echo(f"answering with {self.model or 'auto (routed per turn)'}")
            elif arg == "auto":
                self.model = None
                self.echo(dim("routing each turn again"))
            elif arg not in self.config.models:
                self.echo(click.style(not_configured(arg, self.config.models), fg="red"))
            else:
                self.model = arg
                self.echo(dim(f"next turns go to {arg!r}; /auto to route again"))
        elif name == "auto":
            self.model = None
            self.echo(dim("routing each turn again"))
        elif name == "models":
            self.show_models()
        elif name == "reset":
            self.history.clear()
            self.answered.clear()
            self.echo(dim("conversation forgotten"))
        elif name == "audio":
            self.audio_turn(arg)
        elif name in ("help", "?"):
            self.echo(HELP)
        else:
            self.echo(click.style(f"unknown command /{name}; /help lists them", fg="red"))
        return True

    def show_models(self) -> None:
        residents = {r["name"]: r for r in self.engine.pool.residents()}
        for name, spec in self.config.models.items():
            row = residents.get(name)
            state = row["state"] if row else "unloaded"
            keep = "pinned" if spec.pinned else f"ttl {self.config.ttl_for(spec):g}s"
            extra = ""
            if row and row["state"] == "loaded":
                extra = f", {row['ram_mb']:.0f} MB, idle {row['idle_seconds']:.0f}s"
            marker = "*" if name == self.model else " "
            self.echo(f"{marker} {name:<12} {state:<9} {keep}{extra}")

    # -- turns

    def messages(self, text: str) -> tuple[dict[str, str], ...]:
        system = ({"role": "system", "content": self.system},) if self.system else ()
        return (*system, *self.history, {"role": "user", "content": text})

    def request(self, text: str, audio: AudioInput | None = None) -> ChatRequest:
        return ChatRequest(messages=self.messages(text), audio=audio,
                           previous_models=tuple(self.answered))

    def audio_turn(self, arg: str) -> None:
        """``/audio PATH [TEXT]``: one turn with the file attached (a path with spaces
        goes in quotes)."""
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            self.echo(click.style(f"/audio: {exc}", fg="red"))
            return
        if not words:
            self.echo(click.style("/audio needs a file: /audio PATH [TEXT]", fg="red"))
            return
        path = Path(words[0]).expanduser()
        try:
            data = read_attachment(path, self.config.server.max_body_bytes)
        except AttachmentError as exc:
            self.echo(click.style(f"/audio: {exc}", fg="red"))
            return
        import mimetypes

        mime = mimetypes.guess_type(path.name)[0] or "audio/wav"
        self.turn(" ".join(words[1:]), audio=AudioInput(data=data, mime=mime, source=str(path)))

    def _on_route(self, decision) -> None:
        if decision.transcript is not None:
            self.echo(dim(transcript_line(decision.transcript)))
        self.echo(dim(decision.summary()))

    def turn(self, text: str, audio: AudioInput | None = None) -> None:
        from ..streaming import Failed

        request = self.request(text, audio)
        try:
            decision = self.engine.prepare(request, model=self.model, on_route=self._on_route)
        except SaraiError as exc:  # say it, keep the session
            kind = "routing" if isinstance(exc, RoutingError) else "error"
            self.echo(click.style(f"{kind}: {exc}", fg="red"))
            return
        # The history keeps what the model read: a transcript replaces the audio.
        said = message_text(self.engine.model_request(request, decision).messages[-1])
        while True:
            final, pieces = self._generate(request, decision)
            if (isinstance(final, Failed) and final.before_first_piece and self.history
                    and isinstance(final.error, ContextLengthError)):
                # Keep the session usable: forget the oldest exchange and try again.
                del self.history[:2]
                del self.answered[:1]
                self.echo(dim("(the conversation no longer fits the model's context: "
                              "dropped the oldest exchange)"))
                request = self.request(text, audio)
                continue
            break
        self.echo()
        if isinstance(final, Failed):
            self.echo(click.style(f"error: {final.error}", fg="red"))
        elif final is None or final.cancelled:
            self.echo(dim("[stopped]"))
        else:
            data = final.completion.to_dict()
            t = data["timings"]
            self.echo(dim(f"[{final.completion.decision.model}] "
                          f"{data['usage']['completion_tokens']} tokens, "
                          f"{t['tokens_per_second']:.0f} tok/s"
                          + (f", load {t['load_s']:.2f}s" if t["load_s"] else "")
                          + ("; stopped: it kept repeating itself (runaway guard)"
                             if data["stopped_by"] == "runaway_guard" else "")
                          + ("; stopped: it ran past its time limit"
                             if data["stopped_by"] == "time_limit" else "")))
        if pieces or not isinstance(final, Failed):
            self.history.append({"role": "user", "content": said})
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            answered = getattr(getattr(final, "completion", None), "decision", decision)
            self.answered.append(answered.model)

    def _generate(self, request: ChatRequest, decision):
        """Stream one answer; return its final event (None if stopped early) and pieces."""
        events: queue.Queue = queue.Queue()
        from ..streaming import Generation

        generation = Generation(self.engine, request, decision, self.params, events.put)
        pieces: list[str] = []
        final = None
        try:
            generation.start()
            final = self._stream(generation, events, pieces)
        except KeyboardInterrupt:
            # Ctrl-C can land outside _stream's handler: while the worker starts, or between
            # two turns of its loop (Python checks for signals at loop back-edges).
            generation.cancel()
        finally:
            # Never leave a generation running: exiting with one inside llama.cpp crashes.
            generation.cancel()
            generation.join()
        if final is None:  # the worker has ended: what it produced is all in the queue
            final = self._drain(events, pieces)
        return final, pieces

    def _stream(self, generation: "Generation", events: queue.Queue, pieces: list[str]):
        """Print pieces until the generation ends; Ctrl-C (anywhere in here) cancels it."""
        from ..streaming import Done, Failed, Piece

        while True:
            event = None
            try:
                event = events.get(timeout=0.1)  # a timeout keeps Ctrl-C deliverable
                if not isinstance(event, Piece):
                    return event
                pieces.append(event.text)
                self.echo(event.text, nl=False)
                sys.stdout.flush()
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                generation.cancel()  # the worker stops after its current token
                if isinstance(event, (Done, Failed)):
                    return event

    def _drain(self, events: queue.Queue, pieces: list[str]):
        """Print what an ended generation left in the queue; return its Done/Failed, if any."""
        from ..streaming import Piece

        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return None
            if not isinstance(event, Piece):
                return event
            pieces.append(event.text)
            self.echo(event.text, nl=False)

    # -- the loop

    def run(self, read: Callable[[str], str] = input) -> None:
        self.echo(dim(f"sarai-router chat: models {', '.join(self.config.models)}; "
                      "/help for commands, /quit to leave"))
        while True:
            try:
                line = read(PROMPT)
            except EOFError:
                self.echo()
                return
            except KeyboardInterrupt:
                self.echo(dim("\n(Ctrl-C stops an answer; /quit or Ctrl-D leaves)"))
                continue
            line = line.strip()
            if not line:
                continue
            problem = utf8_problem(line)
            if problem:  # stdin reads undecodable bytes as surrogates (run_chat)
                self.echo(click.style(f"error: that line is not UTF-8 text ({problem}); "
                                      "skipped it", fg="red"))
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:  # while routing or fetching: drop the turn, keep going
                self.echo(dim("\n[stopped]"))


def run_chat(config: Config, params: GenerationParams, *, system: str | None = None) -> None:
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:  # pragma: no cover - not on every platform
        pass
    if hasattr(sys.stdin, "reconfigure"):
        # An undecodable byte typed or piped in must cost its line, not the session.
        sys.stdin.reconfigure(errors="surrogateescape")
    from ..engine import Engine

    engine = Engine(config, report=say, progressbar=progressbar)
    try:
        try:
            engine.start()
        except SaraiError as exc:
            raise cli_error(exc) from None
        ChatSession(engine, params, system=system).run()
    finally:
        engine.close()
