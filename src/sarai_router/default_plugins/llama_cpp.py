"""Default backend ``llama_cpp``: GGUF models in process through llama-cpp-python, streaming.

``llama_cpp`` is imported on the first load only, so ``route`` and ``--help`` stay instant.
A model whose config lists ``image`` needs ``mmproj`` (its vision projector GGUF); audio
input is not supported by this backend. Tools, JSON output (``response_format``) and
logprobs: see ``llama_cpp_features``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import attrs

from ..backend import (BUILTIN_SAMPLING, BackendError, ContextLengthError, Delta,
                       GenerationParams, Usage)
from ..config import ModelSpec
from ..errors import InvalidRequest, ModelLoadError
from ..hookspecs import hookimpl
from ..time_budget import OverBudget, TimeBudget
from ..types import AudioInput, ImageInput
from . import llama_cpp_features as features
from .gguf_backend import GGUFBackend, GGUFSettings, repack_weights


# ggml's log levels (ggml.h): llama-cpp-python's own callback maps them as an older ggml
# numbered them, so llama.cpp warnings print to stderr even with verbose=False.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("llama_cpp")
log = logging.getLogger(__name__)
_log_callback = None


def route_llama_logs_to_logging(llama_cpp) -> None:
    """Send llama.cpp's log lines to the ``llama_cpp`` logger (shown with ``-vv``).

    llama.cpp's warnings are about its own internals (e.g. the SWA cache size): useful when
    debugging, noise in a CLI answer, so they are logged at DEBUG.
    """
    global _log_callback
    if _log_callback is not None:
        return
    last_level = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        # Level 5 (CONT) continues the previous line at its level.
        python_level = last_level[0] if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
        last_level[0] = python_level
        if _llama_log.isEnabledFor(logging.DEBUG):
            _llama_log.debug("%s", text.decode("utf-8", errors="replace").rstrip())
        elif python_level >= logging.ERROR:
            _llama_log.error("%s", text.decode("utf-8", errors="replace").rstrip())

    import ctypes  # here, with llama_cpp: `route` imports this module for its settings only

    _log_callback = callback  # ctypes must keep the callback alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class _ThisThreadToLog:
    """Stands in for ``sys.stdout`` / ``sys.stderr`` while models load: what a loading thread
    prints goes to the ``llama_cpp`` logger at DEBUG, what any other thread prints goes
    through to the real stream.

    A load runs with ``verbose=True``, because with ``verbose=False`` llama-cpp-python
    points file descriptors 1 and 2 at /dev/null for the whole process while it loads, and
    every other thread's output (the server's log lines) is lost meanwhile. llama.cpp's own
    log lines already come to ``route_llama_logs_to_logging``; only llama-cpp-python's
    verbose ``print``s (system info, metadata, chat template) land here.
    """

    def __init__(self, real):
        self.real = real
        self.quiet: set[int] = set()

    def write(self, text: str) -> int:
        if threading.get_ident() not in self.quiet:
            return self.real.write(text)
        if text.strip() and _llama_log.isEnabledFor(logging.DEBUG):
            _llama_log.debug("%s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str):
        return getattr(self.real, name)


_quiet_lock = threading.Lock()


@contextmanager
def _prints_to_log() -> Iterator[None]:
    """While inside, this thread's prints to stdout and stderr go to the log (see above)."""
    me = threading.get_ident()
    with _quiet_lock:
        streams = []
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _ThisThreadToLog):
                stream = _ThisThreadToLog(stream)
                setattr(sys, name, stream)
            stream.quiet.add(me)
            streams.append((name, stream))
    try:
        yield
    finally:
        with _quiet_lock:
            for name, stream in streams:
                stream.quiet.discard(me)
                # The last load out puts the real stream back, unless someone replaced it since.
                if not stream.quiet and getattr(sys, name) is stream:
                    setattr(sys, name, stream.real)


_load_options = threading.local()


def _default_params_with_overrides(original: Any) -> Any:
    """``llama_model_default_params`` with what ``Llama()`` offers no argument for
    (``use_extra_bufts``), set for loads on this thread inside :func:`_model_params`."""
    def params() -> Any:
        values = original()
        repack = getattr(_load_options, "repack", None)
        if repack is not None:
            values.use_extra_bufts = repack
        return values

    params._sarai_overrides = True
    return params


