"""The JSON body of a request and the checks its fields share across the dialects: the
body parsed with limits (depth, text), and typed field readers that answer a 400 naming the
field (``_number``, ``_integer``, ``_boolean``, ``_check_keys``)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .openai_errors import ApiError

#: Deeper JSON is refused before anything walks it (OpenAI allows 10 levels in a schema).
MAX_JSON_DEPTH = 64


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON: strict (no NaN/Infinity), at most MAX_JSON_DEPTH deep, every string
    valid Unicode (a lone UTF-16 surrogate such as ``\\ud800`` is refused)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, f"the body is not valid JSON: nested deeper than "
                       f"{MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid JSON: it is not UTF-8 text",
                       code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    _check_json_tree(body)
    return body


def _check_json_tree(body: Any) -> None:
    # Iterative: a recursive walk is what a deep body would break.
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the body is not valid JSON: nested deeper than "
                               f"{MAX_JSON_DEPTH} levels", code="invalid_json")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    if isinstance(item, (str, dict, list)):
                        stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value
                             if isinstance(item, (str, dict, list)))


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start]
            raise ApiError(400, f"the body holds a lone UTF-16 surrogate (\\u{ord(bad):04x}), "
                           "which is not a Unicode character", code="invalid_json") from None


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="unsupported_value", param=param)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _invalid(f"{key} must be a number between {low:g} and {high:g}, got "
                       f"{_short(value)}", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int | None = None,
             high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int)
            or (low is not None and value < low) or (high is not None and value > high)):
        bound = (f" between {low} and {high}" if low is not None and high is not None
                 else f" >= {low}" if low is not None else "")
        raise _invalid(f"{key} must be an integer{bound}, got {_short(value)}", key)
    return value


def _boolean(body: Mapping[str, Any], key: str, where: str | None = None) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        name = where or key
        raise _invalid(f"{name} must be true or false, got {_short(value)}", name)
    return value


def _short(value: Any) -> str:
    """A value for an error message: short, and never a whole hostile payload."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_keys(raw: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [key for key in raw if key not in allowed]
    if unknown:
        names = ", ".join(repr(k)[:40] for k in unknown[:5])
        known = ("see docs/serving.md for the fields taken" if where == "body"
                 else f"known: {', '.join(allowed)}")
        raise ApiError(400, f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                       f"{names} ({known})", code="unknown_parameter",
                       param=(f"{where}.{unknown[0]}" if where != "body" else unknown[0])[:100])
