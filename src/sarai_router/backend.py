"""What a model backend provides. Backends are registered by plugins (``register_backends``).

The core never asks for a backend by name: everything it needs to know about a model
(how many requests one instance takes, its RAM, whether its files are here, what it can
take) it asks the model's backend through :class:`Backend`.
"""

from __future__ import annotations

from typing import (TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Mapping,
                    Protocol, Sequence)

import attrs

from .errors import BackendError, ContextLengthError
from .sampling import BUILTIN_SAMPLING, SAMPLING_KEYS, Sampling
from .types import AudioInput, ChatRequest, ImageInput

if TYPE_CHECKING:
    from .config import Config, ModelSpec

__all__ = ["AsyncLoadedModel", "Backend", "BackendError", "BUILTIN_SAMPLING", "Capabilities",
           "ContextLengthError", "Delta", "GenerationParams", "LoadedModel", "Presence",
           "SAMPLING_KEYS", "TokenLogprob", "ToolCall", "Usage", "blocking_chat", "model_deltas",
           "model_sampling"]


@attrs.frozen
class GenerationParams(Sampling):
    """What one request asks of a generation.

    A sampling setting left ``None`` takes the model's default: ``Engine.stream`` fills in
    ``[models.NAME]`` and the model file's recommendation before the backend sees them; an
    in-process backend takes ``BUILTIN_SAMPLING`` for what is still unset, a remote one
    leaves it to its server.

    ``tools``, ``tool_choice``, ``response_format`` and ``logprobs`` follow OpenAI's chat
    shapes (plain dicts, already checked by the front end). A backend whose
    ``capabilities`` lack one of them never sees it: the request is refused first
    (``ChatRequest.needs``).
    """

    max_tokens: int | None = None  # None: the model's configured max_tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: OpenAI function tools: ``{"type": "function", "function": {"name", "description",
    #: "parameters"}}``; empty when the request offers none (or ``tool_choice`` is "none")
    tools: tuple[Mapping[str, Any], ...] = ()
    #: "auto", "required", or ``{"type": "function", "function": {"name": NAME}}``
    tool_choice: str | Mapping[str, Any] = "auto"
    #: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``;
    #: None for free text
    response_format: Mapping[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (0..20), with ``logprobs``
    #: Returns True once the generation should end as soon as it can (the runaway guard
    #: says it repeats itself). A backend that honours it ends the answer cleanly (its
    #: usage counted); one that doesn't is closed by the engine a few pieces later.
    stop_check: Callable[[], bool] | None = attrs.field(default=None, eq=False, repr=False)
    #: The answer's ``time_budget.TimeBudget`` (None: unbounded). A backend that samples
    #: tokens itself calls its ``check`` before each token and ``add_sampling`` after;
    #: the engine checks it between pieces whatever the backend.
    time_budget: Any = attrs.field(default=None, eq=False, repr=False)

    def with_defaults(self, defaults: Mapping[str, Any]) -> "GenerationParams":
        """These params with every unset sampling setting taken from ``defaults``."""
        missing = {key: defaults[key] for key in SAMPLING_KEYS
                   if getattr(self, key) is None and defaults.get(key) is not None}
        return attrs.evolve(self, **missing) if missing else self

    def sampling(self) -> dict[str, Any]:
        """The sampling settings, by name (``None`` where unset)."""
        return {key: getattr(self, key) for key in SAMPLING_KEYS}


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class ToolCall:
    """A function call the model asked for: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@attrs.frozen
class TokenLogprob:
    """One generated token with its log probability and the most likely alternatives
    (``top``: ``(token, logprob, bytes)`` each, most likely first)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@attrs.frozen
class Delta:
    """One streamed piece of an answer. The last one has ``finish_reason`` and ``usage``,
    and ``tool_calls`` when the model called tools (finish reason "tool_calls").

    ``logprobs``: the tokens of ``text``, when the request asked for them.
    ``placement``: on the last one, where a model with several replicas sent the request
    (``endpoint``, ``balance``, ``prefix``: "hit", "miss" or None), for the trace.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    placement: Mapping[str, Any] | None = None


@attrs.frozen
class Capabilities:
    """What one configured model can take, as its backend reports it."""

    modalities: tuple[str, ...] = ("text",)
    context_length: int = 0
    tools: bool = False
    json_schema: bool = False
    logprobs: bool = False


@attrs.frozen
class Presence:
    """Whether a model's files are here, and if not whether ``models pull`` can fetch them."""

    present: bool
    fetchable: bool = False
    detail: str = ""


class LoadedModel(Protocol):
    """A loaded model streams its answers with ``chat`` (blocking: the engine runs it on a
    thread of its own, one per generation) or with ``achat`` (:class:`AsyncLoadedModel`:
    on the event loop, no thread); a model that has ``achat`` need not have ``chat``."""

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams,
        *,
        images: Sequence[ImageInput] = (),
        audio: AudioInput | None = None,
    ) -> Iterator[Delta]:
        """Stream the answer to ``messages``; at most ``concurrency`` at once per instance."""

    def close(self) -> None:
        """Release the model's memory (or stop its process)."""


