"""Ollama's request and response shapes, translated to and from the router's own.

A chat or generate body becomes an OpenAI chat-completions body checked by
``openai.parse_chat_body`` (the same messages, tools, JSON output, images and audio
machinery), and ``options`` become :class:`GenerationParams`. Every field and option is
honoured, accepted with no effect (documented), or refused by name; docs/serving.md has
the table. Nothing here touches the network: ``ollama.py`` serves it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import attrs

from ..backend import GenerationParams, TokenLogprob, ToolCall
from ..config import Config
from ..errors import not_configured
from ..sampling import SAMPLING_RANGES
from .openai import (AUTO_MODEL, ApiError, Limits, ParsedChat, _check_keys, _short, _type_name,
                     parse_chat_body)

#: The Ollama API release whose shapes this follows (``GET /api/version``): clients that
#: check a version for a feature (tools, structured outputs) find one that has it.
OLLAMA_API_VERSION = "0.12.0"
#: Ollama's default tag: ``fast:latest`` is ``fast``.
LATEST = ":latest"


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def refused(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="unsupported_parameter", param=param)


def check_body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError(400, f"the body must be a JSON object, got {_type_name(body)}",
                       code="invalid_body")
    return body


def model_name(config: Config, raw: Any, *, param: str = "model") -> str:
    """The configured model (or ``auto``) that ``raw`` names; ``NAME:latest`` is ``NAME``."""
    if not isinstance(raw, str) or not raw:
        raise invalid(f"{param} is required: a configured model name or \"auto\"", param)
    name = raw[: -len(LATEST)] if raw.endswith(LATEST) else raw
    if name == AUTO_MODEL or name in config.models:
        return name
    raise ApiError(404, not_configured(raw[:100], [AUTO_MODEL, *config.models]),
                   code="model_not_found", param=param)


# -- keep_alive ---------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


@attrs.frozen
class KeepAlive:
    """A request's ``keep_alive``, within the server's policy.

    ``seconds``: what the pool is told: ``0`` unload once idle, ``> 0`` the idle limit
    (already capped by ``[server] keep_alive_max_seconds``), ``None`` the operator's TTL
    (the field absent, negative, or longer asks when the cap is 0). ``asked``: the seconds
    the client asked (negative: "forever").
    """

    seconds: float | None
    asked: float | None = None

    @property
    def unload(self) -> bool:
        return self.seconds is not None and self.seconds <= 0


def parse_keep_alive(value: Any, cap: float) -> KeepAlive:
    """Ollama's ``keep_alive``: seconds (a number) or a Go duration (``"5m"``, ``"1h30m"``,
    ``"-1"``); a negative one holds the model as long as the operator's TTL does."""
    if value is None:
        return KeepAlive(None)
    if isinstance(value, bool):
        raise _bad_keep_alive(value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration(value.strip())
    else:
        raise _bad_keep_alive(value)
    if not math.isfinite(seconds):
        raise _bad_keep_alive(value)
    if seconds < 0:
        return KeepAlive(None, seconds)
    if seconds == 0:
        return KeepAlive(0.0, 0.0)
    return KeepAlive(min(seconds, cap) if cap > 0 else None, seconds)


def _duration(text: str) -> float:
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    try:
        return sign * float(body)  # a bare number: seconds
    except ValueError:
        pass
    if not body or _DURATION.sub("", body):
        raise _bad_keep_alive(text)
    return sign * sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(body))


def _bad_keep_alive(value: Any) -> ApiError:
    return invalid(f"keep_alive must be a number of seconds or a duration such as \"5m\", "
                   f"\"1h\" or \"-1\", got {_short(value)}", "keep_alive")


# -- options ------------------------------------------------------------------------------

