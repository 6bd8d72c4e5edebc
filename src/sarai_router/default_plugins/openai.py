"""Default backend ``openai``: any OpenAI-compatible endpoint (llama-server, vLLM, Ollama,
LM Studio, llama-cpp-python's server, a hosted API), streamed through httpx.

A model of this backend is "loaded" when its HTTP clients exist; nothing runs in the
router's process but the proxying. Requests stream from ``POST {base_url}/chat/completions``
with ``stream: true`` and ``stream_options.include_usage``.

``endpoints = [...]`` lists replicas of one model. Each request goes to the least busy
healthy replica (with ``balance = "prefix"``, a conversation's follow-up goes to the
replica that served its history: see ``balance``); a replica that refuses, answers 5xx, or
times out before the first token cools down (1 s, doubling per consecutive failure, at
most ``max_cooldown_seconds``) and is tried again by the first request after its cooldown
(one at a time until it answers).

Nothing here puts a credential in an error or a log line: URLs are shown without userinfo
and query, and the API key's value is removed from any upstream message.

``httpx`` is imported on the first load only, so ``route`` and ``--help`` stay instant.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from contextlib import aclosing
from typing import (TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping,
                    Sequence)
from urllib.parse import urlsplit, urlunsplit

import attrs

from ..backend import (Backend, BackendError, Capabilities, Delta, GenerationParams,
                       TokenLogprob, ToolCall, Usage)
from ..config import Config, ModelSpec
from ..errors import ContextLengthError, UpstreamError, UpstreamUnavailable
from ..hookspecs import hookimpl
from ..types import CHARS_PER_TOKEN, AudioInput, ImageInput
from .balance import (BalanceSettings, PrefixIndex, PrefixKey, balance_problems,
                      prefix_key)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: What an upstream may be asked for beyond text; ``capabilities = [...]`` narrows it.
FEATURES = ("tools", "json_schema", "logprobs")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@attrs.frozen
class OpenAISettings(BalanceSettings):
    """The ``openai`` backend's own keys in ``[models.NAME]`` (and ``balance`` & co. for
    ``endpoints``)."""

    #: the endpoint's OpenAI base URL, e.g. ``http://127.0.0.1:8080/v1``
    base_url: str = ""
    #: replicas of the same model: each an OpenAI base URL (``base_url`` alone is one)
    endpoints: tuple[str, ...] = ()
    #: the model name sent upstream (default: the model's table name)
    remote_model: str = ""
    #: the environment variable holding the API key (sent as ``Authorization: Bearer``)
    api_key_env: str = ""
    #: connect/read timeout, and the longest wait for the first token (which includes
    #: any time the request queues inside the upstream)
    timeout_seconds: float = 300.0
    #: requests one endpoint takes at once (the pool admits this x the endpoints): the
    #: upstream's own parallelism (llama-server --parallel) plus a few, so that it never
    #: waits for the router between answers and the rest queue here
    max_concurrency: int = 16
    #: extra HTTP headers sent with every request
    headers: dict[str, str] = attrs.field(factory=dict)
    #: what the upstream can do beyond text: a subset of tools, json_schema, logprobs
    capabilities: tuple[str, ...] = FEATURES
    #: the longest cooldown of a failing endpoint (it starts at 1 s and doubles)
    max_cooldown_seconds: float = 60.0
    #: the longest one answer may take from the request to its end, whatever the upstream
    #: does (a stream that trickles, or keeps the connection alive with comments)
    total_timeout_seconds: float = 1800.0


def _collect_calls(pieces: Any, calls: dict[int, dict[str, str]]) -> bool:
    """Add a chunk's ``delta.tool_calls`` pieces to ``calls`` (OpenAI streams a call's id
    and name once, its arguments in pieces); whether there were any."""
    if not isinstance(pieces, list):
        return False
    for piece in pieces:
        if not isinstance(piece, Mapping):
            continue
        index = piece.get("index") if isinstance(piece.get("index"), int) else len(calls)
        call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        function = piece.get("function") if isinstance(piece.get("function"), Mapping) else {}
        if isinstance(piece.get("id"), str):
            call["id"] = piece["id"]
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                call[key] += function[key]
    return bool(pieces)


def _token_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """A chunk's ``logprobs.content`` as TokenLogprobs; () when absent or malformed."""
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        return ()

    def raw(item: Mapping[str, Any]) -> tuple[int, ...]:
        given = item.get("bytes")
        return tuple(given) if isinstance(given, list) else tuple(str(item["token"]).encode())

    try:
        return tuple(TokenLogprob(token=str(item["token"]), logprob=float(item["logprob"]),
                                  bytes=raw(item),
                                  top=tuple((str(t["token"]), float(t["logprob"]), raw(t))
                                            for t in item.get("top_logprobs") or ()))
                     for item in content)
    except (KeyError, TypeError, ValueError):
        return ()


def settings_urls(settings: OpenAISettings) -> tuple[str, ...]:
    return settings.endpoints or ((settings.base_url,) if settings.base_url else ())


