"""The objects that travel through a request: the request itself, the transcript of its
audio, and the routing decision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import attrs

if TYPE_CHECKING:
    from .config import ModelSpec


@attrs.frozen
class ImageInput:
    """An image attached to a request: a local file (CLI) or decoded bytes (HTTP data: URI)."""

    data: bytes
    mime: str = "image/png"
    source: str = ""


@attrs.frozen
class AudioInput:
    """An audio clip attached to a request.

    ``message_index``: the message that carried it (an HTTP ``input_audio`` part), so its
    transcript goes there; ``None`` means the latest user message.
    """

    data: bytes
    mime: str = "audio/wav"
    source: str = ""
    message_index: int | None = None


#: How the model sees a transcript in the user's text: marked, so that it knows the words
#: were spoken (and may hold recognition errors) rather than typed.
TRANSCRIPT_MARK = "[transcribed audio]"


@attrs.frozen
class Transcript:
    """What a ``transcribe`` plugin returns for an audio clip.

    ``text``: what was said; ``language``: its ISO 639-1 code (``"es"``) or ``""`` if
    unknown; ``duration``: the clip's length in seconds. ``language_probability`` and
    ``load_seconds`` (the time spent loading the speech model for this call) are optional.
    The engine fills in ``plugin`` (who transcribed) and ``seconds`` (how long it took).
    """

    text: str
    language: str = ""
    duration: float = 0.0
    language_probability: float | None = None
    load_seconds: float = 0.0
    plugin: str = ""
    seconds: float = 0.0

    @property
    def real_time_factor(self) -> float | None:
        """Transcription time (model load excluded) over the clip's length."""
        if self.duration <= 0:
            return None
        return max(self.seconds - self.load_seconds, 0.0) / self.duration

    def to_dict(self) -> dict[str, Any]:
        rtf = self.real_time_factor
        return {
            "text": self.text,
            "language": self.language,
            "seconds": round(self.seconds, 4),
            "duration": round(self.duration, 3),
            "load_seconds": round(self.load_seconds, 4),
            "real_time_factor": None if rtf is None else round(rtf, 3),
            "language_probability": None if self.language_probability is None
            else round(self.language_probability, 3),
            "plugin": self.plugin,
        }


#: What a request may need beyond text, in ``ChatRequest.needs``.
NEEDS = ("tools", "json_schema", "logprobs")
#: Characters per token when a prompt's length is estimated without a tokenizer. Small
#: vocabularies (SmolLM2, Gemma 3 on Spanish) run about 3-4: 3 errs on the long side.
CHARS_PER_TOKEN = 3
#: The request field behind each need, to name it when a model can't give it.
NEED_FIELDS = {"tools": "tools", "json_schema": "response_format", "logprobs": "logprobs"}