@contextmanager
def _model_params(llama_cpp: Any, *, repack: bool) -> Iterator[None]:
    low_level = llama_cpp.llama_cpp
    if not getattr(low_level.llama_model_default_params, "_sarai_overrides", False):
        low_level.llama_model_default_params = _default_params_with_overrides(
            low_level.llama_model_default_params)
    _load_options.repack = repack
    try:
        yield
    finally:
        _load_options.repack = None


class LlamaCppModel:
    """One loaded ``llama_cpp.Llama``. Not safe for concurrent use: the pool serialises it."""

    def __init__(self, spec: ModelSpec, llama: Any):
        self.spec = spec
        self.llama = llama

    def chat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
             images: Sequence[ImageInput] = (),
             audio: AudioInput | None = None) -> Iterator[Delta]:
        if audio is not None:
            raise BackendError(f"model {self.spec.name!r}: the llama_cpp backend cannot take audio input")
        messages = features.render_messages(
            messages, params, fold_system=self.spec.settings.chat_format == "gemma")
        if images:
            if self.llama.chat_handler is None:
                raise BackendError(f"model {self.spec.name!r} has no vision projector (mmproj); "
                                   "it cannot take images")
            messages = _with_images(messages, images)
        grammar = features.grammar_for(params)
        if grammar is not None:
            features.check_grammar(self.llama, grammar, "tools" if params.tools
                                   else "response_format")
        sampled = 0
        # Told to stop (the runaway guard): the end-of-text token becomes the only choice,
        # so the answer ends at once and cleanly, its usage counted. Not under a grammar,
        # which may not allow the end yet (the engine then closes the stream itself).
        stop_check = params.stop_check if grammar is None else None
        end_of_text = self.llama.token_eos()

        def count_sampling(_input_ids, scores):
            nonlocal sampled
            sampled += 1
            if stop_check is not None and stop_check():
                scores[:] = -float("inf")
                scores[end_of_text] = 0.0
            return scores

        processors = [count_sampling]
        recorder = None
        if params.logprobs:
            recorder = features.LogprobRecorder(self.llama, params.top_logprobs)
            processors.insert(0, recorder.processor)
        # A constrained tool call is only shown whole (as tool_calls); with "auto", text is
        # held back while it may still turn out to be a call.
        calls_only = bool(params.tools) and params.tool_choice != "auto"
        watch_calls = bool(params.tools) and params.tool_choice == "auto"
        held: list[str] = []
        emitted_bytes = 0

        if params.seed is not None:
            # A seed promises the same answer to the same request. Reusing the prefix an
            # earlier request left in the KV cache evaluates this prompt in other batches (a
            # prompt cached whole has its last token evaluated again alone, by another
            # kernel), which moves the logits: measured, the same seeded request answered
            # differently right after itself. So a seeded prompt is evaluated whole.
            self.llama.reset()
        budget = params.time_budget
        if recorder is not None or budget is not None:
            self._hear_samples(recorder.sampled if recorder else None, budget)
        try:
            stream = self._create(messages, params, grammar, processors)
        except BaseException:
            self._hear_samples(None)
            raise
        finish_reason = None
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if text:
                    if calls_only or (watch_calls and held is not None):
                        held.append(text)
                        if calls_only or features.may_be_call("".join(held)):
                            continue
                        text, held = "".join(held), None
                    emitted_bytes += len(text.encode("utf-8"))
                    yield Delta(text=text, logprobs=recorder.take(emitted_bytes)
                                if recorder else ())
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        except OverBudget:
            # Past its time bound (the engine says so in stopped_by): cut, as by max_tokens.
            finish_reason = "length"
        except ValueError as exc:
            # llama-cpp-python says a prompt is too long (before any token) with a bare
            # ValueError; name the model and the key to change.
            if "exceed context window" not in str(exc):
                raise
            raise ContextLengthError(
                f"model {self.spec.name!r}: {exc}; shorten the conversation or raise "
                f"[models.{self.spec.name}] n_ctx (now {self.spec.n_ctx})") from None
        finally:
            # A generation stopped early must end now, while the model is alive: left to the
            # garbage collector, it would run against a closed context (a crash at exit).
            stream.close()
            if recorder is not None or budget is not None:
                self._hear_samples(None)
        # Every sampled token but the last was evaluated into the context after the prompt.
        prompt_tokens = max(0, self.llama.n_tokens - max(0, sampled - 1))
        completion_tokens = sampled if finish_reason == "length" else max(0, sampled - 1)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        calls = features.parse_tool_calls("".join(held), params) if held else ()
        text = "" if calls or not held else "".join(held)
        emitted_bytes += len(text.encode("utf-8"))
        yield Delta(
            text=text,
            finish_reason="tool_calls" if calls else finish_reason or "stop",
            usage=usage,
            tool_calls=calls,
            logprobs=recorder.take(emitted_bytes) if recorder else (),
        )

    def _create(self, messages, params: GenerationParams, grammar: str | None, processors):
        from llama_cpp import LlamaGrammar, LogitsProcessorList

        # Unset settings (a caller that bypassed Engine.stream) take the built-in defaults.
        sampling = params.with_defaults(BUILTIN_SAMPLING).sampling()
        return self.llama.create_chat_completion(
            messages=list(messages),
            max_tokens=params.max_tokens or self.spec.max_tokens,
            seed=params.seed,
            stop=list(params.stop) or None,
            stream=True,
            **sampling,
            grammar=None if grammar is None else LlamaGrammar.from_string(grammar,
                                                                          verbose=False),
            logits_processor=LogitsProcessorList(processors),
        )

    def _hear_samples(self, listener, budget: TimeBudget | None = None) -> None:
        """Call ``listener(token)`` with each token the model samples, and hold each
        sampling to ``budget`` (None, None: stop).

        llama-cpp-python gives a logits processor the logits but never the token chosen
        from them; its generate loop calls ``self.sample`` for each one, so an instance
        attribute wraps that method for this generation only. Sampling is where a grammar
        does its work (llama.cpp checks every candidate token against it), so its time is
        what ``max_token_sampling_seconds`` bounds; OverBudget raised here ends the
        generate loop between two tokens.
        """
        if listener is None and budget is None:
            self.llama.__dict__.pop("sample", None)
            return
        sample = type(self.llama).sample.__get__(self.llama)

        def sample_and_tell(*args, **kwargs):
            if budget is not None:
                budget.check()
            started = time.perf_counter()
            token = sample(*args, **kwargs)
            if budget is not None:
                budget.add_sampling(time.perf_counter() - started)
            if listener is not None:
                listener(token)
            return token

        self.llama.sample = sample_and_tell

    def embed(self, inputs: Sequence[str | Sequence[int]], *,
              truncate: bool = True) -> tuple[list[list[float]], int]:
        """One L2-normalised vector per input (text, or token ids) and the tokens read.

        ``truncate``: an input longer than the context is cut to it; else it is refused
        (ContextLengthError)."""
        if not self.spec.embedding:
            raise BackendError(f"model {self.spec.name!r} is not loaded for embeddings "
                               "(set embedding = true in its table)")
        limit = min(self.llama.n_ctx(), self.llama.n_batch)
        vectors, tokens = [], 0
        for item in inputs:
            ids = (self.llama.tokenize(item.encode("utf-8"), add_bos=True, special=False)
                   if isinstance(item, str) else list(item))
            if not ids:
                raise InvalidRequest("input: an input is empty", param="input")
            vocab = self.llama.n_vocab()
            if any(not 0 <= i < vocab for i in ids):
                raise InvalidRequest(f"input: a token id is outside model {self.spec.name!r}'s "
                                     f"vocabulary (0..{vocab - 1})", param="input")
            if len(ids) > limit:
                if not truncate:
                    raise ContextLengthError(
                        f"model {self.spec.name!r}: an input has {len(ids)} tokens, more than "
                        f"the {limit} it embeds at once (n_ctx / n_batch)")
                ids = ids[:limit]
            vectors.append(self._embed_ids(ids))
            tokens += len(ids)
        return vectors, tokens

    def _embed_ids(self, ids: list[int]) -> list[float]:
        # One sequence at a time, the way llama-cpp-python's own ``embed`` decodes a batch
        # (which takes only text; OpenAI's ``input`` may be token ids).
        import llama_cpp

        llama = self.llama
        llama._batch.reset()
        llama._batch.add_sequence(ids, 0, True)  # every token an output, as embed() does
        llama._ctx.kv_cache_clear()
        llama._ctx.decode(llama._batch)
        llama._batch.reset()
        vector = [float(v) for v in llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, 0)
                  [:llama.n_embd()]]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def close(self) -> None:
        llama, self.llama = self.llama, None
        if llama is not None:
            llama.close()


