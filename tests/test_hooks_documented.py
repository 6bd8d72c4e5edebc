"""Every hookspec is documented in docs/plugins.md and has a ``test_hook_<name>`` test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sarai_router import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DOCS = ROOT / "docs" / "plugins.md"
SPEC_MARKER = f"{hookspecs.PROJECT_NAME}_spec"  # what pluggy's HookspecMarker sets


def hook_names() -> list[str]:
    return sorted(name for name, value in vars(hookspecs).items()
                  if callable(value) and hasattr(value, SPEC_MARKER))


def test_hookspecs_are_found():
    assert {"select_route", "register_signals", "register_backends", "select_eviction",
            "model_expired", "observe", "register_commands", "register_routes", "startup",
            "shutdown"} <= set(hook_names())


def test_every_event_kind_is_documented():
    """Each kind the core emits is in docs/plugins.md's table under ``### observe``."""
    from sarai_router.events import EVENT_KINDS

    text = PLUGIN_DOCS.read_text(encoding="utf-8")
    section = text.split("### observe", 1)[1].split("\n### ", 1)[0]
    missing = [kind for kind in EVENT_KINDS if f"`{kind}`" not in section]
    assert missing == []


def test_every_hookspec_has_a_docstring():
    missing = [name for name in hook_names() if not (getattr(hookspecs, name).__doc__ or "").strip()]
    assert missing == []


@pytest.mark.parametrize("hook", hook_names())
def test_hook_is_documented(hook):
    assert PLUGIN_DOCS.is_file(), f"{PLUGIN_DOCS} is missing"
    headings = re.findall(r"^###\s+`?(\w+)", PLUGIN_DOCS.read_text(encoding="utf-8"), re.MULTILINE)
    assert hook in headings, f"docs/plugins.md has no '### {hook}' section"


def _test_function_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {node.name for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


@pytest.mark.parametrize("hook", hook_names())
def test_hook_is_tested(hook):
    assert f"test_hook_{hook}" in _test_function_names(), (
        f"no test function named test_hook_{hook} under tests/")


def test_the_core_emits_only_listed_kinds():
    """Every ``hooks.emit("kind", ...)`` in the package names a kind of ``EVENT_KINDS``, and
    every listed kind is emitted somewhere."""
    from sarai_router.events import EVENT_KINDS

    emitted = set()
    for path in (ROOT / "src" / "sarai_router").rglob("*.py"):
        emitted |= set(re.findall(r"\.emit\(\s*\"(\w+)\"", path.read_text(encoding="utf-8")))
    assert emitted - set(EVENT_KINDS) == set()
    assert set(EVENT_KINDS) - emitted == set()