def redact_url(url: str) -> str:
    """``url`` without userinfo, query and fragment: what may appear in a message or log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable URL>"


class Redactor:
    """Removes the secrets of one model (API key, header values, URL userinfo/query)."""

    def __init__(self, secrets: Iterable[str]):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


def _url_secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.query, parts.fragment]
    if parts.username:
        found.append(parts.username)
    if parts.password:
        found.append(parts.password)
    for pair in parts.query.split("&"):
        found.append(pair.partition("=")[2])
    return found


class _HttpxLogRedaction(logging.Filter):
    """httpx logs every request's full URL at INFO; a query token would go with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(redact_url(str(a)) if _looks_like_url(a) else a
                                for a in (record.args if isinstance(record.args, tuple)
                                          else (record.args,)))
        return True


def _looks_like_url(value: Any) -> bool:
    text = str(value)
    return type(value).__name__ == "URL" or text.startswith(("http://", "https://"))


_log_filter_installed = False


def _install_log_filter() -> None:
    global _log_filter_installed
    if not _log_filter_installed:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).addFilter(_HttpxLogRedaction())
        _log_filter_installed = True


# -- replicas --------------------------------------------------------------------------

BASE_COOLDOWN_SECONDS = 1.0


def endpoint_url(base_url: str, path: str) -> str:
    """``{base_url}/{path}`` keeping the base URL's query (``?api-version=...``) at the end."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{path}",
                       parts.query, ""))


@attrs.define(eq=False)
class Replica:
    """One endpoint of a model and what the router knows of its health (this process only)."""

    url: str
    shown: str  # the URL as it may be shown
    chat_url: str = ""
    inflight: int = 0
    failures: int = 0  # consecutive
    cooldown_until: float = 0.0
    last_error: str = ""
    requests: int = 0
    errors: int = 0
    #: time.monotonic() of the latest token any stream got from it
    last_token_at: float = 0.0

    def state(self, now: float) -> str:
        if now < self.cooldown_until:
            return "cooling"
        return "probing" if self.failures else "healthy"

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"url": self.shown, "state": self.state(now), "inflight": self.inflight,
                "consecutive_failures": self.failures,
                "cooldown_seconds_left": round(max(0.0, self.cooldown_until - now), 2),
                "last_error": self.last_error or None, "requests": self.requests,
                "errors": self.errors}


class ReplicaSet:
    """Least-busy (or prefix-affine) choice among healthy replicas, with exponential
    cooldowns (thread-safe: the sync path runs on worker threads, the async one on the
    event loop)."""

    def __init__(self, urls: Sequence[str], *, max_cooldown: float,
                 clock=time.monotonic, balance: BalanceSettings | None = None):
        self.replicas = [Replica(url=u, shown=redact_url(u),
                                 chat_url=endpoint_url(u, "chat/completions")) for u in urls]
        self.max_cooldown = max_cooldown
        #: ``balance = "prefix"`` with more than one replica: where each prefix was served
        self.balance = balance if balance is not None and balance.balance == "prefix" \
            and len(self.replicas) > 1 else None
        self.index = None if self.balance is None else PrefixIndex(
            self.balance.prefix_index_blocks)
        self.clock = clock
        self._lock = threading.Lock()
        self._turn = 0  # rotates ties so equally busy replicas share the load

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The least busy replica that may take a request now, counted in; None if none."""
        return self.choose(exclude)[0]

    def choose(self, exclude: Sequence[Replica] = (),
               key: PrefixKey | None = None) -> tuple[Replica | None, str]:
        """The replica for a request, counted in, and how it was placed: ``"hit"`` (it
        holds the request's prefix), ``"miss"`` (a request with history placed least busy)
        or ``""`` (no prefix balancing for it). None if no replica may take it now.

        A replica whose cooldown is over takes the next request, to probe it; otherwise the
        prefix's replica (``balance = "prefix"``, see :mod:`.balance`) or the least busy.
        """
        with self._lock:
            now = self.clock()
            n = len(self.replicas)
            best: Replica | None = None
            probe = False
            for i in range(n):
                replica = self.replicas[(self._turn + i) % n]
                if replica in exclude or now < replica.cooldown_until:
                    continue
                if replica.failures:
                    if replica.inflight:
                        continue  # probing: one request at a time until it answers
                    best, probe = replica, True  # its cooldown is over: it probes
                    break
                if best is None or replica.inflight < best.inflight:
                    best = replica
            placed = ""
            if best is not None and not probe and key is not None and self.index is not None:
                best, placed = self._by_prefix(key, best, exclude)
            if best is not None:
                self._turn = (self._turn + 1) % n
                best.inflight += 1
                best.requests += 1
                if key is not None and self.index is not None:
                    self.index.record(key, best)
            return best, placed

    def _by_prefix(self, key: PrefixKey, least: Replica,
                   exclude: Sequence[Replica]) -> tuple[Replica, str]:
        """The replica of ``key``'s history when it may take it, else ``least``."""
        if not key.history:
            return least, ""
        assert self.index is not None and self.balance is not None
        owner, matched = self.index.longest(key)
        if (not isinstance(owner, Replica) or owner in exclude or owner.failures
                or matched < self.balance.prefix_min_match * key.history_chars):
            return least, "miss"
        overloaded = (owner.inflight - least.inflight > self.balance.prefix_overload_inflight
                      and owner.inflight > least.inflight * self.balance.prefix_overload_ratio)
        return (least, "miss") if overloaded else (owner, "hit")

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1

    def succeeded(self, replica: Replica) -> None:
        with self._lock:
            if replica.failures:
                log.info("endpoint %s answers again", replica.shown)
            replica.failures = 0
            replica.cooldown_until = 0.0

    def failed(self, replica: Replica, error: str) -> float:
        """Cool ``replica`` down; returns the cooldown in seconds.

        Requests that were already in flight when it started failing fail together: they
        are one outage, so a replica already cooling down keeps its cooldown.
        """
        with self._lock:
            now = self.clock()
            replica.errors += 1
            replica.last_error = error
            if now < replica.cooldown_until:
                return replica.cooldown_until - now
            replica.failures += 1
            cooldown = min(self.max_cooldown,
                           BASE_COOLDOWN_SECONDS * 2 ** (replica.failures - 1))
            replica.cooldown_until = now + cooldown
            if self.index is not None:
                self.index.forget(replica)
        log.warning("endpoint %s failed (%s); cooling down for %.0f s", replica.shown, error,
                    cooldown)
        return cooldown

    def next_ready_in(self) -> float:
        with self._lock:
            now = self.clock()
            return max(0.0, min((r.cooldown_until - now for r in self.replicas), default=0.0))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            return [r.snapshot(now) for r in self.replicas]