#: Options honoured: each becomes a generation setting (num_ctx is checked against the
#: model's context, fixed when it loads).
HONOURED_OPTIONS = ("num_predict", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                    "repeat_penalty", "presence_penalty", "frequency_penalty", "num_ctx")
_LOAD_TIME = "a load-time setting: the server's config sets it for the model"
#: Options refused whenever set, with why.
REFUSED_OPTIONS = {
    **dict.fromkeys(("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                     "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
                     "num_thread"), _LOAD_TIME),
    "num_keep": "no prompt tokens are kept across requests here",
    "repeat_last_n": "the repeat penalty looks at llama.cpp's fixed window",
    "tfs_z": "tail-free sampling is not offered",
    "typical_p": "locally typical sampling is not offered",
    "mirostat": "mirostat sampling is not offered (0, off, is accepted)",
    "mirostat_tau": "mirostat sampling is not offered",
    "mirostat_eta": "mirostat sampling is not offered",
    "penalize_newline": "not offered by llama.cpp any more",
}


@attrs.frozen
class Options:
    """What ``options`` asked, checked."""

    params: Mapping[str, Any] = attrs.field(factory=dict)  # GenerationParams fields
    num_ctx: int | None = None


def parse_options(raw: Any, limits: Limits, *, sampling: bool = True) -> Options:
    """``options`` checked; ``sampling=False`` (embeddings) refuses the sampling ones."""
    if raw is None:
        return Options()
    if not isinstance(raw, Mapping):
        raise invalid("options must be an object", "options")
    unknown = [k for k in raw if k not in HONOURED_OPTIONS and k not in REFUSED_OPTIONS]
    if unknown:
        raise ApiError(400, f"options: unknown option {_short(unknown[0])[:40]} (known: "
                       f"{', '.join(HONOURED_OPTIONS)})", code="unknown_parameter",
                       param=f"options.{unknown[0]}"[:100])
    for key, why in REFUSED_OPTIONS.items():
        value = raw.get(key)
        if value is None or (key == "mirostat" and value == 0):
            continue
        raise refused(f"options.{key} is not supported: {why}", f"options.{key}")
    if not sampling:
        extra = [k for k in raw if k != "num_ctx" and raw[k] is not None]
        if extra:
            raise refused(f"options.{extra[0]} does not apply to embeddings (only num_ctx "
                          "does)", f"options.{extra[0]}")
    params: dict[str, Any] = {}
    for key in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty"):
        value = raw.get(key)
        if value is None:
            continue
        low, high = SAMPLING_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            raise invalid(f"options.{key} must be a number between {low:g} and {high:g}, got "
                          f"{_short(value)}", f"options.{key}")
        params[key] = float(value)
    top_k = _int_option(raw, "top_k", 0, int(SAMPLING_RANGES["top_k"][1]))
    if top_k is not None:
        params["top_k"] = top_k
    seed = _int_option(raw, "seed", -(2**63), 2**64 - 1)
    if seed is not None:
        params["seed"] = seed
    predict = _int_option(raw, "num_predict", -2, None)
    if predict == 0:
        raise invalid("options.num_predict must be -1 (the model's max_tokens) or at least 1",
                      "options.num_predict")
    if predict is not None and predict > 0:
        if predict > limits.max_tokens_cap:
            raise invalid(f"options.num_predict is {predict}, more than this server allows "
                          f"([server] max_tokens_cap = {limits.max_tokens_cap})",
                          "options.num_predict")
        params["max_tokens"] = predict
    stop = raw.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 16
                and all(isinstance(s, str) and s for s in stop)):
            raise invalid("options.stop must be a list of up to 16 non-empty strings",
                          "options.stop")
        params["stop"] = tuple(stop)
    return Options(params, _int_option(raw, "num_ctx", 1, None))


def _int_option(raw: Mapping[str, Any], key: str, low: int, high: int | None) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        bound = f" between {low} and {high}" if high is not None else f" >= {low}"
        raise invalid(f"options.{key} must be an integer{bound}, got {_short(value)}",
                      f"options.{key}")
    return value