@attrs.frozen
class ChatRequest:
    """One chat request. ``messages`` are OpenAI-style dicts; ``text`` is the latest user turn.

    ``needs``: features the answer must have beyond text (a subset of :data:`NEEDS`), filled
    by the front end that parsed the request (the server's ``tools``, ``response_format``
    with a JSON schema, ``logprobs``). Images, audio and the prompt's length are read from
    the request itself. Routing sends the request only to a model that can take all of it.
    """

    messages: tuple[Mapping[str, Any], ...]
    images: tuple[ImageInput, ...] = ()
    audio: AudioInput | None = None
    #: Set once the attached audio was transcribed (``with_transcript``); ``audio`` is then None.
    transcript: Transcript | None = None
    #: What the signals read when it differs from the latest user message: the typed text
    #: and the transcript, without the mark the model sees.
    spoken_text: str | None = None
    needs: frozenset[str] = frozenset()
    #: The models that answered this conversation's earlier turns, oldest first ("" where
    #: unknown). The chat REPL fills it from its own answers; the server from the ``name``
    #: of each assistant message (a client copies the response's ``model`` there). Routing
    #: plugins read it for hysteresis (the heuristic's ``sticky_turns``).
    previous_models: tuple[str, ...] = ()

    @property
    def previous_model(self) -> str | None:
        """The model that answered the latest earlier turn, if known."""
        return (self.previous_models[-1] or None) if self.previous_models else None

    @property
    def previous_run(self) -> int:
        """How many earlier turns in a row, counting back from the latest, the
        :attr:`previous_model` answered (0 when it is unknown)."""
        last = self.previous_model
        if last is None:
            return 0
        run = 0
        for name in reversed(self.previous_models):
            if name != last:
                break
            run += 1
        return run

    @property
    def estimated_prompt_tokens(self) -> int:
        """The prompt's length in tokens, estimated as characters / 3 (rounded up)."""
        chars = sum(len(message_text(m)) for m in self.messages)
        return -(-chars // CHARS_PER_TOKEN)

    @property
    def text(self) -> str:
        """The latest user turn as the signals read it (with what was said, if transcribed)."""
        if self.spoken_text is not None:
            return self.spoken_text
        return self.typed_text

    @property
    def typed_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return ""

    def with_transcript(self, transcript: Transcript) -> "ChatRequest":
        """This request with its audio replaced by ``transcript``: the model receives the
        words, marked as a transcription, in the message that carried the audio (or the
        latest user message); the signals read the typed text plus the transcript."""
        spoken = transcript.text.strip()
        typed = self.typed_text
        messages = [dict(m) for m in self.messages]
        index = self.audio.message_index if self.audio is not None else None
        if index is None or not 0 <= index < len(messages):
            index = next((i for i in range(len(messages) - 1, -1, -1)
                          if messages[i].get("role") == "user"), None)
        marked = f"{TRANSCRIPT_MARK} {spoken}"
        if index is None:
            messages.append({"role": "user", "content": marked})
        else:
            before = message_text(messages[index])
            messages[index]["content"] = f"{before}\n\n{marked}" if before.strip() else marked
        return attrs.evolve(
            self, messages=tuple(messages), audio=None, transcript=transcript,
            spoken_text=f"{typed}\n{spoken}" if typed.strip() else spoken)

    @classmethod
    def from_prompt(
        cls,
        prompt: str,
        images: tuple[ImageInput, ...] = (),
        audio: AudioInput | None = None,
        history: tuple[Mapping[str, Any], ...] = (),
        previous_models: tuple[str, ...] = (),
    ) -> "ChatRequest":
        return cls(
            messages=(*history, {"role": "user", "content": prompt}),
            images=images,
            audio=audio,
            previous_models=previous_models,
        )

    @classmethod
    def from_files(
        cls, prompt: str, image_paths: tuple[Path, ...] = (), audio_path: Path | None = None,
        *, max_bytes: int | None = None,
    ) -> "ChatRequest":
        """A request with the files attached, each checked by :func:`read_attachment`
        (AttachmentError when one can't be taken)."""
        images = tuple(
            ImageInput(data=read_attachment(p, max_bytes), mime=_guess_mime(p, "image/png"),
                       source=str(p))
            for p in image_paths
        )
        audio = None
        if audio_path is not None:
            audio = AudioInput(
                data=read_attachment(audio_path, max_bytes),
                mime=_guess_mime(audio_path, "audio/wav"),
                source=str(audio_path),
            )
        return cls.from_prompt(prompt, images=images, audio=audio)


#: Chunk size for reading an attachment: the size check holds even for a file that grows.
_READ_CHUNK = 1 << 20


def read_attachment(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, refused before reading unless it is a regular file of at most
    ``max_bytes``. A FIFO, a device (``/dev/zero``) or a directory is refused at once, since
    reading it could block forever or never end; the file is read in chunks, so one that
    grows past the limit while read is refused too, with flat memory."""
    import os
    import stat

    from .errors import AttachmentError

    try:
        # O_NONBLOCK: opening a FIFO with no writer must not hang; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AttachmentError(str(path), f"cannot read it ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
                "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise AttachmentError(str(path), f"is {kind}, not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as handle:
        if max_bytes is not None and info.st_size > max_bytes:
            raise AttachmentError(str(path), f"{info.st_size} bytes, more than the limit of "
                                             f"{max_bytes} ([server] max_body_bytes)")
        chunks: list[bytes] = []
        total = 0
        try:
            while chunk := handle.read(_READ_CHUNK):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise AttachmentError(str(path), f"grew past the limit of {max_bytes} "
                                          "bytes ([server] max_body_bytes) while being read")
                chunks.append(chunk)
        except OSError as exc:
            raise AttachmentError(str(path), f"cannot read it ({exc.strerror or exc})") from None
        return b"".join(chunks)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def _guess_mime(path: Path, default: str) -> str:
    import mimetypes

    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or default


#: What ``select_route`` may see of a model: resident, being loaded, or not in memory.
MODEL_STATES = ("loaded", "loading", "unloaded")

#: Cold-load rate for a model never loaded in this process: MB of its backend's RAM estimate
#: per second. Measured here (docs/BENCHMARKS.md): the default models load at ~1,300 MB/s of
#: estimate (fast 170 MB in 0.13 s, quality 517 MB in 0.40 s) from the page cache; a cold
#: disk or a network filesystem is slower, and a measured load replaces the estimate.
COLD_LOAD_MB_PER_S = 1300.0


@attrs.frozen
class ModelState:
    """One model as routing sees it (``select_route``'s ``residency``).

    ``state``: ``"loaded"`` (resident), ``"loading"`` (a load is under way), or
    ``"unloaded"``. ``cold_load_seconds``: how long loading it takes: the last load this
    process measured (``measured``), else the backend's RAM estimate at
    :data:`COLD_LOAD_MB_PER_S`; ``None`` when neither is known.
    """

    state: str
    cold_load_seconds: float | None = None
    measured: bool = False

    @property
    def warm(self) -> bool:
        """Loaded or loading: a request for it waits for no new load."""
        return self.state != "unloaded"


class Residency(Mapping[str, ModelState]):
    """Every configured model's :class:`ModelState`, by name. The states are a snapshot
    taken when it was made; a cold-load time is worked out only when an entry is read, so
    a routing plugin that never looks costs nothing."""

    def __init__(self, states: Mapping[str, str],
                 cold_load: Callable[[str], tuple[float | None, bool]] | None = None):
        self._states = dict(states)
        self._cold_load = cold_load
        self._entries: dict[str, ModelState] = {}

    def __getitem__(self, name: str) -> ModelState:
        entry = self._entries.get(name)
        if entry is None:
            state = self._states[name]  # KeyError for a model that isn't configured
            seconds, measured = self._cold_load(name) if self._cold_load else (None, False)
            entry = self._entries[name] = ModelState(state, seconds, measured)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def state(self, name: str) -> str:
        """``name``'s state without working out its cold-load time (unknown: unloaded)."""
        return self._states.get(name, "unloaded")

    def __repr__(self) -> str:
        return f"Residency({self._states!r})"


@attrs.frozen
class Route:
    """What a routing plugin may return: the model, and why (one short sentence)."""

    model: str
    reason: str = ""


@attrs.frozen
class FallbackStep:
    """One model that could not answer and the model tried next (``fallbacks`` in config)."""

    from_model: str
    to_model: str
    #: a short label: refused, timeout, http_503, disconnected, cooldown, load_failed
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"from": self.from_model, "to": self.to_model, "reason": self.reason,
                "detail": self.detail}


@attrs.frozen
class RouteDecision:
    """The dispatcher's full answer: the route plus who decided and on which signals.

    ``fallback``: routing fell back to ``[routing] default_model`` (no plugin chose).
    ``fallbacks``: the models that failed before the first token, in order, each replaced
    by the next of its ``fallbacks``; ``model`` is then the one that answered.
    ``routed_model``: the model routing chose, when capabilities or fallbacks changed it.
    """

    model: str
    reason: str
    plugin: str
    signals: Mapping[str, Any]
    warnings: tuple[str, ...] = ()
    fallback: bool = False
    #: The attached audio's transcript, when it was transcribed to be routed and answered.
    transcript: Transcript | None = None
    fallbacks: tuple[FallbackStep, ...] = ()
    routed_model: str | None = None

    def summary(self) -> str:
        """One line for people: ``[fast] <reason> (heuristic)``."""
        who = self.plugin if self.plugin.startswith("(") else f"({self.plugin})"
        return f"[{self.model}] {self.reason} {who}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "plugin": self.plugin,
            "reason": self.reason,
            "signals": dict(self.signals),
            "warnings": list(self.warnings),
            "fallback": self.fallback,
            "transcript": None if self.transcript is None else self.transcript.to_dict(),
            "fallbacks": [step.to_dict() for step in self.fallbacks],
            "routed_model": self.routed_model,
        }


@attrs.frozen
class ResidentInfo:
    """A frozen snapshot of a resident model: what cache plugins are shown."""

    name: str
    spec: ModelSpec
    state: str
    pinned: bool
    users: int
    queued: int
    ram_mb: float
    estimated_mb: float
    measured_mb: float | None
    last_used: float
    loaded_at: float
    load_seconds: float
    prewarmed: bool
