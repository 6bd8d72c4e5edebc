"""Every error sarai-router raises on purpose, under one base.

Front ends catch ``SaraiError`` and translate it into their own output: the CLI into an
exit code and a message, the chat REPL into a line, the server into an HTTP status. Each
message names what is wrong and where (file, key, model, argument).
"""

from __future__ import annotations

from typing import Iterable


class SaraiError(Exception):
    """The base of every error sarai-router raises on purpose."""


class ConfigError(SaraiError):
    """One or more problems in a config file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(SaraiError):
    """A plugin broke a contract (e.g. routed to a model that isn't configured)."""


class RoutingError(SaraiError):
    """Routing produced no usable model; the message names the plugin and the model."""


class CapabilityError(SaraiError):
    """The chosen model cannot take what the request carries (an image, audio, tools...).

    ``missing``: what is missing, in words (``image input``, ``tools``...).
    """

    def __init__(self, message: str, *, missing: tuple[str, ...] = ()):
        super().__init__(message)
        self.missing = missing


class TranscriptionUnavailable(CapabilityError):
    """Audio must be transcribed but cannot be: no speech-to-text plugin, its extra not
    installed, its model not usable. The message says what to install or set."""


class AudioError(SaraiError):
    """The attached audio cannot be used: not audio, empty or silent, too long, or a format
    that cannot be decoded. The message names the clip and the problem (bad input).

    ``param``: the request field at fault when it is not the clip itself (``language``).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class TranscriptionTimeout(SaraiError):
    """A transcription did not finish within its time (``[plugins.whisper]
    timeout_seconds``); the work was stopped."""


class AttachmentError(SaraiError):
    """A file given as an attachment (``--image``, ``--audio``) can't be taken: not a regular
    file (a FIFO, a device, a directory), too large, or unreadable. The message names it."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class BackendError(SaraiError):
    """A backend could not load a model or generate; the message says which and why."""


class ModelLoadError(BackendError):
    """A model's files could not be loaded (unreadable, not a model, wrong format).

    ``model`` names it, so that a front end can say which without repeating the message,
    which may name files.
    """

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


class InvalidRequest(SaraiError):
    """Something in the request the model cannot work with (e.g. a JSON schema its grammar
    converter refuses): the client's to fix. ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(BackendError):
    """The request does not fit the model's context window (bad input, not a fault)."""


class UpstreamError(BackendError):
    """A remote endpoint refused the request with a client error (4xx).

    The server answers with the same ``status`` and the upstream's message (credentials
    removed): the request itself is the problem, so no other model is tried.
    """

    def __init__(self, message: str, *, status: int, code: str = "upstream_error"):
        super().__init__(message)
        self.status = status
        self.code = code


class UpstreamUnavailable(BackendError):
    """A remote endpoint could not answer before the first token: refused connection, 5xx,
    timeout, dropped connection, or every endpoint cooling down.

    The engine tries the model's ``fallbacks`` on this error (never after a token was sent);
    with none left the server answers ``status`` (502, 503 or 504). ``reason`` is a short,
    bounded label (``refused``, ``http_503``, ``timeout``, ``cooldown``...) for the trace
    and the ``sarai_fallbacks_total`` metric.
    """

    def __init__(self, message: str, *, reason: str, status: int = 502,
                 retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class PoolError(SaraiError):
    """A model cannot be made resident (budget, limits, or every other model busy)."""


class QueueFull(PoolError):
    """Too many requests already wait for this model's instance (``[server] queue_size``)."""

    def __init__(self, model: str, limit: int):
        self.model = model
        self.limit = limit
        super().__init__(f"model {model!r} is busy and {limit} request"
                         f"{'s' if limit != 1 else ''} already wait for it "
                         "([server] queue_size); try again shortly")


class ModelPinned(PoolError):
    """An unload asked for a pinned model: the config holds it resident for good."""


class ModelBusy(PoolError):
    """An unload waited for the model's requests to end, and they did not in time."""


class InstanceDead(BackendError):
    """A loaded instance is gone (its process crashed or was killed).

    The pool drops the resident on this error (a ``crash`` event), so the next request
    loads the model again instead of failing against a dead instance.
    """


class Cancelled(SaraiError):
    """The request was cancelled (its client left, or the server is shutting down) before
    its generation started; the model was not touched."""


class FetchError(SaraiError):
    """A model could not be fetched or failed verification; the message says what to do."""

    def __init__(self, message: str, model: str | None = None):
        super().__init__(message)
        self.model = model


class ModelFileMissing(FetchError):
    """A model's file is not there and no known source can fetch it."""


def not_configured(name: str, configured: Iterable[str], who: str = "") -> str:
    """The one wording for a model name that the config does not define."""
    known = ", ".join(sorted(configured)) or "none"
    lead = f"{who} unknown model" if who else "unknown model"
    return f"{lead} {name!r}, which is not configured (configured: {known})"