def check_num_ctx(options: Options, config: Config, model: str) -> None:
    """``num_ctx`` is honoured when the model's context (fixed at load) holds it."""
    if options.num_ctx is None:
        return
    n_ctx = config.models[model].n_ctx
    if options.num_ctx > n_ctx:
        raise refused(f"options.num_ctx {options.num_ctx} is more than model {model!r} was "
                      f"loaded with ([models.{model}] n_ctx = {n_ctx}); the context is set "
                      "by the server's config", "options.num_ctx")


# -- chat and generate bodies --------------------------------------------------------------

#: Top-level fields each endpoint takes (anything else is refused by name).
CHAT_FIELDS = ("model", "messages", "tools", "format", "options", "stream", "keep_alive",
               "think", "logprobs", "top_logprobs")
GENERATE_FIELDS = ("model", "prompt", "suffix", "system", "template", "context", "stream",
                   "raw", "format", "images", "options", "keep_alive", "think", "logprobs",
                   "top_logprobs")
#: Generate fields refused whenever set, with why.
GENERATE_REFUSED = {
    "suffix": "fill-in-the-middle is not offered",
    "template": "the model's own chat template is always used",
    "context": "no token context is kept between requests here; send the conversation "
               "to /api/chat instead",
}


@attrs.frozen
class OllamaRequest:
    """A checked ``/api/chat`` or ``/api/generate`` body."""

    model: str  # a configured name or "auto"
    parsed: ParsedChat | None  # None: a load or unload request (no prompt, no messages)
    stream: bool
    keep_alive: KeepAlive
    options: Options
    logprobs: bool = False


def parse_chat(body: Any, config: Config, limits: Limits) -> OllamaRequest:
    body = check_body(body)
    _check_keys(body, CHAT_FIELDS, "body")
    common = _common(body, config, limits)
    raw = body.get("messages")
    if raw is None or raw == []:  # Ollama: load the model (or unload it, keep_alive 0)
        _no_generation_fields(body, ("tools", "format", "logprobs", "top_logprobs"))
        return OllamaRequest(parsed=None, **common)
    if not isinstance(raw, list):
        raise invalid("messages must be a list of messages", "messages")
    messages = _messages(raw)
    return _request(body, messages, common, limits)


