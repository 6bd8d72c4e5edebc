"""The OpenAI chat-completions dialect's answers: the completion, its stream's chunks, usage,
logprobs and tool calls."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import orjson

from .. import __version__
from ..backend import TokenLogprob, ToolCall
from ..types import RouteDecision



def header_value(text: str) -> str:
    """HTTP headers are latin-1: keep printable ASCII, percent-encode the rest (UTF-8)."""
    return quote(text, safe="".join(chr(c) for c in range(32, 127) if chr(c) != "%"))


def system_fingerprint(model: str) -> str:
    """Names what produced an answer: this version and the model (config name)."""
    return f"sarai-{__version__}-{model}"


def logprobs_json(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
         "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(raw)}
                          for token, logprob, raw in t.top]}
        for t in tokens], "refusal": None}


def tool_calls_json(calls: Sequence[ToolCall], *, indexed: bool = False) -> list[dict[str, Any]]:
    return [{**({"index": i} if indexed else {}), "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for i, call in enumerate(calls)]


#: stands for the text when a chunk's template is rendered (no id, model name or
#: fingerprint holds it: NUL bytes)
_MARKER = "\x00sarai-text\x00"


def json_text(text: str) -> bytes:
    """``text`` as a JSON string, UTF-8, as ``json.dumps(text, ensure_ascii=False)`` writes
    it: orjson does it in a tenth of the time."""
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:  # a lone surrogate, which UTF-8 can't carry: escaped
        return json.dumps(text).encode()


class _Meta:
    """What every chunk of one answer shares."""

    def __init__(self, decision: RouteDecision, *, include_usage: bool = False,
                 logprobs: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = decision.model
        self.include_usage = include_usage
        self.logprobs = logprobs
        #: a content chunk's bytes before and after its text (see :meth:`content`)
        self._content: tuple[bytes, bytes] | None = None

    def base(self) -> dict[str, Any]:
        base = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": system_fingerprint(self.model)}
        if self.include_usage:
            base["usage"] = None  # OpenAI: null on every chunk but the last
        return base

    def sse(self, data: Mapping[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def content(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> bytes:
        """The chunk of one piece of text: the bytes :meth:`chunk` gives, made from a
        template rendered once per answer, the text alone encoded per piece (it is most of
        what the relay does per token)."""
        if self.logprobs:
            return self.chunk({"content": text}, logprobs=logprobs).encode()
        if self._content is None:
            marker = json.dumps(_MARKER)
            head, _, tail = self.chunk({"content": _MARKER}).partition(marker)
            self._content = (head.encode(), tail.encode())
        head, tail = self._content
        return head + json_text(text) + tail

    def chunk(self, delta: Mapping[str, Any], finish_reason: str | None = None,
              logprobs: Sequence[TokenLogprob] | None = None) -> str:
        return self.sse({**self.base(), "choices": [
            {"index": 0, "delta": dict(delta),
             "logprobs": logprobs_json(logprobs) if logprobs is not None else None,
             "finish_reason": finish_reason}]})

    def usage_chunk(self, completion) -> str:
        return self.sse({**self.base(), "choices": [], "usage": usage_json(completion)})

    def completion(self, completion, text: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if completion.tool_calls:
            message["tool_calls"] = tool_calls_json(completion.tool_calls)
            message["content"] = text or None
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": system_fingerprint(self.model),
            "choices": [{"index": 0, "message": message,
                         "logprobs": logprobs_json(completion.logprobs) if self.logprobs
                         else None,
                         "finish_reason": finish_reason(completion)}],
            "usage": usage_json(completion),
        }


def finish_reason(completion) -> str:
    if completion.tool_calls:
        return "tool_calls"
    reason = completion.finish_reason or "stop"
    # OpenAI's set; a backend's own word (e.g. "abort") reads as a stop.
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"


def usage_json(completion) -> dict[str, int]:
    usage = completion.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


# Kept for callers of the old name.
_usage = usage_json
