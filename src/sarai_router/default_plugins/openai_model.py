"""The loaded model of the ``openai`` backend: a client of OpenAI-compatible endpoints that
streams on the event loop, trying the next replica when one fails before the first token."""

from __future__ import annotations

import base64
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping, Sequence

import attrs
import orjson

from ..backend import BackendError, Delta, GenerationParams, ToolCall, Usage
from ..config import ModelSpec
from ..errors import ContextLengthError, UpstreamError, UpstreamUnavailable
from ..types import CHARS_PER_TOKEN, AudioInput, ImageInput
from .balance import BalanceSettings, PrefixKey, prefix_key
from .redaction import Redactor, is_context_error, upstream_message, url_secrets
from .replicas import Replica, ReplicaSet, endpoint_url
from .upstream_sse import (_SSE_FIELDS, _aread_capped, _Attempt, _BadStream, _collect_calls,
                           _FirstTokenTimeout, _is_transport, _MidStreamError, _SSELines,
                           _token_logprobs)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: What an upstream may be asked for beyond text; ``capabilities = [...]`` narrows it.
FEATURES = ("tools", "json_schema", "logprobs")


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


def settings_urls(settings: OpenAISettings) -> tuple[str, ...]:
    return settings.endpoints or ((settings.base_url,) if settings.base_url else ())


# -- the loaded model --------------------------------------------------------------------


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
            secrets.extend(url_secrets(url))
        self.redact = Redactor(secrets)
        self._lock = threading.Lock()
        #: for ``embed`` (a blocking call, not a stream)
        self._client: httpx.Client | None = None
        #: event loop id -> (the loop, its RelayClient)
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
        """This event loop's client of streamed answers (relay_transport.RelayClient)."""
        import asyncio

        from .relay_transport import RelayClient

        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._aclients.get(id(loop))
            if held is None:
                timeout = self._timeout()
                held = self._aclients[id(loop)] = (loop, RelayClient(
                    self.headers, connect_timeout=timeout.connect, read_timeout=timeout.read,
                    keep_alive=self._limits().max_keepalive_connections or 0))
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
        message = upstream_message(raw, self.redact)
        where = f"model {self.spec.name!r}: endpoint {replica.shown}"
        if status >= 500:
            return UpstreamUnavailable(f"{where} answered {status}: {message}",
                                       reason=f"http_{status}", status=502)
        if status == 400 and is_context_error(message):
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
            chunk = orjson.loads(data)  # a third of json.loads' time, once per token
        except ValueError:
            raise _BadStream("it sent a chunk that is not JSON") from None
        if not isinstance(chunk, dict):  # (a JSON object parses to a dict: no ABC check)
            raise _BadStream("it sent a chunk that is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            raise _MidStreamError(upstream_message(data.encode(), self.redact))
        try:
            return self._take_chunk(chunk, attempt)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _BadStream("it sent a chunk that is not a chat completion chunk") from None

    def _take_chunk(self, chunk: Mapping[str, Any], attempt: _Attempt) -> Delta | None:
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
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

    def _on_lines(self, lines: list[str], attempt: _Attempt) -> Iterator[Delta]:
        """The text Deltas in SSE ``lines`` of ``attempt``'s answer, up to where max_tokens
        cuts it. (The deadlines are checked before each read: see _read.)"""
        for line in lines:
            delta = self._parse(line, attempt)
            if attempt.cut:
                return
            if delta is not None:
                attempt.replica.last_token_at = time.monotonic()
                if not attempt.produced:
                    attempt.produced = True
                    self.replicas.succeeded(attempt.replica)
                yield delta

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
                async with _stream(client, attempt.replica.chat_url, body) as response:
                    if response.status_code >= 400:
                        failover.refused(attempt, response.status_code,
                                         await _aread_capped(response.aiter_bytes()))
                        continue
                    # No generator between the socket and here: each token costs one hop.
                    lines = _SSELines()
                    while not attempt.cut:
                        data = await self._read(response, attempt)
                        for delta in self._on_lines(lines.feed(data) if data else lines.end(),
                                                    attempt):
                            yield delta
                        if not data:
                            break
                yield self._finish(attempt, messages)
                return
            except Exception as exc:
                failover.failed(attempt, exc)
            finally:
                self.replicas.release(attempt.replica)
        raise failover.exhausted()

    async def _read(self, response: Any, attempt: _Attempt) -> bytes:
        """``response``'s next bytes (b"" at its end), read within the time ``attempt`` has
        left: a silent upstream is cut at its deadline, not at the next read timeout."""
        import httpx

        left = self._check_time(attempt)
        # The read timeout (timeout_seconds) bounds each read; a deadline that comes sooner
        # bounds it instead, and is checked when it passes.
        read_timeout = self.settings.timeout_seconds
        deadline = left <= read_timeout
        try:
            return await response.receive(left + 0.05 if deadline else read_timeout)
        except httpx.ReadTimeout:
            if not deadline:
                raise
            self._check_time(attempt)  # raises: the deadline has passed
            raise _FirstTokenTimeout() from None


def _close_async_client(loop: Any, client: Any) -> None:
    """Close an AsyncClient from sync code, on the loop it belongs to while that loop runs;
    otherwise its sockets close when it is collected."""
    import asyncio

    try:
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)
    except RuntimeError:  # the loop closed meanwhile
        pass


@asynccontextmanager
async def _stream(client: Any, url: str, body: Mapping[str, Any]) -> AsyncIterator[Any]:
    """``body`` posted to ``url``, sent once more when the connection closed before any
    byte of the answer: a kept-alive connection the upstream had closed without saying so
    (llama-server does, after a streamed answer; seen as 1 request in 64 failing with a 502
    under 16 streams), on which the request was never answered."""
    import httpx

    from .relay_transport import CLOSED_UNANSWERED

    raw = orjson.dumps(body)
    try:
        response = await client.post(url, raw)
    except httpx.RemoteProtocolError as exc:
        if str(exc) != CLOSED_UNANSWERED:
            raise
        response = await client.post(url, raw)
    try:
        yield response
    finally:
        await response.aclose()


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens when an upstream reports none: characters / 3, rounded up."""
    from ..types import message_text

    chars = sum(len(message_text(m)) for m in messages)
    return -(-chars // CHARS_PER_TOKEN)


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