def parse_generate(body: Any, config: Config, limits: Limits) -> OllamaRequest:
    body = check_body(body)
    _check_keys(body, GENERATE_FIELDS, "body")
    for key, why in GENERATE_REFUSED.items():
        if body.get(key) not in (None, "", []):
            raise refused(f"{key} is not supported: {why}", key)
    if body.get("raw") not in (None, False):
        raise refused("raw is not supported: the model's own chat template is always used",
                      "raw")
    common = _common(body, config, limits)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise invalid(f"prompt must be a string, got {_short(prompt)}", "prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise invalid(f"system must be a string, got {_short(system)}", "system")
    images = body.get("images")
    if not prompt:
        if images:
            raise invalid("images need a prompt", "prompt")
        _no_generation_fields(body, ("format", "logprobs", "top_logprobs"))
        return OllamaRequest(parsed=None, **common)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    if images:
        messages.append({"role": "user", "content": [{"type": "text", "text": prompt},
                                                     *_attachments(images, "images")]})
    else:
        messages.append({"role": "user", "content": prompt})
    return _request(body, messages, common, limits)


def _no_generation_fields(body: Mapping[str, Any], keys: Sequence[str]) -> None:
    for key in keys:
        if body.get(key) not in (None, False, "", []):
            raise invalid(f"{key} needs something to answer: send messages (chat) or a "
                          "prompt (generate)", key)


def _common(body: Mapping[str, Any], config: Config, limits: Limits) -> dict[str, Any]:
    model = model_name(config, body.get("model"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid(f"stream must be true or false, got {_short(stream)}", "stream")
    think = body.get("think")
    if think not in (None, False):
        raise refused("think is not supported: the models here do not reason in a separate "
                      "channel (false is accepted)", "think")
    return {"model": model, "stream": True if stream is None else stream,
            "keep_alive": parse_keep_alive(body.get("keep_alive"),
                                           config.server.keep_alive_max_seconds),
            "options": parse_options(body.get("options"), limits)}


def _request(body: Mapping[str, Any], messages: list[dict[str, Any]], common: dict[str, Any],
             limits: Limits) -> OllamaRequest:
    openai_body: dict[str, Any] = {"model": common["model"], "messages": messages}
    tools = body.get("tools")
    if tools not in (None, []):
        openai_body["tools"] = tools
    response_format = _format(body.get("format"))
    if response_format is not None:
        openai_body["response_format"] = response_format
    logprobs = body.get("logprobs")
    if logprobs is not None:
        openai_body["logprobs"] = logprobs
    if body.get("top_logprobs") is not None:
        openai_body["top_logprobs"] = body["top_logprobs"]
    parsed = parse_chat_body(openai_body, limits)
    params = attrs.evolve(parsed.params, **common["options"].params)
    parsed = ParsedChat(parsed.model, parsed.request, params, common["stream"], False)
    return OllamaRequest(parsed=parsed, logprobs=bool(logprobs), **common)


def _format(value: Any) -> dict[str, Any] | None:
    """``format``: ``"json"`` (any JSON object) or a JSON schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, Mapping):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": dict(value),
                                                       "strict": True}}
    raise invalid(f"format must be \"json\" or a JSON schema object, got {_short(value)}",
                  "format")


#: Message fields Ollama sends.
MESSAGE_FIELDS = ("role", "content", "images", "tool_calls", "tool_name", "thinking")


def _messages(raw: list[Any]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones: images become ``image_url`` parts (audio clips among
    them, ``input_audio`` parts), tool calls get ids and their arguments as JSON text, and
    each tool message answers the call of its ``tool_name``."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) not answered yet
    for index, message in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise invalid(f"{param} must be an object with role and content", param)
        _check_keys(message, MESSAGE_FIELDS, param)
        role = message.get("role")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise invalid(f"{param}.content must be a string, got {_short(content)}",
                          f"{param}.content")
        converted: dict[str, Any] = {"role": role}
        images = message.get("images")
        if images:
            if role != "user":
                raise invalid(f"{param}.images: only user messages may carry images",
                              f"{param}.images")
            converted["content"] = ([{"type": "text", "text": content}] if content else []) \
                + _attachments(images, f"{param}.images")
        else:
            converted["content"] = content if content is not None else ""
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant":
                raise invalid(f"{param}.tool_calls: only assistant messages make tool calls",
                              f"{param}.tool_calls")
            converted["tool_calls"] = _tool_calls(calls, index, f"{param}.tool_calls")
            pending = [(c["id"], c["function"]["name"]) for c in converted["tool_calls"]]
            if not content:
                converted["content"] = None
        name = message.get("tool_name")
        if name is not None and (role != "tool" or not isinstance(name, str)):
            raise invalid(f"{param}.tool_name must be a string, on a tool message",
                          f"{param}.tool_name")
        if role == "tool":
            if not pending:
                raise invalid(f"{param}: a tool message must answer a tool call of an earlier "
                              "assistant message", param)
            match = next((i for i, (_, fn) in enumerate(pending) if fn == name), 0)
            converted["tool_call_id"] = pending.pop(match)[0]
        thinking = message.get("thinking")
        if thinking is not None and not isinstance(thinking, str):
            raise invalid(f"{param}.thinking must be a string", f"{param}.thinking")
        out.append(converted)
    return out


def _tool_calls(calls: Any, index: int, param: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise invalid(f"{param} must be a list", param)
    converted = []
    for number, call in enumerate(calls):
        where = f"{param}[{number}]"
        if not isinstance(call, Mapping):
            raise invalid(f"{where} must be an object with a function", where)
        _check_keys(call, ("function", "id", "type", "index"), where)
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise invalid(f"{where}.function must be an object with name and arguments",
                          f"{where}.function")
        _check_keys(function, ("name", "arguments", "index", "description"), f"{where}.function")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, Mapping):
            raise invalid(f"{where}.function.arguments must be an object",
                          f"{where}.function.arguments")
        converted.append({"id": f"call_{index}_{number}", "type": "function",
                          "function": {"name": function.get("name"),
                                       "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return converted


def _attachments(images: Any, param: str) -> list[dict[str, Any]]:
    """Base64 images as OpenAI content parts (the type read from the bytes). A WAV or MP3
    clip among them goes to the speech stage as ``input_audio``: Ollama has no audio field."""
    if not isinstance(images, list):
        raise invalid(f"{param} must be a list of base64 strings", param)
    parts = []
    for number, data in enumerate(images):
        where = f"{param}[{number}]"
        if not isinstance(data, str) or not data:
            raise ApiError(400, f"{where} must be a base64 string", code="invalid_image_url",
                           param=where)
        try:
            head = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4), validate=True)
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where} is not valid base64", code="invalid_image_url",
                           param=where) from None
        audio = _audio_format(head)
        if audio is not None:
            parts.append({"type": "input_audio", "input_audio": {"data": data,
                                                                 "format": audio}})
        else:
            parts.append({"type": "image_url", "image_url": {
                "url": f"data:{_image_mime(head)};base64,{data}"}})
    return parts


def _image_mime(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _audio_format(head: bytes) -> str | None:
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    return None


# -- responses ----------------------------------------------------------------------------


def timestamp(when: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes ``created_at``."""
    moment = datetime.now(timezone.utc) if when is None else \
        datetime.fromtimestamp(when, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def expiry(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return int(round((seconds or 0.0) * 1e9))


def durations(completion) -> dict[str, int]:
    """Ollama's counts and durations (nanoseconds) from a completion's usage and timings.
    Prompt evaluation is the time to the first token; evaluation, the rest."""
    timings = completion.timings
    first = timings.first_token_s if timings.first_token_s is not None else timings.generation_s
    return {"total_duration": _ns(timings.total_s), "load_duration": _ns(timings.load_s),
            "prompt_eval_count": completion.usage.prompt_tokens,
            "prompt_eval_duration": _ns(first),
            "eval_count": completion.usage.completion_tokens,
            "eval_duration": _ns(max(0.0, timings.generation_s - first))}


def done_reason(completion) -> str:
    reason = completion.finish_reason or "stop"
    return "length" if reason == "length" else "stop"


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's tool calls: the arguments as an object, not JSON text."""
    out = []
    for index, call in enumerate(calls):
        try:
            arguments = json.loads(call.arguments) if call.arguments else {}
        except ValueError:  # a grammar-held call is JSON; keep the text rather than lose it
            arguments = {"arguments": call.arguments}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append({"id": call.id, "function": {"index": index, "name": call.name,
                                                "arguments": arguments}})
    return out


def logprobs(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
             "top_logprobs": [{"token": token, "logprob": value, "bytes": list(raw)}
                              for token, value, raw in t.top]}
            for t in tokens]


def quantization(file_name: str) -> str:
    """``Q4_K_M`` from ``gemma-3-270m-q4_k_m.gguf``; "" when the name says nothing."""
    match = re.search(r"(?i)(?:^|[-_.])((?:I?Q\d+(?:_[A-Z0-9]+)*)|F16|BF16|F32)\.gguf$",
                      file_name)
    return match.group(1).upper() if match else ""


__all__ = ["GenerationParams", "KeepAlive", "OLLAMA_API_VERSION", "OllamaRequest", "Options",
           "check_num_ctx", "durations", "model_name", "parse_chat", "parse_generate",
           "parse_keep_alive", "parse_options", "timestamp"]
