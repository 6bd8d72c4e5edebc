"""The OpenAI chat-completions dialect: request parsing. Its errors are in
``openai_errors`` and its answers' shapes in ``openai_render``; both are importable from
here too, as the rest of the server does.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. A client's
mistake is a 4xx naming the field.

Every field of OpenAI's chat-completions request is either honoured, accepted with no
effect on the answer (documented), or refused by name (``REFUSED``); a field that is not
OpenAI's is refused too. docs/serving.md has the table.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from typing import Any, Mapping

import attrs

from ..backend import GenerationParams
from ..events import REQUEST_ID  # noqa: F401 - the server takes the request id from here
from ..types import AudioInput, ChatRequest, ImageInput
# The dialect's errors, body checks and answers, importable from here as before the split.
from .openai_body import (MAX_JSON_DEPTH, _boolean, _check_json_tree,  # noqa: F401
                          _check_keys, _check_text, _integer, _invalid, _number, _short,
                          _type_name, _unsupported, parse_json)
from .openai_errors import (DIALECT, ApiError, _shutting_down, error_for,  # noqa: F401
                            internal_error, scrub_paths)
from .openai_render import (_Meta, _usage, finish_reason, header_value,  # noqa: F401
                            logprobs_json, system_fingerprint, tool_calls_json, usage_json)

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}

MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- request parsing ---------------------------------------------------------------------


@attrs.frozen
class Limits:
    """The server's bounds on one request (``[server]`` in the config)."""

    max_tokens_cap: int = 8192
    max_prompt_chars: int = 262144


class ParsedChat:
    """A checked chat-completions body."""

    __slots__ = ("model", "request", "params", "stream", "include_usage")

    def __init__(self, model: str, request: ChatRequest, params: GenerationParams,
                 stream: bool, include_usage: bool):
        self.model = model
        self.request = request
        self.params = params
        self.stream = stream
        self.include_usage = include_usage


def decode_data_uri(url: str, param: str) -> tuple[bytes, str]:
    """``data:image/png;base64,...`` -> (bytes, mime). Anything else is refused."""
    if not url.startswith("data:"):
        kind = ("a remote URL" if re.match(r"(?i)^[a-z][a-z0-9+.-]*://", url)
                and not url.lower().startswith("file:") else "a local file")
        raise ApiError(400, f"{param}: only data: URIs are accepted over HTTP, not {kind}; "
                       "local paths and remote URLs are refused",
                       code="invalid_image_url", param=param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: the data: URI must be base64 "
                       "(data:<mime>;base64,<data>)", code="invalid_image_url", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the data: URI is not valid base64",
                       code="invalid_image_url", param=param) from None
    return data, header.removesuffix(";base64") or "application/octet-stream"


#: The fields a message of each role may carry (OpenAI's message shapes).
MESSAGE_KEYS = {
    "system": ("role", "content", "name"),
    "developer": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "tool_calls", "refusal", "audio", "function_call"),
    "tool": ("role", "content", "tool_call_id"),
}


