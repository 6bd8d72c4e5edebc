"""Tools, JSON output and logprobs for the ``llama_cpp`` backend.

Small chat models have no tool-calling template (SmolLM2's and Gemma 3's GGUF chat
templates know nothing of tools), so tools are offered the portable way:

- the functions are described in the system prompt, with the one reply shape that calls
  one: ``{"name": ..., "arguments": {...}}``;
- ``tool_choice`` "required" or a named function *constrains* the reply to that shape with
  a grammar built from the tools' JSON schemas (llama.cpp's GBNF), so the call always
  parses and its arguments always fit the schema; "auto" lets the model choose, and a
  reply that is exactly such an object becomes a tool call;
- earlier calls and their results go back to the model as plain turns (an assistant turn
  holding the call's JSON, a user turn holding the result).

``response_format`` constrains the reply with a grammar from the JSON schema (or any JSON
object). ``logprobs`` are read from the raw logits at each sampled token, through a logits
processor (llama-cpp-python's own logprobs need ``logits_all=True``, which keeps
n_ctx x n_vocab floats: 8.6 GB for Gemma 3 at n_ctx 8192).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Mapping, Sequence

from ..backend import GenerationParams, TokenLogprob, ToolCall
from ..errors import InvalidRequest

# -- prompts ------------------------------------------------------------------------------


def tools_instruction(params: GenerationParams) -> str:
    lines = ["You can call these functions:"]
    lines += [json.dumps(tool["function"], ensure_ascii=False) for tool in params.tools]
    shape = '{"name": "<function name>", "arguments": {<its arguments>}}'
    if params.tool_choice == "auto":
        lines.append(f"To call one, reply with only a JSON object: {shape}. "
                     "If no function helps, reply normally.")
    else:
        lines.append(f"Reply with only a JSON object that calls one of them: {shape}.")
    return "\n".join(lines)


def render_messages(messages: Sequence[Mapping[str, Any]], params: GenerationParams, *,
                    fold_system: bool) -> list[dict[str, Any]]:
    """OpenAI messages as plain system/user/assistant turns a chat template can format.

    ``fold_system``: the chat format drops system turns (llama-cpp-python's "gemma"), so
    their text goes at the head of the first user turn, as Gemma's own template does.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "tool":
            name = message.get("name") or "the function"
            out.append({"role": "user",
                        "content": f"The function {name} returned:\n{content or ''}"})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"],
                                 "arguments": _arguments(c["function"]["arguments"])},
                                ensure_ascii=False) for c in message["tool_calls"]]
            text = "\n".join(filter(None, [content if isinstance(content, str) else "",
                                           *calls]))
            out.append({"role": "assistant", "content": text})
        else:
            out.append({**message, "content": "" if content is None else content})
    if params.tools:
        instruction = tools_instruction(params)
        if out and out[0].get("role") == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instruction}"}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    if fold_system:
        out = _fold_system(out)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = [m["content"] for m in messages if m.get("role") == "system"
              and isinstance(m.get("content"), str) and m["content"]]
    rest = [m for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    head = "\n\n".join(system)
    for i, message in enumerate(rest):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            rest[i] = {**message, "content": f"{head}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": head}, *rest]


# -- grammars -----------------------------------------------------------------------------

# json_schema_to_gbnf lets raw control characters into strings, which JSON forbids.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def schema_grammar(schema: Mapping[str, Any], param: str) -> str:
    """GBNF for JSON matching ``schema``; InvalidRequest naming ``param`` if it can't be."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise InvalidRequest(f"{param}: the JSON schema is nested too deeply", param) from None
    except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions
        raise InvalidRequest(f"{param}: this JSON schema cannot be turned into a grammar "
                             f"({type(exc).__name__}: {str(exc)[:160]})", param) from None
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def grammar_for(params: GenerationParams) -> str | None:
    """The grammar that constrains the reply, or None for free text (and tool_choice auto)."""
    if params.tools and params.tool_choice != "auto":
        if isinstance(params.tool_choice, Mapping):
            name = params.tool_choice["function"]["name"]
            tools = [t for t in params.tools if t["function"]["name"] == name]
            param = "tool_choice"
        else:
            tools, param = list(params.tools), "tools"
        schemas = [_call_schema(t) for t in tools]
        return schema_grammar(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, param)
    fmt = params.response_format
    if fmt is None:
        return None
    if fmt["type"] == "json_schema":
        return schema_grammar(fmt["json_schema"]["schema"], "response_format.json_schema.schema")
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def check_grammar(llama: Any, grammar: str, param: str) -> None:
    """Refuse a grammar llama.cpp cannot parse before generating: llama-cpp-python would
    add the failed (NULL) sampler to its chain and crash."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode("utf-8"),
                                                   b"root")
    if not sampler:
        raise InvalidRequest(f"{param}: the JSON schema gives a grammar llama.cpp cannot "
                             "parse", param)
    llama_cpp.llama_sampler_free(sampler)