class AsyncLoadedModel(Protocol):
    """A loaded model that streams on the event loop (``Backend.async_chat``)."""

    def achat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams,
        *,
        images: Sequence[ImageInput] = (),
        audio: AudioInput | None = None,
    ) -> AsyncIterator[Delta]:
        """``chat`` as an async generator; closing it (or cancelling its consumer) ends the
        upstream request."""

    def close(self) -> None:
        """Release the model's memory (or stop its process)."""


def blocking_chat(model: Any, request: ChatRequest,
                  params: GenerationParams) -> Callable[[], Iterator[Delta]] | None:
    """What starts a loaded model's blocking ``chat`` (llama.cpp, a plugin's model); None
    when it has ``achat`` (a remote endpoint: no thread). The one place a sync backend
    meets the async path: its deltas come through :func:`model_deltas`, or for a sync
    caller through :class:`runner.OnCaller`."""
    if hasattr(model, "achat"):
        return None
    return lambda: model.chat(request.messages, params, images=request.images,
                              audio=request.audio)


def model_deltas(model: Any, request: ChatRequest, params: GenerationParams, *,
                 name: str = "") -> AsyncIterator[Delta]:
    """A loaded model's answer as an async iterator of Deltas: its ``achat`` when it has
    one, else its blocking ``chat`` on a thread of its own."""
    from . import runner  # asyncio: not for `route`, which imports this module too

    start = blocking_chat(model, request, params)
    if start is None:
        return model.achat(request.messages, params, images=request.images,
                           audio=request.audio)
    return runner.iterate_in_thread(start, name=f"sarai-gen-{name}")


