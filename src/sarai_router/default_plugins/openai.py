"""Default backend ``openai``: any OpenAI-compatible endpoint (llama-server, vLLM, Ollama,
LM Studio, llama-cpp-python's server, a hosted API), streamed over HTTP/1.1 parsed by llhttp
(``relay_transport.py``); embeddings and health checks through httpx.

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

``httpx`` and ``httptools`` are imported on the first load only, so ``route`` and ``--help`` stay instant.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from ..backend import Backend, BackendError, Capabilities
from ..config import Config, ModelSpec
from ..hookspecs import hookimpl
from .balance import balance_problems
from .openai_model import FEATURES, OpenAIModel, OpenAISettings, settings_urls
from .redaction import (Redactor, install_log_filter, redact_url, upstream_message,
                        url_secrets)
from .replicas import BASE_COOLDOWN_SECONDS, ReplicaSet, endpoint_url
from .upstream_sse import MAX_SSE_LINE_BYTES, _BadStream, _SSELines

__all__ = ["FEATURES", "MAX_SSE_LINE_BYTES", "OpenAIBackend", "OpenAIModel", "OpenAISettings",
           "Redactor", "ReplicaSet", "_BadStream", "_SSELines", "_upstream_message",
           "redact_url", "settings_urls"]

#: kept under its former name for callers that import it from here
_upstream_message = upstream_message
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: RFC 9110's token: the characters a header name may have
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")




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
        for name, value in settings.headers.items():
            if name.lower() == "authorization" and settings.api_key_env:
                yield f"headers.{name}", "api_key_env already sets Authorization"
            if not _HEADER_NAME.fullmatch(name):
                yield f"headers.{name}", "is not a valid HTTP header name"
            elif any(char in value for char in "\r\n\0"):
                # The relay writes headers as they are: a line break would start a new one.
                yield f"headers.{name}", "the value must not contain a line break or NUL"
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
                           *(s for u in settings_urls(settings) for s in url_secrets(u))])
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
        install_log_filter()
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