# -- tool calls in the reply --------------------------------------------------------------


def parse_tool_calls(text: str, params: GenerationParams) -> tuple[ToolCall, ...]:
    """The calls in a reply that is only a call object (or a list of them), naming offered
    functions with object arguments; () when it is anything else."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    if not body.startswith(("{", "[")):
        return ()
    try:
        value = json.loads(body)
    except ValueError:
        return ()
    items = value if isinstance(value, list) else [value]
    names = {t["function"]["name"] for t in params.tools}
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names
                and isinstance(item.get("arguments", {}), dict)):
            return ()
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=item["name"],
                              arguments=json.dumps(item.get("arguments", {}),
                                                   ensure_ascii=False)))
    return tuple(calls)


def may_be_call(text: str) -> bool:
    """Whether a reply starting with ``text`` could still turn out to be a call object."""
    head = text.lstrip()
    return not head or head.startswith(("{", "[", "`"))


# -- logprobs -------------------------------------------------------------------------------


class LogprobRecorder:
    """Log probabilities of each sampled token, from the raw logits (before temperature,
    penalties and grammar: the model's own distribution, as OpenAI reports it).

    ``processor`` goes first in the logits processors (it sees every step's logits);
    ``sampled`` hears the token chosen at that step. ``take(text_bytes)`` hands out the
    tokens whose bytes the yielded text now covers, so each piece carries its own tokens
    and tokens of a held-back stop string never do.
    """

    def __init__(self, llama: Any, top_n: int):
        import numpy as np

        import llama_cpp

        self._np = np
        self.llama = llama
        self.top_n = top_n
        self._is_eog = lambda token: llama_cpp.llama_vocab_is_eog(llama._model.vocab, token)
        self._pending = None
        self._tokens: list[TokenLogprob] = []
        self._ends: list[int] = []  # cumulative byte offset where each token ends
        self._given = 0

    def processor(self, _input_ids, scores):
        np = self._np
        logits = np.asarray(scores, dtype=np.float64)
        peak = logits.max()
        self._pending = logits - (peak + np.log(np.exp(logits - peak).sum()))
        return scores

    def sampled(self, token: int) -> None:
        logprobs, self._pending = self._pending, None
        if logprobs is None or self._is_eog(token):
            return
        raw = self._piece(token)
        top = ()
        if self.top_n:
            np = self._np
            best = np.argpartition(logprobs, -self.top_n)[-self.top_n:]
            best = best[np.argsort(-logprobs[best])]
            top = tuple((self._text(self._piece(int(i))), float(logprobs[i]),
                         tuple(self._piece(int(i)))) for i in best)
        self._tokens.append(TokenLogprob(token=self._text(raw), logprob=float(logprobs[token]),
                                         bytes=tuple(raw), top=top))
        self._ends.append((self._ends[-1] if self._ends else 0) + len(raw))

    def take(self, text_bytes: int) -> tuple[TokenLogprob, ...]:
        start = self._given
        while self._given < len(self._tokens) and self._ends[self._given] <= text_bytes:
            self._given += 1
        return tuple(self._tokens[start:self._given])

    def _piece(self, token: int) -> bytes:
        # (token_to_piece hands back a fixed 32-byte buffer, zero-padded)
        return self.llama.detokenize([token])

    @staticmethod
    def _text(raw: bytes) -> str:
        return raw.decode("utf-8", errors="replace")
