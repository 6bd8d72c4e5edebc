"""What may be shown of an upstream: URLs without userinfo and query, secrets removed from
its messages, and httpx's own log lines cleaned the same way."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit


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


def url_secrets(url: str) -> list[str]:
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


def install_log_filter() -> None:
    global _log_filter_installed
    if not _log_filter_installed:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).addFilter(_HttpxLogRedaction())
        _log_filter_installed = True


def upstream_message(raw: bytes, redact: Callable[[str], str] = lambda text: text) -> str:
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


def is_context_error(message: str) -> bool:
    lowered = message.lower()
    return "context" in lowered and ("exceed" in lowered or "too long" in lowered
                                     or "maximum" in lowered)
