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
import logging
import os
import re
import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from ..backend import GenerationParams, TokenLogprob, ToolCall
from ..errors import InvalidRequest
from .grammar_limits import check_grammar_text, check_schema

log = logging.getLogger(__name__)

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


def _converter():
    """llama-cpp-python's JSON schema converter, with two of its faults mended:

    - it resolves a ``$ref`` only where it meets one while walking down, and stops at a
      node holding a ``$ref``: a root ``$ref`` to ``#/$defs/a`` whose definition refers to
      another (or to itself) fails with a bare KeyError. Every local reference is resolved
      here, wherever it is;
    - it builds an object's chain of optional properties by recursion, once per suffix of
      the chain: 1,000 optional properties took 4.9 s of CPU and 2,000 hit Python's
      recursion limit ("nested too deeply"). Built here once, from the end, in a loop.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    class Converter(SchemaConverter):
        def resolve_refs(self, schema, url):
            pending = [schema]
            while pending:
                node = pending.pop()
                if isinstance(node, list):
                    pending.extend(node)
                    continue
                if not isinstance(node, dict):
                    continue
                ref = node.get("$ref")
                if isinstance(ref, str):
                    if not ref.startswith("#"):
                        raise _SchemaProblem(f"$ref {ref[:80]!r}: only local references "
                                             "(#/...) are supported")
                    full = f"{url}{ref}"
                    node["$ref"] = full
                    if full not in self._refs:
                        self._refs[full] = _pointer_target(schema, ref)
                pending.extend(node.values())
            return schema

        def _build_object_rule(self, properties, required, name, additional_properties):
            prefix = f"{name}-" if name else ""
            order = self._prop_order
            sorted_props = [kv[0] for _, kv in sorted(
                enumerate(properties),
                key=lambda ikv: (order.get(ikv[1][0], len(order)), ikv[0]))]
            kv_rules = {}
            for prop_name, prop_schema in properties:
                value_rule = self.visit(prop_schema, f"{prefix}{prop_name}")
                kv_rules[prop_name] = self._add_rule(
                    f"{prefix}{prop_name}-kv",
                    f'{self._format_literal(json.dumps(prop_name))} space ":" space '
                    f"{value_rule}")
            required_props = [k for k in sorted_props if k in required]
            optional_props = [k for k in sorted_props if k not in required]
            if additional_properties is True or isinstance(additional_properties, dict):
                sub_name = f"{prefix}additional"
                value_rule = self.visit({} if additional_properties is True
                                        else additional_properties, f"{sub_name}-value")
                kv_rules["*"] = self._add_rule(
                    f"{sub_name}-kv", self._add_primitive("string", _primitive("string"))
                    + f' ":" space {value_rule}')
                optional_props.append("*")

            def piece(key, optional):
                kv = kv_rules[key]
                if key == "*":
                    kv = self._add_rule(f"{prefix}additional-kvs",
                                        f'{kv} ( "," space {kv} )*')
                return f'( "," space {kv} )?' if optional else kv

            # rests[i]: what may follow optional_props[i] (the later ones, each optional)
            rests = [""] * len(optional_props)
            for i in range(len(optional_props) - 2, -1, -1):
                body = piece(optional_props[i + 1], True)
                if rests[i + 1]:
                    body += " " + rests[i + 1]
                rests[i] = self._add_rule(f"{prefix}{optional_props[i]}-rest", body)
            rule = '"{" space ' + ' "," space '.join(kv_rules[k] for k in required_props)
            if optional_props:
                rule += " ("
                if required_props:
                    rule += ' "," space ( '
                rule += " | ".join(piece(key, False) + (" " + rests[i] if rests[i] else "")
                                   for i, key in enumerate(optional_props))
                if required_props:
                    rule += " )"
                rule += " )?"
            return rule + ' "}" space'

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


class _SchemaProblem(ValueError):
    """What makes a schema unusable, in words fit for the client."""


def _primitive(name: str):
    from llama_cpp.llama_grammar import PRIMITIVE_RULES

    return PRIMITIVE_RULES[name]


def _pointer_target(schema: Any, ref: str) -> Any:
    """What the local JSON pointer ``ref`` (``#/$defs/a``) points at in ``schema``."""
    target = schema
    for part in ref.partition("#")[2].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise _SchemaProblem(f"$ref {ref[:80]!r} points at nothing in the schema")
    if not isinstance(target, dict):
        raise _SchemaProblem(f"$ref {ref[:80]!r} points at something that is not a schema")
    return target


def schema_grammar(schema: Mapping[str, Any], param: str) -> str:
    """GBNF for JSON matching ``schema``; InvalidRequest naming ``param`` if it can't be.

    The schema is measured first (``grammar_limits``): what would make a grammar too large
    or too deep for llama.cpp is refused by its keyword and place before it is expanded.
    """
    check_schema(schema, param)
    converter = _converter()
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
        converter.visit(resolved, "")
        grammar = converter.format_grammar()
    except _SchemaProblem as exc:
        raise InvalidRequest(f"{param}: {exc}", param) from None
    except RecursionError:
        raise InvalidRequest(f"{param}: the JSON schema is nested too deeply", param) from None
    except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions
        raise InvalidRequest(f"{param}: this JSON schema cannot be turned into a grammar "
                             f"({type(exc).__name__}: {str(exc)[:160]})", param) from None
    check_grammar_text(grammar, param)
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
        for i, tool in enumerate(params.tools):  # named by where the client put them
            if any(tool is t for t in tools):
                check_schema(tool["function"].get("parameters"),
                             f"tools[{i}].function.parameters")
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
    add the failed (NULL) sampler to its chain and crash.

    On a grammar it refuses, llama.cpp prints the whole grammar to stderr (120 KB for a
    300-byte request): what it prints meanwhile is caught, its reason kept for the
    answer, and everything else that reached stderr meanwhile is passed on."""
    import llama_cpp

    with _stderr_caught() as caught:
        sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab,
                                                       grammar.encode("utf-8"), b"root")
    reason = _pass_on_stderr(b"".join(caught), grammar)
    if not sampler:
        why = f" ({reason})" if reason else ""
        raise InvalidRequest(f"{param}: the JSON schema gives a grammar llama.cpp cannot "
                             f"parse{why}", param)
    llama_cpp.llama_sampler_free(sampler)


_stderr_lock = threading.Lock()
_GRAMMAR_ERROR = re.compile(rb"[\w:]*: error parsing grammar: ([^\n]*)\n\n")


@contextmanager
def _stderr_caught() -> Iterator[list[bytes]]:
    """While inside, file descriptor 2 writes to a temporary file; the list yielded holds
    what was written once the block is left."""
    import tempfile  # here: `route` imports this module (for the backend's settings) and
    # tempfile's own imports (shutil, random, bz2, lzma) cost it milliseconds

    caught: list[bytes] = []
    with _stderr_lock, tempfile.TemporaryFile() as file:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(file.fileno(), 2)
            yield caught
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            caught.append(file.read())


def _pass_on_stderr(data: bytes, grammar: str) -> str:
    """Write ``data`` back to stderr without llama.cpp's grammar dump; the dump's reason."""
    match = _GRAMMAR_ERROR.search(data)
    if match is None:
        if data:
            os.write(2, data)
        return ""
    rest = data[match.end():]
    dumped = grammar.encode("utf-8")
    if rest.startswith(dumped):
        rest = rest[len(dumped):].removeprefix(b"\n")
    kept = data[:match.start()] + rest
    if kept:
        os.write(2, kept)
    reason = match.group(1).decode("utf-8", errors="replace")
    log.debug("llama.cpp refused a grammar of %d characters: %s", len(grammar), reason)
    return reason[:200]


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