# -- the loaded model --------------------------------------------------------------------


class _Attempt:
    """One request to one replica: what its answer taught us so far."""

    __slots__ = ("replica", "placed", "started", "usage", "finish_reason", "pieces",
                 "produced", "calls", "done", "chunks", "max_chunks", "cut")

    def __init__(self, replica: Replica, placed: str = "", max_chunks: int = 0) -> None:
        self.replica = replica
        #: how the replica was chosen: "hit" / "miss" (balance = "prefix"), else ""
        self.placed = placed
        self.started = time.monotonic()
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.pieces = 0
        self.produced = False
        #: tool calls streamed so far, by index: id, name and the arguments' pieces
        self.calls: dict[int, dict[str, str]] = {}
        #: the upstream sent ``data: [DONE]``
        self.done = False
        #: chunks that carried text or a tool call's piece, and how many max_tokens allows
        #: (an upstream sends one token a chunk; 0: no limit)
        self.chunks = 0
        self.max_chunks = max_chunks
        #: the router ended the answer at max_tokens (the upstream kept going)
        self.cut = False


class _Failover:
    """The replicas one request tries, in turn, until one answers."""

    def __init__(self, model: "OpenAIModel", max_tokens: int = 0,
                 key: PrefixKey | None = None):
        self.model = model
        self.max_tokens = max_tokens
        #: the request's prefix, when its replica is chosen by prefix
        self.key = key
        self.tried: list[tuple[Replica, UpstreamUnavailable]] = []

    def next(self) -> _Attempt | None:
        replica, placed = self.model.replicas.choose(exclude=[r for r, _ in self.tried],
                                                     key=self.key)
        return None if replica is None else _Attempt(replica, placed, self.max_tokens)

    def refused(self, attempt: _Attempt, status: int, raw: bytes) -> None:
        """An HTTP error status: raise a 4xx as is; note a 5xx, so the next replica is tried."""
        error = self.model._status_error(attempt.replica, status, raw)
        if not isinstance(error, UpstreamUnavailable):
            raise error
        self._failed(attempt, error)

    def failed(self, attempt: _Attempt, exc: BaseException) -> None:
        """``exc`` ended ``attempt``: re-raise what no other replica can fix; note the rest."""
        model = self.model
        if isinstance(exc, (UpstreamError, ContextLengthError)):
            raise exc
        if not isinstance(exc, _MidStreamError) and not _is_transport(exc):
            raise exc
        why = str(exc) if isinstance(exc, _MidStreamError) else type(exc).__name__
        if attempt.produced:  # too late for another replica or model
            model.replicas.failed(attempt.replica, f"stream broke: {why}")
            raise BackendError(f"model {model.spec.name!r}: endpoint {attempt.replica.shown} "
                               f"stopped after {attempt.pieces} pieces: {why}") from None
        if isinstance(exc, _MidStreamError):
            error = UpstreamUnavailable(
                f"model {model.spec.name!r}: endpoint {attempt.replica.shown} failed before "
                f"the first token: {why}",
                reason="invalid_stream" if isinstance(exc, _BadStream) else "upstream_error")
        else:
            error = model._error(attempt.replica, exc)
        self._failed(attempt, error)

    def _failed(self, attempt: _Attempt, error: UpstreamUnavailable) -> None:
        replica = attempt.replica
        if error.reason == "timeout" and replica.last_token_at > attempt.started:
            # Other streams got tokens from it meanwhile: busy (its own queue), not dead.
            # This request gives up on it; the others need not.
            log.info("endpoint %s is busy: no first token within %g s", replica.shown,
                     self.model.settings.timeout_seconds)
        else:
            self.model.replicas.failed(replica, str(error))
        self.tried.append((replica, error))

    def exhausted(self) -> UpstreamUnavailable:
        return self.model._unavailable(self.tried)


