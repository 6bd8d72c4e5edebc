"""Limits that keep a JSON schema's grammar within what llama.cpp can take.

llama-cpp-python turns a bounded repetition (``maxLength``, ``maxItems``, a pattern's
``{m,n}``) into that many nested copies of the item, and llama.cpp parses a grammar, and
walks a chain of optional items while it samples, by recursion on the thread's stack: a
large enough bound overflows the stack and takes the whole process down (SIGSEGV), and a
pattern whose repetitions nest multiplies its size before anything could look at it. So a
schema is measured *before* it is converted, and refused by the keyword and the place
that make it too big. The figures are in docs/RELIABILITY.md (where the stack overflows,
and the margin kept below it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

from ..errors import InvalidRequest

#: The largest repetition bound a schema may ask for (``maxLength``, ``minLength``,
#: ``maxItems``, ``minItems``, a pattern's ``{m,n}``). Each unit becomes a nested grammar
#: rule: llama.cpp itself refuses more than about 1,000 (its "sane defaults" check, made
#: only after it has recursed through them all), and its parser overflows an 8 MB thread
#: stack at about 18,600 (docs/RELIABILITY.md).
MAX_REPEAT = 1000
#: The most a pattern may expand to, counting its nested repetitions multiplied out.
MAX_PATTERN_SIZE = 20000
#: The most variable-length parts in a row in a pattern (``(a?){120}``): each multiplies
#: the ways a prefix can match, which llama.cpp tracks one by one for every candidate
#: token. Measured per token: 32 in a row at most 0.3 s, 120 in a row 4-32 s
#: (docs/RELIABILITY.md).
MAX_AMBIGUITY = 32
#: The most optional properties in one object: llama.cpp walks the chain of them at every
#: step of sampling, for every candidate token. Measured per token: 200 optional
#: properties 0.33 s at worst, 2,000 over a minute (docs/RELIABILITY.md).
MAX_OPTIONAL_PROPERTIES = 256
#: The largest grammar built from a schema (characters of GBNF).
MAX_GRAMMAR_CHARS = 2_000_000
#: The deepest nesting of groups in one grammar rule (a margin of 9 below the overflow).
MAX_GRAMMAR_NESTING = 2 * MAX_REPEAT

_BOUND_KEYWORDS = ("maxLength", "minLength", "maxItems", "minItems")
_BRACES = re.compile(r"\{(\d*)(,?)(\d*)\}")


def _pointer(parts: tuple[str, ...]) -> str:
    """A JSON pointer (``#/properties/s``) to where a keyword is."""
    return "#" + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _refuse(param: str, keyword: str, parts: tuple[str, ...], why: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {keyword} at {_pointer(parts)} {why}", param)


def check_schema(schema: Any, param: str) -> None:
    """Refuse (InvalidRequest naming the keyword and where) a schema whose grammar would be
    too large or too deep for llama.cpp. Walks the schema without recursion."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(schema, ())]
    while pending:
        node, parts = pending.pop()
        if isinstance(node, list):
            pending.extend((item, parts + (str(i),)) for i, item in enumerate(node))
            continue
        if not isinstance(node, Mapping):
            continue
        for keyword in _BOUND_KEYWORDS:
            value = node.get(keyword)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value > MAX_REPEAT:
                # (not "{value:g}": an integer of 400 digits has no float)
                shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}..."
                raise _refuse(param, keyword, parts + (keyword,),
                              f"is {shown}; at most {MAX_REPEAT} here (each unit becomes "
                              "a grammar rule)")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            check_pattern(pattern, param, parts + ("pattern",))
        properties = node.get("properties")
        if isinstance(properties, Mapping):
            required = node.get("required")
            required = ({r for r in required if isinstance(r, str)}
                        if isinstance(required, list) else set())
            optional = sum(1 for key in properties if key not in required)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise _refuse(param, "properties", parts + ("properties",),
                              f"has {optional} optional properties; at most "
                              f"{MAX_OPTIONAL_PROPERTIES} here (the grammar's work for "
                              "each token grows with the square of it); list more of "
                              "them in required")
        pending.extend((value, parts + (str(key),)) for key, value in node.items())


def check_params(params: Any) -> None:
    """Check every schema a generation's ``GenerationParams`` would turn into a grammar:
    ``response_format``'s and every tool's ``parameters`` (llama-server builds grammars
    for tools even under ``tool_choice`` "auto")."""
    fmt = params.response_format
    if fmt is not None and fmt.get("type") == "json_schema":
        check_schema(fmt["json_schema"].get("schema"), "response_format.json_schema.schema")
    for i, tool in enumerate(params.tools):
        check_schema(tool["function"].get("parameters"), f"tools[{i}].function.parameters")


def check_pattern(pattern: str, param: str, parts: tuple[str, ...]) -> None:
    """Refuse a pattern whose grammar would be too big or too ambiguous (see
    ``pattern_shape``)."""
    shape = pattern_shape(pattern)
    if shape.bound > MAX_REPEAT:
        raise _refuse(param, "pattern", parts, f"repeats something {shape.bound} times; at "
                      f"most {MAX_REPEAT} here (each repetition becomes a grammar rule)")
    if shape.size > MAX_PATTERN_SIZE:
        raise _refuse(param, "pattern", parts, f"expands to about {shape.size} grammar items "
                      "once its repetitions are multiplied out; at most "
                      f"{MAX_PATTERN_SIZE} here")
    if shape.empty_loop:
        raise _refuse(param, "pattern", parts, "repeats without bound something that may "
                      "match nothing (like (a?)* or (a*)+); drop the inner quantifier")
    if shape.ambiguity > MAX_AMBIGUITY:
        raise _refuse(param, "pattern", parts, f"has {shape.ambiguity} variable-length parts "
                      f"in a row (like (a?){{{shape.ambiguity}}}); at most {MAX_AMBIGUITY} "
                      "here: each one multiplies the ways a prefix can match, and the "
                      "grammar's work for every token")


class PatternShape(NamedTuple):
    #: about how many grammar items the pattern expands to
    size: int
    #: its largest repetition bound
    bound: int
    #: the most variable-length parts (x?, x*, x+, x{m,n}) in a row, repetitions
    #: multiplied out: the ways one prefix can match grow with it
    ambiguity: int
    #: something that may match nothing is repeated without bound
    empty_loop: bool


class _Group:
    """One parenthesised group (or the whole pattern) being measured."""

    __slots__ = ("done", "current", "last", "run", "last_weight", "max_run",
                 "last_nullable", "alt_nullable", "nullable", "alternatives",
                 "alt_nullable_before")

    def __init__(self):
        self.done = 0  # the size of the alternatives before the current one
        self.current = 0  # the size of the current alternative so far
        self.last = 0  # the size of the last atom (what a quantifier repeats)
        self.run = 0  # variable-length parts in a row, up to the last atom
        self.last_weight = 0  # of those, the last atom's share
        self.max_run = 0
        self.last_nullable = False
        self.alt_nullable = True  # the current alternative may match nothing
        self.nullable = False  # an earlier alternative may match nothing
        self.alternatives = 1
        self.alt_nullable_before = True  # alt_nullable before the last atom

    def atom(self, size: int, weight: int = 0, nullable: bool = False) -> None:
        self.current += size
        self.last = size
        self.run = self.run + weight if weight else 0
        self.last_weight = weight
        self.max_run = max(self.max_run, self.run)
        self.last_nullable = nullable
        self.alt_nullable_before = self.alt_nullable
        self.alt_nullable = self.alt_nullable and nullable

    def repeat(self, low: int, high: int | None) -> bool:
        """Apply ``{low,high}`` (None: unbounded) to the last atom; False if that repeats
        something that may match nothing without bound."""
        times = min(max(low, high if high is not None else low + 1, 1), _CAP)
        empty_loop = high is None and self.last_nullable
        self.current = min(self.current + self.last * (times - 1), _CAP)
        self.last = min(self.last * times, _CAP)
        weight = self.last_weight * times if self.last_weight else int(low != high)
        self.run = self.run - self.last_weight + weight if weight else 0
        self.last_weight = weight
        self.max_run = max(self.max_run, min(self.run, _CAP))
        nullable = self.last_nullable or low == 0
        self.alt_nullable = self.alt_nullable_before and nullable
        self.last_nullable = nullable
        return not empty_loop

    def alternative(self) -> None:
        self.done += self.current
        self.nullable = self.nullable or self.alt_nullable
        self.current = self.last = self.run = self.last_weight = 0
        self.last_nullable = False
        self.alt_nullable = self.alt_nullable_before = True
        self.alternatives += 1

    def size(self) -> int:
        return self.done + self.current

    def weight(self) -> int:
        """How many variable-length parts the group counts for, as one atom."""
        if self.max_run:
            return self.max_run
        return int(self.alternatives > 1)

    def may_be_empty(self) -> bool:
        return self.nullable or self.alt_nullable


_CAP = 10 ** 12  # past this, any size is refused: no need to keep multiplying


def _count(digits: str) -> int:
    # (int() refuses more than 4,300 digits: a pattern may hold more)
    return int(digits) if len(digits) <= 12 else _CAP


def pattern_shape(pattern: str) -> PatternShape:
    """Measure ``pattern`` the way llama-cpp-python's converter expands it: ``x{m,n}`` is
    n copies of x, ``x{m,}`` m + 1, ``x+`` two; groups and classes count as their content."""
    groups = [_Group()]
    bound = max_run = 0
    empty_loop = False
    i, end = 0, len(pattern)

    def close() -> None:
        nonlocal max_run
        inner = groups.pop()
        max_run = max(max_run, inner.max_run)
        groups[-1].atom(max(1, min(inner.size(), _CAP)), inner.weight(), inner.may_be_empty())

    def quantify(group: _Group, low: int, high: int | None) -> None:
        nonlocal empty_loop
        if not group.repeat(low, high):
            empty_loop = True

    while i < end:
        char = pattern[i]
        group = groups[-1]
        if char == "\\":
            group.atom(1)
            i += 2
            continue
        if char == "[":
            j = i + 1
            if j < end and pattern[j] == "^":
                j += 1
            if j < end and pattern[j] == "]":
                j += 1
            while j < end and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            group.atom(1)
            i = j + 1
            continue
        if char == "(":
            groups.append(_Group())
            i += 1
            if pattern.startswith("?", i):  # (?:...) and the like
                i += 2
            continue
        if char == ")":
            if len(groups) > 1:
                close()
            i += 1
            continue
        if char == "|":
            group.alternative()
            i += 1
            continue
        if char in "*+?":
            quantify(group, 1 if char == "+" else 0, 1 if char == "?" else None)
            i += 1
            continue
        if char == "{":
            braces = _BRACES.match(pattern, i)
            if braces:
                low, comma, high = braces.groups()
                low_n = _count(low) if low else 0
                high_n = (_count(high) if high else None) if comma else low_n
                bound = max(bound, low_n, high_n or 0)
                quantify(group, low_n, high_n)
                i = braces.end()
                continue
        group.atom(1)
        i += 1
    while len(groups) > 1:  # an unclosed group: the converter will refuse it anyway
        close()
    top = groups[0]
    return PatternShape(size=min(top.size(), _CAP), bound=bound,
                        ambiguity=min(max(max_run, top.max_run), _CAP), empty_loop=empty_loop)


def check_grammar_text(grammar: str, param: str) -> None:
    """The last check, on the grammar itself: its size and its deepest nesting of groups
    (what llama.cpp's parser recurses on). A schema that passed ``check_schema`` should
    never fail it; it catches combinations those per-keyword limits don't."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{param}: the JSON schema gives a grammar of {len(grammar)} "
                             f"characters; at most {MAX_GRAMMAR_CHARS} here (lower its "
                             "maxLength, maxItems or pattern bounds)", param)
    depth = deepest = 0
    quoted = in_class = False
    i, end = 0, len(grammar)
    while i < end:
        char = grammar[i]
        if quoted or in_class:
            if char == "\\":
                i += 2
                continue
            if (quoted and char == '"') or (in_class and char == "]"):
                quoted = in_class = False
        elif char == '"':
            quoted = True
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        elif char == "\n":
            depth = 0
        i += 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise InvalidRequest(f"{param}: the JSON schema gives a grammar nested {deepest} "
                             f"levels deep; at most {MAX_GRAMMAR_NESTING} here (lower its "
                             "maxLength, maxItems or pattern bounds)", param)
