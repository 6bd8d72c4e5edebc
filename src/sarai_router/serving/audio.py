"""``POST /v1/audio/transcriptions``: OpenAI's speech-to-text endpoint, on the ``transcribe`` hook.

A multipart form, as the openai SDK's ``client.audio.transcriptions.create(model=...,
file=...)`` sends it. ``model`` is ``whisper-1`` (OpenAI's name, so existing clients work)
or ``whisper``; the configured ``transcribe`` plugins answer either way. Fields we can't
honour are refused by name; bad audio is a 400 naming the problem.

Transcriptions are requests like the others, here and for audio in a chat request: one
runs on the speech model (a resident of the engine's pool) at a time and at most
``[server] queue_size`` wait (429 past that); a client that leaves stops its
transcription; ``[plugins.whisper] timeout_seconds`` bounds each (504).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import AudioError, Cancelled, TranscriptionTimeout, TranscriptionUnavailable
from ..types import AudioInput, Transcript
from .openai import ApiError, error_for

if TYPE_CHECKING:
    from ..config import Config
    from ..engine import Engine

log = logging.getLogger(__name__)

TRANSCRIPTION_MODELS = ("whisper-1", "whisper")
RESPONSE_FORMATS = ("json", "text", "verbose_json")
FIELDS = ("file", "model", "language", "response_format", "temperature")
EXTRA_HINT = "pip install 'sarai-router[audio]'"


def _invalid(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than [server] max_body_bytes = {limit}",
                           code="body_too_large")
        yield chunk


def check_origin(request: Request, allowed: tuple[str, ...]) -> None:
    """Refuse a form a web page posts: unlike JSON, a page can send multipart/form-data
    without a CORS preflight, so the endpoint itself checks the ``Origin`` a browser
    puts on it (clients outside a browser send none) against ``[server] cors_origins``."""
    origin = request.headers.get("origin")
    if origin is not None and "*" not in allowed and origin not in allowed:
        raise ApiError(403, f"a form posted from the web page at {origin[:100]!r} is refused: "
                       "list the origin in [server] cors_origins to allow it",
                       code="origin_not_allowed", type="permission_error")


async def read_form(request: Request, limit: int, timeout: float):
    """The multipart form, at most ``limit`` bytes, within ``timeout`` seconds; ApiError
    for anything else."""
    try:
        from starlette.formparsers import MultiPartException, MultiPartParser
        from starlette.requests import parse_options_header
    except ImportError:  # pragma: no cover - starlette without its form support
        parse_options_header = None
    if parse_options_header is None:
        raise ApiError(501, f"this server cannot read multipart forms: {EXTRA_HINT} "
                       "(python-multipart is not installed)", code="not_implemented",
                       type="server_error")
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise ApiError(400, "the body must be multipart/form-data with a file field "
                       f"(got {content_type.decode('latin-1') or 'no content type'})",
                       code="invalid_body")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than [server] max_body_bytes = {limit}",
                       code="body_too_large")
    parser = MultiPartParser(request.headers, _limited(request, limit), max_files=1,
                             max_fields=len(FIELDS), max_part_size=64 * 1024)
    form = None
    with anyio.move_on_after(timeout):
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"the multipart form cannot be read: {exc.message}",
                           code="invalid_body") from None
    if form is None:
        raise ApiError(408, f"the body did not arrive within [server] body_timeout_seconds "
                       f"= {timeout:g}", code="request_timeout")
    return form


class ParsedTranscription:
    __slots__ = ("audio", "language", "response_format")

    def __init__(self, audio: AudioInput, language: str | None, response_format: str):
        self.audio = audio
        self.language = language
        self.response_format = response_format


async def parse_transcription_form(form) -> ParsedTranscription:
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise _invalid(f"{unknown[0]}: not supported by this server (fields: "
                       f"{', '.join(FIELDS)})", unknown[0], code="unsupported_parameter")
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise _invalid("file is required: the audio file, sent as a multipart file", "file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(f"model is required: {' or '.join(TRANSCRIPTION_MODELS)}", "model")
    if model not in TRANSCRIPTION_MODELS:
        raise ApiError(404, f"unknown transcription model {model!r} (available: "
                       f"{', '.join(TRANSCRIPTION_MODELS)})", code="model_not_found",
                       param="model")
    language = form.get("language") or None
    if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
        raise _invalid(f"language must be an ISO 639-1 code such as \"es\" or \"en\", got "
                       f"{language!r}", "language")
    response_format = form.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise _invalid(f"response_format {response_format!r} is not supported (supported: "
                       f"{', '.join(RESPONSE_FORMATS)})", "response_format")
    temperature = form.get("temperature")
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            value = math.nan
        if value != 0:
            raise _invalid(f"temperature: only 0 is supported (the decoding is "
                           f"deterministic), got {temperature!r}", "temperature")
    data = await upload.read()
    name = upload.filename or "file"
    audio = AudioInput(data=data, mime=upload.content_type or "application/octet-stream",
                       source=f"file {name!r}")
    return ParsedTranscription(audio, language, response_format)


def _render(transcript: Transcript, response_format: str) -> Response:
    if response_format == "text":
        return PlainTextResponse(transcript.text)
    if response_format == "verbose_json":
        return JSONResponse({"task": "transcribe", "language": transcript.language,
                             "duration": round(transcript.duration, 3),
                             "text": transcript.text, "sarai": transcript.to_dict()})
    return JSONResponse({"text": transcript.text,
                         "usage": {"type": "duration",
                                   "seconds": math.ceil(transcript.duration)},
                         "sarai": transcript.to_dict()})


def transcription_error(exc: BaseException) -> ApiError:
    if isinstance(exc, AudioError):
        return ApiError(400, str(exc), code="invalid_audio", param=exc.param or "file")
    if isinstance(exc, TranscriptionTimeout):
        return ApiError(504, str(exc), code="transcription_timeout", type="server_error")
    if isinstance(exc, TranscriptionUnavailable):
        # Not the client's doing: this server has no working speech to text.
        return ApiError(503, str(exc), code="transcription_unavailable", type="server_error")
    return error_for(exc)


class AudioState(Protocol):
    """What the handler needs from the server's state; ``SaraiServer`` provides it.

    Named here rather than imported so the app (which mounts this route) and this module
    don't import each other.
    """

    config: Config
    engine: Engine
    metrics: Any

    def _fail(self, error: ApiError) -> Response: ...

    def client_left(self, what: str) -> Response: ...


#: How often a request being prepared (or transcribed) looks whether its client is there.
DISCONNECT_POLL_SECONDS = 0.25


async def cancel_when_gone(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects. For a request whose body has been read:
    the next message the server gets for it is the disconnect, which
    ``is_disconnected()`` keeps, so the handler that goes on sees it too."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    cancel.set()


async def transcribe_for(state: "AudioState", request: Request,
                         parsed: ParsedTranscription) -> Transcript:
    """Run the transcription on a worker thread: it waits its turn on the speech model (at
    most ``[server] queue_size`` wait: QueueFull past that) and stops if the client leaves."""
    cancel = threading.Event()
    watcher = asyncio.get_running_loop().create_task(cancel_when_gone(request, cancel))
    try:
        return await anyio.to_thread.run_sync(lambda: state.engine.transcribe(
            parsed.audio, language=parsed.language, cancel=cancel,
            queue_limit=state.config.server.queue_size))
    finally:
        cancel.set()  # a cancelled wait (shutdown) stops the thread too
        watcher.cancel()


async def transcriptions(state: AudioState, request: Request) -> Response:
    """``POST /v1/audio/transcriptions``."""
    server = state.config.server
    try:
        check_origin(request, tuple(server.cors_origins))
        form = await read_form(request, server.max_body_bytes, server.body_timeout_seconds)
        try:
            parsed = await parse_transcription_form(form)
        finally:
            await form.close()
        transcript = await transcribe_for(state, request, parsed)
    except Cancelled:
        return state.client_left("its transcription")
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return state._fail(transcription_error(exc))
    return _render(transcript, parsed.response_format)


__all__ = ["transcriptions", "read_form", "parse_transcription_form", "TRANSCRIPTION_MODELS"]