def _with_images(messages, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
    """Attach CLI images to the last user message as OpenAI ``image_url`` data: URIs."""
    import base64  # here: `route` imports this module for its settings only

    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") == "user":
            content = message.get("content")
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            for image in images:
                uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": uri}})
            message["content"] = parts
            break
    return out


#: How an embedding model may pool (llama.cpp's pooling types that give one vector).
POOLING = ("mean", "cls", "last")


@attrs.frozen
class LlamaCppSettings(GGUFSettings):
    """The ``llama_cpp`` backend's own keys in ``[models.NAME]``, besides those of every
    GGUF backend (``n_threads``, ``mmproj``, ``repack``)."""

    n_batch: int = 512
    chat_format: str = ""
    #: how an embedding model (``embedding = true``) pools its hidden states into one
    #: vector per input: mean, cls or last
    pooling: str = "mean"
    #: extra keyword arguments for ``llama_cpp.Llama`` (``chat_handler`` names the image handler)
    options: dict[str, Any] = attrs.field(factory=dict)


class LlamaCppBackend(GGUFBackend):
    settings_class = LlamaCppSettings
    name = "llama_cpp"

    def check_settings(self, spec: ModelSpec) -> Iterable[tuple[str, str]]:
        settings: LlamaCppSettings = spec.settings
        if settings.n_batch < 1:
            yield "n_batch", "must be >= 1"
        if settings.pooling not in POOLING:
            yield "pooling", f"must be one of {', '.join(POOLING)}, got {settings.pooling!r}"
        if spec.embedding and settings.mmproj:
            yield "mmproj", "an embedding model (embedding = true) takes text only"

    def ram_shape(self, spec: ModelSpec) -> tuple[int, int]:
        return spec.n_ctx, spec.settings.n_batch

    def describe_settings(self, spec: ModelSpec) -> Mapping[str, Any]:
        return {"n_batch": spec.settings.n_batch,
                "chat_format": spec.settings.chat_format or None}

    def sampling_defaults(self, spec: ModelSpec) -> Mapping[str, float]:
        """The GGUF's ``general.sampling.*`` recommendation (what llama.cpp's own tools read),
        empty when the file has none or cannot be read."""
        from .gguf_info import GGUFError, read_info

        try:
            return read_info(spec.path).sampling
        except GGUFError:
            return {}

    def load(self, spec: ModelSpec) -> LlamaCppModel:
        settings: LlamaCppSettings = spec.settings
        if not os.path.isfile(spec.path):
            raise ModelLoadError(f"model {spec.name!r}: its file is missing "
                                 f"({Path(spec.path).name})", spec.name)
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - a broken install
            raise BackendError(f"llama-cpp-python is not importable: {exc}") from None
        route_llama_logs_to_logging(llama_cpp)
        threads = self.threads(spec)
        kwargs: dict[str, Any] = dict(
            model_path=spec.path,
            n_ctx=spec.n_ctx,
            n_batch=settings.n_batch,
            n_threads=threads,
            # Prompt evaluation too: llama-cpp-python's default is every core, which undoes
            # the server's share of the cores (engine.share_cores) for every prompt.
            n_threads_batch=threads,
            # Not False: that silences the whole process while the model loads (see
            # _ThisThreadToLog); its notes go to the log instead.
            verbose=True,
        )
        if spec.embedding:
            # llama.cpp pools any model's hidden states; a chat model's too.
            kwargs.update(embedding=True, pooling_type=getattr(
                llama_cpp, f"LLAMA_POOLING_TYPE_{settings.pooling.upper()}"))
        if settings.chat_format:
            kwargs["chat_format"] = settings.chat_format
        if settings.mmproj:
            handler_name = settings.options.get("chat_handler", "MTMDChatHandler")
            handler_cls = getattr(llama_cpp.llama_chat_format, handler_name, None)
            if handler_cls is None:
                raise BackendError(f"model {spec.name!r}: options.chat_handler {handler_name!r} "
                                   "is not a llama_cpp.llama_chat_format handler")
            kwargs["chat_handler"] = handler_cls(clip_model_path=settings.mmproj, verbose=False)
        kwargs.update({k: v for k, v in settings.options.items() if k != "chat_handler"})
        try:
            with _prints_to_log(), _model_params(llama_cpp,
                                                 repack=repack_weights(settings.repack)):
                llama = llama_cpp.Llama(**kwargs)
        except Exception as exc:
            log.debug("llama-cpp-python failed on %s", spec.path, exc_info=True)
            raise ModelLoadError(f"model {spec.name!r}: llama-cpp-python could not load "
                                 f"{Path(spec.path).name}: {type(exc).__name__}",
                                 spec.name) from None
        # Loaded: from here on, verbose would only print per-request notes and timings.
        llama.verbose = False
        return LlamaCppModel(spec, llama)


@hookimpl(trylast=True)
def register_backends(register):
    register("llama_cpp", LlamaCppBackend())