class _Messages:
    """Parses ``messages``, collecting attachments and the tool calls seen so far."""

    def __init__(self) -> None:
        self.images: list[ImageInput] = []
        self.audio: list[AudioInput] = []
        self.calls: dict[str, str] = {}  # tool call id -> function name
        self.chars = 0
        self.index = 0
        # Each assistant message's ``name`` ("" if none): the model that answered it, when
        # the client copies the response's ``model`` there (routing's previous_models).
        self.answered: list[str] = []

    def parse(self, raw: Any, index: int) -> dict[str, Any]:
        param = f"messages[{index}]"
        if not isinstance(raw, Mapping):
            raise _invalid(f"{param} must be an object with role and content", param)
        role = raw.get("role")
        if role == "function":
            raise _unsupported(f"{param}.role: 'function' messages are OpenAI's deprecated "
                               "function calling; use tools and role 'tool'", f"{param}.role")
        if role not in ROLES:
            raise _invalid(f"{param}.role must be one of {', '.join(ROLES)}, got {_short(role)}",
                           f"{param}.role")
        _check_keys(raw, MESSAGE_KEYS[role], param)
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise _invalid(f"{param}.name must be a string", f"{param}.name")
        if role == "assistant":
            self.answered.append(name or "")
            return self._assistant(raw, param)
        if role == "tool":
            return self._tool(raw, param)
        self.index = index  # the message an input_audio part's transcript goes back to
        text = self._content(raw.get("content"), f"{param}.content",
                             media=role == "user")
        return {"role": ROLES[role], "content": text}

    def _count(self, text: str) -> str:
        self.chars += len(text)
        return text

    def _content(self, content: Any, where: str, *, media: bool = False,
                 refusal: bool = False) -> str:
        if isinstance(content, str):
            return self._count(content)
        if not isinstance(content, list):
            raise _invalid(f"{where} must be a string or a list of content parts, got "
                           f"{_type_name(content)}", where)
        texts = []
        for j, part in enumerate(content):
            at = f"{where}[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                _check_keys(part, ("type", "text"), at)
                if not isinstance(part.get("text"), str):
                    raise _invalid(f"{at}.text must be a string", f"{at}.text")
                texts.append(self._count(part["text"]))
            elif kind == "refusal" and refusal:
                _check_keys(part, ("type", "refusal"), at)
                if not isinstance(part.get("refusal"), str):
                    raise _invalid(f"{at}.refusal must be a string", f"{at}.refusal")
                texts.append(self._count(part["refusal"]))
            elif kind == "image_url" and media:
                _check_keys(part, ("type", "image_url"), at)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                if not isinstance(url, str):
                    raise _invalid(f"{at}.image_url.url must be a string", f"{at}.image_url")
                if isinstance(spec, Mapping):
                    _check_keys(spec, ("url", "detail"), f"{at}.image_url")
                data, mime = decode_data_uri(url, f"{at}.image_url.url")
                self.images.append(ImageInput(data=data, mime=mime, source=f"{at} (data: URI)"))
            elif kind == "input_audio" and media:
                _check_keys(part, ("type", "input_audio"), at)
                spec = part.get("input_audio")
                if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
                    raise _invalid(f"{at}.input_audio must have base64 data", at)
                _check_keys(spec, ("data", "format"), f"{at}.input_audio")
                fmt = spec.get("format")
                if fmt not in ("wav", "mp3"):
                    # Required, as in OpenAI's API: the bytes alone do not say the format.
                    raise _invalid(f"{at}.input_audio.format must be wav or mp3"
                                   + (" (it is required)" if fmt is None else ""),
                                   f"{at}.input_audio.format")
                try:
                    data = base64.b64decode(spec["data"], validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"{at}.input_audio.data is not valid base64",
                                   code="invalid_audio", param=at) from None
                self.audio.append(AudioInput(data=data, mime=f"audio/{fmt}",
                                             source=f"{at} (input_audio)",
                                             message_index=self.index))
            else:
                allowed = ("text, image_url with a data: URI, input_audio" if media
                           else "text, refusal" if refusal else "text")
                raise _invalid(f"{at}: unsupported content part {_short(kind)} here "
                               f"({allowed})", at)
        return "\n".join(texts)

    def _assistant(self, raw: Mapping[str, Any], param: str) -> dict[str, Any]:
        for legacy in ("function_call", "audio"):
            if raw.get(legacy) is not None:
                raise ApiError(400, f"{param}.{legacy} is not supported"
                               + (" (deprecated; use tool_calls)" if legacy == "function_call"
                                  else " (no audio output here)"),
                               code="unsupported_parameter", param=f"{param}.{legacy}")
        content = raw.get("content")
        text = "" if content is None else self._content(content, f"{param}.content",
                                                         refusal=True)
        refusal = raw.get("refusal")
        if refusal is not None and not isinstance(refusal, str):
            raise _invalid(f"{param}.refusal must be a string or null", f"{param}.refusal")
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = raw.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _invalid(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
            message["tool_calls"] = [self._call(c, f"{param}.tool_calls[{k}]")
                                     for k, c in enumerate(calls)]
        elif content is None and refusal is None:
            raise _invalid(f"{param}: an assistant message needs content or tool_calls",
                           f"{param}.content")
        return message

    def _call(self, raw: Any, where: str) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise _invalid(f"{where} must be an object", where)
        _check_keys(raw, ("id", "type", "function"), where)
        if raw.get("type") != "function":
            raise _unsupported(f"{where}.type must be 'function', got {_short(raw.get('type'))}",
                               f"{where}.type")
        call_id, function = raw.get("id"), raw.get("function")
        if not isinstance(call_id, str) or not call_id:
            raise _invalid(f"{where}.id must be a non-empty string", f"{where}.id")
        if not isinstance(function, Mapping):
            raise _invalid(f"{where}.function must be an object with name and arguments",
                           f"{where}.function")
        _check_keys(function, ("name", "arguments"), f"{where}.function")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise _invalid(f"{where}.function.name must be a non-empty string",
                           f"{where}.function.name")
        if not isinstance(arguments, str):
            raise _invalid(f"{where}.function.arguments must be a string (JSON text)",
                           f"{where}.function.arguments")
        self.calls[call_id] = name
        self._count(arguments)
        return {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def _tool(self, raw: Mapping[str, Any], param: str) -> dict[str, Any]:
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _invalid(f"{param}.tool_call_id must be a non-empty string",
                           f"{param}.tool_call_id")
        if call_id not in self.calls:
            raise _invalid(f"{param}: tool_call_id {_short(call_id)} answers no tool call of an "
                           "earlier assistant message", f"{param}.tool_call_id")
        text = self._content(raw.get("content"), f"{param}.content")
        return {"role": "tool", "content": text, "tool_call_id": call_id,
                "name": self.calls[call_id]}


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools must be a list of function tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise _invalid(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _invalid(f"{where} must be an object", where)
        if tool.get("type") != "function":
            raise _unsupported(f"{where}.type: only 'function' tools are supported, got "
                               f"{_short(tool.get('type'))}", f"{where}.type")
        _check_keys(tool, ("type", "function"), where)
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise _invalid(f"{where}.function must be an object", f"{where}.function")
        _check_keys(function, ("name", "description", "parameters", "strict"),
                    f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise _invalid(f"{where}.function.name must be 1-64 letters, digits, _ or -, got "
                           f"{_short(name)}", f"{where}.function.name")
        if name in names:
            raise _invalid(f"{where}.function.name: {name!r} is given twice",
                           f"{where}.function.name")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid(f"{where}.function.description must be a string",
                           f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, Mapping):
            raise _invalid(f"{where}.function.parameters must be a JSON schema object",
                           f"{where}.function.parameters")
        _boolean(function, "strict", f"{where}.function.strict")
        entry = {"name": name, "parameters": dict(parameters)}
        if description:
            entry["description"] = description
        checked.append({"type": "function", "function": entry})
    return checked


def _tool_choice(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if not tools and choice != "none":
        raise _invalid("tool_choice needs tools", "tool_choice")
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        _check_keys(choice, ("type", "function"), "tool_choice")
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if name not in {t["function"]["name"] for t in tools}:
            raise _invalid(f"tool_choice names function {_short(name)}, which is not in tools",
                           "tool_choice")
        return {"type": "function", "function": {"name": name}}
    if isinstance(choice, Mapping) and choice.get("type") in ("allowed_tools", "custom"):
        raise _unsupported(f"tool_choice of type {choice['type']!r} is not supported "
                           "(none, auto, required or a function)", "tool_choice")
    raise _invalid("tool_choice must be none, auto, required or "
                   '{"type": "function", "function": {"name": ...}}', "tool_choice")


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise _invalid("response_format must be an object with a type", "response_format")
    kind = fmt.get("type")
    if kind == "text":
        _check_keys(fmt, ("type",), "response_format")
        return None
    if kind == "json_object":
        _check_keys(fmt, ("type",), "response_format")
        return {"type": "json_object"}
    if kind == "json_schema":
        _check_keys(fmt, ("type", "json_schema"), "response_format")
        spec = fmt.get("json_schema")
        where = "response_format.json_schema"
        if not isinstance(spec, Mapping):
            raise _invalid(f"{where} must be an object with name and schema", where)
        _check_keys(spec, ("name", "description", "schema", "strict"), where)
        name = spec.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise _invalid(f"{where}.name must be 1-64 letters, digits, _ or -, got "
                           f"{_short(name)}", f"{where}.name")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, Mapping):
            raise _invalid(f"{where}.schema must be a JSON schema object", f"{where}.schema")
        _boolean(spec, "strict", f"{where}.strict")
        if schema is None:  # no schema: any JSON object, as OpenAI does
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": name, "schema": dict(schema),
                                                       "strict": bool(spec.get("strict"))}}
    raise _invalid(f"response_format.type must be text, json_object or json_schema, got "
                   f"{_short(kind)}", "response_format.type")


#: Fields refused whenever they are set (not null): what we cannot do, with why.
REFUSED = {
    "audio": "no audio output here",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the models here do not reason in a separate channel",
    "verbosity": "no verbosity control here",
    "web_search_options": "no web search here",
    "functions": "deprecated by OpenAI; use tools",
    "function_call": "deprecated by OpenAI; use tool_choice",
}
#: Fields accepted that change nothing in the answer (docs/serving.md says why).
NO_EFFECT = ("user", "safety_identifier", "prompt_cache_key", "metadata",
             "parallel_tool_calls", "prompt_cache_retention")
#: Fields honoured (or checked against what we can do: n, store, service_tier, modalities,
#: logit_bias).
HONOURED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature",
            "top_p", "seed", "stop", "stream", "stream_options", "n", "tools", "tool_choice",
            "response_format", "logprobs", "top_logprobs", "presence_penalty",
            "frequency_penalty", "store", "service_tier", "modalities", "logit_bias")
KNOWN_FIELDS = (*HONOURED, *NO_EFFECT, *REFUSED)


def _check_fields(body: Mapping[str, Any]) -> None:
    _check_keys(body, KNOWN_FIELDS, "body")
    for key, why in REFUSED.items():
        if body.get(key) is not None:
            raise ApiError(400, f"{key} is not supported: {why}", code="unsupported_parameter",
                           param=key)
    if _integer(body, "n", low=1) not in (None, 1):
        raise _unsupported("n must be 1: one choice per request", "n")
    if _boolean(body, "store"):
        raise _unsupported("store must be false: nothing is stored here", "store")
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default"):
        raise _unsupported(f"service_tier {_short(tier)} is not offered (auto or default)",
                           "service_tier")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported('modalities must be ["text"]: the answer is text only', "modalities")
    bias = body.get("logit_bias")
    if bias not in (None, {}):
        raise ApiError(400, "logit_bias is not supported: token ids differ from model to "
                       "model", code="unsupported_parameter", param="logit_bias")
    retention = body.get("prompt_cache_retention")
    if retention not in (None, "in_memory"):
        raise _unsupported("prompt_cache_retention must be in_memory", "prompt_cache_retention")
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise _invalid(f"{key} must be a string", key)
    metadata = body.get("metadata")
    if metadata is not None and not (
            isinstance(metadata, Mapping) and len(metadata) <= 16
            and all(isinstance(v, str) for v in metadata.values())):
        raise _invalid("metadata must be an object of at most 16 string values", "metadata")
    _boolean(body, "parallel_tool_calls")


def parse_chat_body(body: Any, limits: Limits = Limits()) -> ParsedChat:
    """Check an OpenAI chat-completions body; raise ApiError (400) naming the bad field."""
    if not isinstance(body, Mapping):
        raise ApiError(400, f"the body must be a JSON object, got {_type_name(body)}",
                       code="invalid_body")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model is required: a configured model name or \"auto\"", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("messages must be a non-empty list", "messages")
    parser = _Messages()
    messages = tuple(parser.parse(m, i) for i, m in enumerate(raw_messages))
    if len(parser.audio) > 1:
        raise _invalid("at most one input_audio part per request", "messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid(f"stream must be true or false, got {_short(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise _invalid("stream_options must be an object", "stream_options")
        if not stream:
            raise _invalid("stream_options is only allowed with stream: true", "stream_options")
        _check_keys(options, ("include_usage", "include_obfuscation"), "stream_options")
        _boolean(options, "include_usage", "stream_options.include_usage")
        _boolean(options, "include_obfuscation", "stream_options.include_obfuscation")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif stop == "" or (isinstance(stop, list) and "" in stop):
        raise _invalid("stop strings must not be empty", "stop")
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _invalid("stop must be a string or a list of up to 4 strings", "stop")
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(body, "max_tokens", low=1), "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise _invalid(f"{key} is {max_tokens}, more than this server allows "
                       f"([server] max_tokens_cap = {limits.max_tokens_cap})", key)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)

    tools = _tools(body)
    tool_choice = _tool_choice(body, tools)
    if tool_choice == "none":
        tools = []  # no call may be made: the model answers in text, as if it had none
    response_format = _response_format(body)
    logprobs = bool(_boolean(body, "logprobs"))
    top_logprobs = _integer(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise _invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if tools and response_format is not None:
        raise ApiError(400, "tools and a JSON response_format together are not supported: "
                       "the answer is either a tool call or JSON", code="unsupported_parameter",
                       param="response_format")

    chars = parser.chars + (len(json.dumps(tools)) if tools else 0)
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters, more than this server takes "
                       f"([server] max_prompt_chars = {limits.max_prompt_chars})",
                       code="context_length_exceeded", param="messages")

    needs = set()
    if tools:
        needs.add("tools")
    if response_format is not None:
        needs.add("json_schema")
    if logprobs:
        needs.add("logprobs")
    params = GenerationParams(
        max_tokens=max_tokens,
        # Left out of the body: the model's defaults ([models.NAME], its GGUF).
        temperature=temperature,
        seed=_integer(body, "seed"),
        stop=stops,
        top_p=top_p,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
        tools=tuple(tools),
        tool_choice=tool_choice if tools else "auto",
        response_format=response_format,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
    )
    request = ChatRequest(messages=messages, images=tuple(parser.images),
                          audio=parser.audio[0] if parser.audio else None,
                          needs=frozenset(needs), previous_models=tuple(parser.answered))
    include_usage = bool(options and options.get("include_usage"))
    return ParsedChat(model, request, params, bool(stream), include_usage)