class Backend:
    """The base of a backend: override what differs from these defaults.

    ``settings_class``: an attrs class for the backend's own keys in ``[models.NAME]``
    (structured strictly; unknown keys are errors naming the key). Fields marked with
    ``metadata=config.PATH_SETTING`` are resolved like ``path``.
    """

    settings_class: type | None = None

    def load(self, spec: "ModelSpec") -> LoadedModel:
        """Load ``spec``; raise BackendError with a clear message on failure."""
        raise NotImplementedError

    def check(self, spec: "ModelSpec", *, config: "Config",
              check_files: bool) -> Iterable[tuple[str, str]]:
        """Problems with ``spec`` as ``(key, message)``; ``check_files`` for ``config check``."""
        return ()

    def concurrency(self, spec: "ModelSpec") -> int:
        """How many requests one loaded instance takes at once."""
        return 1

    def uses_threads(self, spec: "ModelSpec") -> bool:
        """Whether the model computes on this machine's cores in the router's process tree,
        so that a server shares them out (``with_threads``)."""
        return False

    def with_threads(self, spec: "ModelSpec", threads: int) -> "ModelSpec":
        """``spec`` using ``threads`` cores when the user left its thread count automatic."""
        return spec

    def estimate_ram_mb(self, spec: "ModelSpec") -> float:
        """RAM the loaded model will take in this machine, 0 when unknown or remote."""
        return 0.0

    def presence(self, spec: "ModelSpec") -> Presence:
        """Whether the model's files are here (a remote model always is)."""
        return Presence(present=True)

    def describe(self, spec: "ModelSpec") -> Mapping[str, Any]:
        """Backend-specific facts for ``models list --json`` (e.g. a RAM breakdown)."""
        return {}

    def capabilities(self, spec: "ModelSpec") -> Capabilities:
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx)

    def async_chat(self, spec: "ModelSpec") -> bool:
        """Whether the loaded model offers ``async def achat(...)`` (an async generator of
        Deltas, same arguments as ``chat``): it streams on the event loop with no thread,
        and a bench may call its endpoint directly. The engine looks for ``achat`` on the
        loaded model itself; one without it runs its ``chat`` on a thread of its own."""
        return False

    def probe(self, spec: "ModelSpec") -> Mapping[str, Any]:
        """Live health of a remote model's endpoints (``models list``); empty when local."""
        return {}

    def sampling_defaults(self, spec: "ModelSpec") -> Mapping[str, float]:
        """The sampling the model's author recommends (names from ``SAMPLING_KEYS``), e.g.
        from a GGUF's ``general.sampling.*`` keys; empty when the model says nothing."""
        return {}


def model_sampling(spec: "ModelSpec", backend: "Backend") -> dict[str, Any]:
    """``spec``'s sampling defaults: its ``[models.NAME]`` keys, else what the model file
    recommends (the backend's ``sampling_defaults``). What neither sets is left out (an
    in-process backend then takes ``BUILTIN_SAMPLING``, a remote server its own)."""
    from_file = {key: value for key, value in dict(backend.sampling_defaults(spec)).items()
                 if key in SAMPLING_KEYS and value is not None}
    from_config = {key: getattr(spec, key) for key in SAMPLING_KEYS
                   if getattr(spec, key, None) is not None}
    return {**from_file, **from_config}


#: A backend as plugins register it: an instance of :class:`Backend` or anything shaped so.
BackendFactory = Backend

_PROTOCOL = ("settings_class", "load", "check", "concurrency", "uses_threads", "with_threads",
             "estimate_ram_mb", "presence", "describe", "capabilities", "async_chat", "probe",
             "sampling_defaults")


class LazyBackend(Backend):
    """A backend whose module is imported the first time it is asked anything (its
    settings class to bind a model's keys, a load...)."""

    def __init__(self, module: str, class_name: str):
        self._where = (module, class_name)
        self._real: Backend | None = None

    def real(self) -> Backend:
        if self._real is None:
            import importlib

            module, class_name = self._where
            self._real = getattr(importlib.import_module(module), class_name)()
        return self._real

    @property  # type: ignore[override]
    def settings_class(self) -> type | None:  # noqa: D102
        return self.real().settings_class

    def __getattr__(self, name: str) -> Any:  # what a backend offers beyond the protocol
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real(), name)


def _delegate(name: str):
    def method(self: LazyBackend, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.real(), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = getattr(Backend, name).__doc__
    return method


for _name in _PROTOCOL[1:]:
    setattr(LazyBackend, _name, _delegate(_name))


def as_backend(factory: Any) -> Backend:
    """A registered factory as a :class:`Backend`: what it doesn't define takes the defaults,
    so a plain object with ``load(spec)`` is a whole backend."""
    if isinstance(factory, Backend):
        return factory
    adapted = Backend()
    for name in _PROTOCOL:
        if hasattr(factory, name):
            setattr(adapted, name, getattr(factory, name))
    adapted.wrapped = factory  # type: ignore[attr-defined]
    return adapted