class OpenAIModel:
    """A model served by OpenAI-compatible endpoints, streamed on the event loop (``achat``)
    with pooled keep-alive connections per loop, the replicas' health shared."""

    #: sampling sent when set (the model's defaults or the request's); the rest is left to
    #: the endpoint. ``llama_server`` adds llama.cpp's own keys (top_k, min_p, ...).
    sampling_keys: tuple[str, ...] = ("temperature", "top_p", "presence_penalty",
                                      "frequency_penalty")

    def __init__(self, spec: ModelSpec, api_key: str):
        settings: OpenAISettings = spec.settings
        self.spec = spec
        self.settings = settings
        self.remote_model = settings.remote_model or spec.name
        self.urls = settings_urls(settings)
        self.replicas = ReplicaSet(self.urls, max_cooldown=settings.max_cooldown_seconds,
                                   balance=settings)
        self.headers = {"content-type": "application/json", "accept": "text/event-stream",
                        **settings.headers}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        secrets = [api_key, *settings.headers.values()]
        for url in self.urls:
            secrets.extend(_url_secrets(url))
        self.redact = Redactor(secrets)
        self._lock = threading.Lock()
        #: for ``embed`` (a blocking call, not a stream)
        self._client: httpx.Client | None = None
        #: event loop id -> (the loop, its httpx.AsyncClient)
        self._aclients: dict[int, tuple[Any, Any]] = {}
        self._closed = False

    # -- clients

    def _limits(self):
        import httpx

        total = self.settings.max_concurrency * len(self.urls)
        return httpx.Limits(max_connections=total + 4, max_keepalive_connections=total + 4)

    def _timeout(self):
        import httpx

        t = self.settings.timeout_seconds
        return httpx.Timeout(t, connect=min(t, 10.0))

    def client(self) -> "httpx.Client":
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(limits=self._limits(), timeout=self._timeout(),
                                            headers=self.headers, trust_env=False)
            return self._client

    def aclient(self):
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._aclients.get(id(loop))
            if held is None:
                held = self._aclients[id(loop)] = (loop, httpx.AsyncClient(
                    limits=self._limits(), timeout=self._timeout(), headers=self.headers,
                    trust_env=False))
            return held[1]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            aclients, self._aclients = list(self._aclients.values()), {}
        if client is not None:
            client.close()
        for loop, aclient in aclients:
            _close_async_client(loop, aclient)

    # -- requests

    def body(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams,
             images: Sequence[ImageInput], audio: AudioInput | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.remote_model,
            "messages": _with_media(messages, images, audio),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens or self.spec.max_tokens,
        }
        body.update({key: getattr(params, key) for key in self.sampling_keys
                     if getattr(params, key) is not None})
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        # Only what the request asked for: a strict upstream refuses tool_choice without
        # tools and top_logprobs without logprobs (GenerationParams holds their defaults).
        if params.tools:
            body["tools"] = list(params.tools)
            body["tool_choice"] = params.tool_choice
        if params.response_format is not None:
            body["response_format"] = params.response_format
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        return body

    def prefix_key(self, messages: Sequence[Mapping[str, Any]],
                   params: GenerationParams) -> PrefixKey | None:
        """The request's blocks when its replica is chosen by prefix, else None."""
        if self.replicas.index is None:
            return None
        return prefix_key(messages, params.tools)

    def placement(self, attempt: _Attempt) -> dict[str, Any] | None:
        """Where the request went, for the trace: None for a single endpoint."""
        if len(self.replicas.replicas) < 2:
            return None
        return {"endpoint": attempt.replica.shown, "balance": self.settings.balance,
                "prefix": attempt.placed or None}

    def direct_target(self) -> tuple[str, dict[str, str], str]:
        """Where the first endpoint takes chat requests, the headers it needs (credentials
        included: for a caller in this process only, never to be shown) and the model name:
        for a bench that calls the engine directly."""
        return self.replicas.replicas[0].chat_url, dict(self.headers), self.remote_model

    def health(self) -> dict[str, Any]:
        replicas = self.replicas.snapshot()
        healthy = sum(1 for r in replicas if r["state"] == "healthy")
        state = ("healthy" if healthy == len(replicas)
                 else "degraded" if any(r["state"] != "cooling" for r in replicas)
                 else "down")
        return {"state": state, "remote_model": self.remote_model, "endpoints": replicas}

    def _unavailable(self, tried: list[tuple[Replica, UpstreamUnavailable]]) -> UpstreamUnavailable:
        if not tried:
            wait = self.replicas.next_ready_in()
            return UpstreamUnavailable(
                f"model {self.spec.name!r}: every endpoint is cooling down after failures "
                f"(next retry in {wait:.1f} s)", reason="cooldown", status=503,
                retry_after=max(1.0, wait))
        if len(tried) == 1:
            return tried[0][1]
        last = tried[-1][1]
        detail = "; ".join(str(e) for _, e in tried)
        return UpstreamUnavailable(detail, reason=last.reason, status=last.status)

    def _error(self, replica: Replica, exc: BaseException) -> UpstreamUnavailable:
        """A transport failure before the first token, as a fallback-able error."""
        import httpx

        where = f"model {self.spec.name!r}: endpoint {replica.shown}"
        if isinstance(exc, httpx.ConnectTimeout):
            return UpstreamUnavailable(f"{where} did not accept a connection within "
                                       f"{self.settings.timeout_seconds:g} s",
                                       reason="timeout", status=504)
        if isinstance(exc, (httpx.ConnectError, ConnectionRefusedError)):
            return UpstreamUnavailable(f"{where} refused the connection", reason="refused")
        if isinstance(exc, (httpx.TimeoutException, _FirstTokenTimeout)):
            return UpstreamUnavailable(
                f"{where} sent no token within timeout_seconds = "
                f"{self.settings.timeout_seconds:g}", reason="timeout", status=504)
        return UpstreamUnavailable(f"{where} dropped the connection before the first token "
                                   f"({type(exc).__name__})", reason="disconnected")

    def _status_error(self, replica: Replica, status: int,
                      raw: bytes) -> UpstreamError | UpstreamUnavailable:
        message = _upstream_message(raw, self.redact)
        where = f"model {self.spec.name!r}: endpoint {replica.shown}"
        if status >= 500:
            return UpstreamUnavailable(f"{where} answered {status}: {message}",
                                       reason=f"http_{status}", status=502)
        if status == 400 and _is_context_error(message):
            return ContextLengthError(f"model {self.spec.name!r}: upstream says: {message}")
        code = {401: "upstream_unauthorized", 403: "upstream_forbidden",
                404: "upstream_not_found", 429: "upstream_rate_limited"}.get(status,
                                                                           "upstream_error")
        return UpstreamError(f"{where} refused the request ({status}): {message}",
                             status=status, code=code)

    def _parse(self, line: str, attempt: _Attempt) -> Delta | None:
        """One SSE line to a text Delta (or None); fills ``attempt``. A line that is not
        server-sent events, or a chunk that is not a JSON chat completion chunk, raises
        _BadStream: an upstream that sends garbage must not read as an empty answer."""
        if not line.startswith("data:"):
            field = line.partition(":")[0]
            if line and not line.startswith(":") and field not in _SSE_FIELDS:
                raise _BadStream("it sent a line that is not server-sent events "
                                 f"({len(line)} characters)")
            return None  # comments (keep-alives), event names, blank separators
        data = line[5:].strip()
        if data == "[DONE]":
            attempt.done = True
            return None
        if not data:
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _BadStream("it sent a chunk that is not JSON") from None
        if not isinstance(chunk, Mapping):
            raise _BadStream("it sent a chunk that is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            raise _MidStreamError(_upstream_message(data.encode(), self.redact))
        try:
            return self._take_chunk(chunk, attempt)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _BadStream("it sent a chunk that is not a chat completion chunk") from None

    def _take_chunk(self, chunk: Mapping[str, Any], attempt: _Attempt) -> Delta | None:
        usage = chunk.get("usage")
        if isinstance(usage, Mapping) and usage.get("completion_tokens") is not None:
            attempt.usage = Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                  completion_tokens=int(usage["completion_tokens"]))
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                attempt.finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text is not None and not isinstance(text, str):
                raise TypeError("content")
            pieces = delta.get("tool_calls")
            if text or pieces:
                if attempt.max_chunks and attempt.chunks >= attempt.max_chunks:
                    # max_tokens reached and the upstream goes on: the router ends it.
                    attempt.cut = True
                    return None
                attempt.chunks += 1
            # Tool calls and logprobs were passed through: their answers come back too.
            called = _collect_calls(pieces, attempt.calls)
            logprobs = _token_logprobs(choice.get("logprobs"))
            if text:
                attempt.pieces += 1
            if text or called or logprobs:
                return Delta(text=text or "", logprobs=logprobs)
        return None

    def _final(self, attempt: _Attempt, messages: Sequence[Mapping[str, Any]]) -> Delta:
        usage = attempt.usage or Usage(prompt_tokens=estimate_prompt_tokens(messages),
                                       completion_tokens=attempt.pieces)
        if attempt.cut:
            usage = Usage(usage.prompt_tokens, attempt.pieces)
        calls = tuple(ToolCall(id=call["id"] or f"call_{index}", name=call["name"],
                               arguments=call["arguments"])
                      for index, call in sorted(attempt.calls.items()) if call["name"])
        if attempt.cut:
            finish = "length"  # a tool call cut at max_tokens is not one to run
        else:
            finish = "tool_calls" if calls else attempt.finish_reason or "stop"
        return Delta(text="", finish_reason=finish, usage=usage,
                     tool_calls=() if attempt.cut else calls,
                     placement=self.placement(attempt))

    def _check_time(self, attempt: _Attempt) -> float:
        """The seconds ``attempt`` may still take; raises when its time is up: before the
        first token after ``timeout_seconds``, in all after ``total_timeout_seconds``."""
        elapsed = time.monotonic() - attempt.started
        settings = self.settings
        if not attempt.produced and elapsed > settings.timeout_seconds:
            raise _FirstTokenTimeout()
        if elapsed > settings.total_timeout_seconds:
            if not attempt.produced:
                raise _FirstTokenTimeout()
            raise _MidStreamError(f"the answer did not end within total_timeout_seconds = "
                                  f"{settings.total_timeout_seconds:g}")
        left = settings.total_timeout_seconds - elapsed
        if not attempt.produced:
            left = min(left, settings.timeout_seconds - elapsed)
        return max(0.0, left)

    def _on_line(self, line: str, attempt: _Attempt) -> Delta | None:
        """One SSE line of ``attempt``'s answer: a text Delta, or None (and the deadlines
        checked)."""
        delta = self._parse(line, attempt)
        if delta is None:
            self._check_time(attempt)
            return None
        attempt.replica.last_token_at = time.monotonic()
        if not attempt.produced:
            attempt.produced = True
            self.replicas.succeeded(attempt.replica)
        self._check_time(attempt)
        return delta

    def _finish(self, attempt: _Attempt, messages: Sequence[Mapping[str, Any]]) -> Delta:
        if not (attempt.cut or attempt.done or attempt.finish_reason):
            raise _BadStream("the stream ended without a finish reason or [DONE] (cut)")
        self.replicas.succeeded(attempt.replica)
        return self._final(attempt, messages)

    def _max_tokens(self, body: Mapping[str, Any]) -> int:
        value = body.get("max_tokens")
        return value if isinstance(value, int) and value > 0 else 0

    def embed(self, inputs: Sequence[str | Sequence[int]], *,
              truncate: bool = True) -> tuple[list[list[float]], int]:
        """``POST {base_url}/embeddings`` (a model with ``embedding = true``) on the least
        busy healthy endpoint, the next one on a failure; the vectors and the prompt tokens.
        ``truncate`` is the endpoint's business (OpenAI's API has no such field)."""
        body = {"model": self.remote_model, "input": list(inputs), "encoding_format": "float"}
        client = self.client()
        failover = _Failover(self)
        while (attempt := failover.next()) is not None:
            url = endpoint_url(attempt.replica.url, "embeddings")
            try:
                response = client.post(url, json=body, headers={"accept": "application/json"})
                if response.status_code >= 400:
                    failover.refused(attempt, response.status_code, response.content)
                    continue
                try:
                    data = response.json()
                    rows = sorted(data["data"], key=lambda row: row["index"])
                    vectors = [[float(v) for v in row["embedding"]] for row in rows]
                    tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
                except (ValueError, KeyError, TypeError):
                    raise BackendError(f"model {self.spec.name!r}: endpoint "
                                       f"{attempt.replica.shown} answered /embeddings with "
                                       "something that is not OpenAI's shape") from None
                if len(vectors) != len(body["input"]):
                    raise BackendError(f"model {self.spec.name!r}: endpoint "
                                       f"{attempt.replica.shown} returned {len(vectors)} "
                                       f"vectors for {len(body['input'])} inputs")
                return vectors, tokens
            except Exception as exc:
                failover.failed(attempt, exc)
            finally:
                self.replicas.release(attempt.replica)
        raise failover.exhausted()

    async def achat(self, messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
                    images: Sequence[ImageInput] = (),
                    audio: AudioInput | None = None) -> AsyncIterator[Delta]:
        """Stream from the least busy healthy endpoint, trying the next one on a failure
        before the first token: one pooled async connection per stream, no thread.
        Cancelling the consumer (client gone) closes the upstream response."""
        body = self.body(messages, params, images, audio)
        client = self.aclient()
        failover = _Failover(self, self._max_tokens(body), self.prefix_key(messages, params))
        while (attempt := failover.next()) is not None:
            try:
                async with client.stream("POST", attempt.replica.chat_url,
                                         json=body) as response:
                    if response.status_code >= 400:
                        failover.refused(attempt, response.status_code,
                                         await _aread_capped(response.aiter_bytes()))
                        continue
                    async with aclosing(self._alines(response, attempt)) as lines:
                        async for line in lines:
                            if (delta := self._on_line(line, attempt)) is not None:
                                yield delta
                            if attempt.cut:
                                break
                yield self._finish(attempt, messages)
                return
            except Exception as exc:
                failover.failed(attempt, exc)
            finally:
                self.replicas.release(attempt.replica)
        raise failover.exhausted()

    async def _alines(self, response: Any, attempt: _Attempt) -> AsyncIterator[str]:
        """``response``'s SSE lines, each read within the time ``attempt`` has left: a
        silent upstream is cut at its deadline, not at the next read timeout."""
        import asyncio

        lines = _SSELines()
        chunks = response.aiter_bytes()
        try:
            while True:
                left = self._check_time(attempt)
                try:
                    if left > self.settings.timeout_seconds:
                        # httpx's read timeout (timeout_seconds) comes first: no timer task
                        # for each chunk of a long answer.
                        data = await chunks.__anext__()
                    else:
                        data = await asyncio.wait_for(chunks.__anext__(), timeout=left + 0.05)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    self._check_time(attempt)  # raises: the deadline has passed
                    raise _FirstTokenTimeout() from None
                for line in lines.feed(data):
                    yield line
            for line in lines.end():
                yield line
        finally:
            await chunks.aclose()


