"""The labelled cases ``eval`` measures routing on: one JSON object per line of a JSONL
file, read into :class:`Case` (see :mod:`sarai_router.evaluation` for the format). Every
problem is a :class:`CaseError` naming the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import attrs

from .config import ServerConfig
from .errors import AttachmentError
from .types import AudioInput, ChatRequest, ImageInput, _guess_mime, read_attachment

#: A case's image or clip is at most what ``serve`` takes in one body by default.
MAX_MEDIA_BYTES = ServerConfig().max_body_bytes


class CaseError(Exception):
    """A bad line in a case file; the message starts with ``FILE:LINE:``."""


@attrs.frozen
class Case:
    """One labelled request. ``line`` is 1-based in ``source``."""

    request: ChatRequest
    expect: str
    line: int
    source: str = ""
    kind: str = ""
    lang: str = ""
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    #: cases that share it are one conversation's turns, in file order ("" for none)
    conversation: str = ""

    @property
    def text(self) -> str:
        return self.request.text

    @property
    def media(self) -> bool:
        return bool(self.request.images) or self.request.audio is not None


# -- loading ------------------------------------------------------------------------------

def load_cases(path: str | os.PathLike[str], models: Iterable[str] | None = None) -> list[Case]:
    """Read a JSONL case file. ``models`` given: every ``expect`` must be one of them.

    Raises :class:`CaseError` naming the file and line of the first bad line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(f"{file}: file not found") from None
    except OSError as exc:
        raise CaseError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CaseError(f"{file}: not UTF-8 text (byte {exc.start}); a case file is JSONL"
                        ) from None
    known = None if models is None else sorted(models)
    cases = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cases.append(_parse_case(line, file, number, known))
    if not cases:
        raise CaseError(f"{file}: no cases (one JSON object a line)")
    return cases


def _parse_case(line: str, file: Path, number: int, known: list[str] | None) -> Case:
    where = f"{file}:{number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CaseError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise CaseError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    expect = raw.pop("expect", None)
    if not isinstance(expect, str) or not expect:
        raise CaseError(f"{where}: missing \"expect\" (the model this case should route to)")
    if known is not None and expect not in known:
        raise CaseError(f"{where}: \"expect\": unknown model {expect!r} "
                        f"(configured: {', '.join(known)})")
    prompt, messages = raw.pop("prompt", None), raw.pop("messages", None)
    if prompt is not None and messages is not None:
        raise CaseError(f"{where}: give \"prompt\" or \"messages\", not both")
    if prompt is None and messages is None:
        raise CaseError(f"{where}: missing \"prompt\" (or \"messages\")")
    if prompt is not None and not isinstance(prompt, str):
        raise CaseError(f"{where}: \"prompt\" must be a string, got {type(prompt).__name__}")
    if messages is not None:
        messages = _check_messages(messages, where)
    images = tuple(_read_image(p, file, where) for p in _path_list(raw.pop("images", None), where))
    audio_path = raw.pop("audio", None)
    if audio_path is not None and not isinstance(audio_path, str):
        raise CaseError(f"{where}: \"audio\" must be a path string")
    audio = None
    if audio_path is not None:
        data, resolved = _read_media(audio_path, file, where, "audio")
        audio = AudioInput(data=data, mime=_guess_mime(resolved, "audio/wav"), source=audio_path)
    conversation = raw.pop("conversation", "")
    if isinstance(conversation, bool) or not isinstance(conversation, (str, int)):
        raise CaseError(f"{where}: \"conversation\" must be a string or a number (an id "
                        "shared by the turns of one conversation)")
    if messages is None:
        request = ChatRequest.from_prompt(prompt, images=images, audio=audio)
    else:
        # As the server does: an assistant message's ``name`` is the model that answered it.
        answered = tuple(str(m.get("name") or "") for m in messages if m["role"] == "assistant")
        request = ChatRequest(messages=messages, images=images, audio=audio,
                              previous_models=answered if any(answered) else ())
    kind, lang = raw.pop("kind", ""), raw.pop("lang", "")
    return Case(request=request, expect=expect, line=number, source=str(file),
                kind=str(kind), lang=str(lang), extra=raw, conversation=str(conversation))


def _check_messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list) or not messages:
        raise CaseError(f"{where}: \"messages\" must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), (str, list))):
            raise CaseError(f"{where}: \"messages\"[{i}] must be an object with a string "
                            "\"role\" and a string or list \"content\"")
    if not any(m["role"] == "user" for m in messages):
        raise CaseError(f"{where}: \"messages\" has no \"user\" message to route")
    return tuple(messages)


def _path_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CaseError(f"{where}: \"images\" must be a list of path strings")
    return value


def _read_media(relative: str, file: Path, where: str, what: str) -> tuple[bytes, Path]:
    resolved = (file.parent / relative) if not Path(relative).is_absolute() else Path(relative)
    try:
        return read_attachment(resolved, MAX_MEDIA_BYTES), resolved
    except AttachmentError as exc:
        raise CaseError(f"{where}: {what} {relative!r}: {exc.problem} ({resolved}); paths are "
                        "relative to the case file's folder") from None


def _read_image(relative: str, file: Path, where: str) -> ImageInput:
    data, resolved = _read_media(relative, file, where, "image")
    return ImageInput(data=data, mime=_guess_mime(resolved, "image/png"), source=relative)