#: SSE field names besides ``data`` (https://html.spec.whatwg.org/#event-stream-interpretation)
_SSE_FIELDS = frozenset({"event", "id", "retry"})
#: The longest SSE line taken from an upstream, in bytes. A chunk with 20 top logprobs is
#: a few KB and a whole answer sent as one chunk a few hundred; a longer line is refused
#: as it arrives, never buffered whole.
MAX_SSE_LINE_BYTES = 1 << 20
#: The most of an upstream's error body read (its message is cut to 1,000 characters).
MAX_ERROR_BODY_BYTES = 64 * 1024


class _SSELines:
    """An upstream's bytes split into SSE lines (UTF-8, ``\\n`` or ``\\r\\n`` ended), at
    most MAX_SSE_LINE_BYTES each; _BadStream for bytes that are neither."""

    def __init__(self) -> None:
        #: the start of a line whose end has not come yet, in pieces (joined once, when
        #: it comes: an upstream that trickles a long line byte by byte costs O(n))
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def feed(self, data: bytes) -> list[str]:
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return []
        if self._pending:
            head = b"".join(self._pending) + data[:end]
            self._pending, self._pending_bytes = [], 0
        else:
            head = data[:end]
        self._hold(data[end + 1:])
        return self._lines(head)

    def end(self) -> list[str]:
        rest = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        return self._lines(rest) if rest else []

    def _hold(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > MAX_SSE_LINE_BYTES:
                raise _BadStream(f"it sent a line longer than {MAX_SSE_LINE_BYTES} bytes")

    @staticmethod
    def _lines(data: bytes) -> list[str]:
        """Whole lines, decoded at once (the common chunk is one event: two lines)."""
        if len(data) > MAX_SSE_LINE_BYTES and any(
                len(line) > MAX_SSE_LINE_BYTES for line in data.split(b"\n")):
            raise _BadStream(f"it sent a line longer than {MAX_SSE_LINE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadStream("it sent bytes that are not UTF-8 text") from None
        return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


async def _aread_capped(chunks: AsyncIterator[bytes]) -> bytes:
    """An error body, at most MAX_ERROR_BODY_BYTES of it."""
    out = b""
    async for data in chunks:
        out += data
        if len(out) >= MAX_ERROR_BODY_BYTES:
            break
    return out[:MAX_ERROR_BODY_BYTES]


class _FirstTokenTimeout(Exception):
    """No token within ``timeout_seconds`` although the upstream kept the stream open."""


class _MidStreamError(Exception):
    """The upstream sent an error event inside the stream."""


class _BadStream(_MidStreamError):
    """The upstream's answer is not a valid event stream: bytes that are not SSE, a line
    over MAX_SSE_LINE_BYTES, a chunk that is not JSON, or an end without a finish reason
    or ``[DONE]``. Before the first token it is a failed endpoint (the next replica or
    fallback answers, else 502); after it, the answer ends with an error."""


def _is_transport(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException, _FirstTokenTimeout,
                            OSError))


def _close_async_client(loop: Any, client: Any) -> None:
    """Close an AsyncClient from sync code, on the loop it belongs to while that loop runs;
    otherwise its sockets close when it is collected."""
    import asyncio

    try:
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)
    except RuntimeError:  # the loop closed meanwhile
        pass


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens when an upstream reports none: characters / 3, rounded up."""
    from ..types import message_text

    chars = sum(len(message_text(m)) for m in messages)
    return -(-chars // CHARS_PER_TOKEN)


def _upstream_message(raw: bytes, redact: Callable[[str], str] = lambda text: text) -> str:
    """The message of an upstream error body, credentials removed: OpenAI's
    ``error.message`` when there is one. Redacted before it is cut, so that a secret
    across the cut cannot show in part."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return redact(" ".join(text.split()))[:300] or "(empty body)"
    error = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(error, Mapping) and error.get("message"):
        return redact(str(error["message"]))[:1000]
    if isinstance(error, str):
        return redact(error)[:1000]
    if isinstance(data, Mapping) and isinstance(data.get("detail"), (str, list)):
        return redact(str(data["detail"]))[:1000]
    return redact(" ".join(text.split()))[:300]


def _is_context_error(message: str) -> bool:
    lowered = message.lower()
    return "context" in lowered and ("exceed" in lowered or "too long" in lowered
                                     or "maximum" in lowered)


def _with_media(messages: Sequence[Mapping[str, Any]], images: Sequence[ImageInput],
                audio: AudioInput | None) -> list[dict[str, Any]]:
    """Attach images and audio to the last user message as OpenAI content parts."""
    out = [dict(m) for m in messages]
    if not images and audio is None:
        return out
    for message in reversed(out):
        if message.get("role") == "user":
            content = message.get("content")
            parts = list(content) if isinstance(content, list) else [
                {"type": "text", "text": content or ""}]
            for image in images:
                uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": uri}})
            if audio is not None:
                parts.append({"type": "input_audio", "input_audio": {
                    "data": base64.b64encode(audio.data).decode(),
                    "format": audio.mime.rpartition("/")[2] or "wav"}})
            message["content"] = parts
            break
    return out


# -- the backend -------------------------------------------------------------------------


class OpenAIBackend(Backend):
    settings_class = OpenAISettings

    def check(self, spec: ModelSpec, *, config: Config,
              check_files: bool) -> Iterable[tuple[str, str]]:
        settings: OpenAISettings = spec.settings
        if settings.base_url and settings.endpoints:
            yield "endpoints", "give base_url or endpoints, not both"
        if not settings.base_url and not settings.endpoints:
            yield "base_url", "required: the endpoint's OpenAI base URL, e.g. " \
                              "http://127.0.0.1:8080/v1 (or endpoints = [...])"
        key = "endpoints" if settings.endpoints else "base_url"
        for index, url in enumerate(settings_urls(settings)):
            where = f"{key}[{index}]" if settings.endpoints else key
            problem = _url_problem(url)
            if problem:
                yield where, problem
        if len(set(settings_urls(settings))) != len(settings_urls(settings)):
            yield "endpoints", "lists the same URL twice"
        if settings.api_key_env and not _ENV_NAME.match(settings.api_key_env):
            yield "api_key_env", ("must be the NAME of an environment variable (the key "
                                  "itself never goes in the config)")
        if settings.timeout_seconds <= 0:
            yield "timeout_seconds", "must be > 0"
        if not settings.total_timeout_seconds > 0:
            yield "total_timeout_seconds", "must be > 0"
        if settings.max_concurrency < 1:
            yield "max_concurrency", "must be >= 1"
        if settings.max_cooldown_seconds < BASE_COOLDOWN_SECONDS:
            yield "max_cooldown_seconds", f"must be >= {BASE_COOLDOWN_SECONDS:g}"
        unknown = [c for c in settings.capabilities if c not in FEATURES]
        if unknown:
            yield "capabilities", (f"unknown capability {', '.join(map(repr, unknown))} "
                                   f"(known: {', '.join(FEATURES)})")
        for name in settings.headers:
            if name.lower() == "authorization" and settings.api_key_env:
                yield f"headers.{name}", "api_key_env already sets Authorization"
        yield from balance_problems(settings)

    def concurrency(self, spec: ModelSpec) -> int:
        return spec.settings.max_concurrency * max(1, len(settings_urls(spec.settings)))

    def async_chat(self, spec: ModelSpec) -> bool:
        return True

    def capabilities(self, spec: ModelSpec) -> Capabilities:
        features = set(spec.settings.capabilities)
        return Capabilities(modalities=tuple(spec.modalities), context_length=spec.n_ctx,
                            tools="tools" in features, json_schema="json_schema" in features,
                            logprobs="logprobs" in features)

    def describe(self, spec: ModelSpec) -> Mapping[str, Any]:
        settings: OpenAISettings = spec.settings
        return {"remote_model": settings.remote_model or spec.name,
                "endpoints": [redact_url(u) for u in settings_urls(settings)],
                "balance": settings.balance,
                "api_key_env": settings.api_key_env or None,
                "max_concurrency": settings.max_concurrency,
                "capabilities": list(settings.capabilities)}

    def probe(self, spec: ModelSpec, timeout: float = 2.0) -> dict[str, Any]:
        """Each endpoint's answer to ``GET /models`` now (for ``models list``)."""
        import httpx

        settings: OpenAISettings = spec.settings
        api_key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        headers = dict(settings.headers)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        redact = Redactor([api_key, *settings.headers.values(),
                           *(s for u in settings_urls(settings) for s in _url_secrets(u))])
        rows = []
        with httpx.Client(timeout=timeout, headers=headers, trust_env=False) as client:
            for url in settings_urls(settings):
                try:
                    response = client.get(endpoint_url(url, "models"))
                    state = "up" if response.status_code < 400 else f"http {response.status_code}"
                except httpx.ConnectError:
                    state = "refused"
                except httpx.TimeoutException:
                    state = "timeout"
                except httpx.HTTPError as exc:
                    state = redact(type(exc).__name__)
                rows.append({"url": redact_url(url), "state": state})
        return {"endpoints": rows}

    def load(self, spec: ModelSpec) -> OpenAIModel:
        settings: OpenAISettings = spec.settings
        if not settings_urls(settings):
            raise BackendError(f"model {spec.name!r}: no base_url or endpoints")
        api_key = ""
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env, "")
            if not api_key:
                raise BackendError(
                    f"model {spec.name!r}: the environment variable {settings.api_key_env} "
                    "(its api_key_env) is not set or empty")
        try:
            import httpx  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a broken install
            raise BackendError(f"httpx is not importable: {exc}") from None
        _install_log_filter()
        return OpenAIModel(spec, api_key)


def _url_problem(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got "
                f"{redact_url(url) if parts.scheme else 'no scheme'}")
    try:
        parts.port
    except ValueError:
        return "has an invalid port"
    if parts.username or parts.password:
        return "must not carry credentials (user:password@): use api_key_env"
    return ""


@hookimpl(trylast=True)
def register_backends(register):
    register("openai", OpenAIBackend())
