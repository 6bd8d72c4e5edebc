"""sarai-router: a plugin-based router for local LLMs (fast vs quality, and who stays in RAM)."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing here would cost what the lazy names save
if TYPE_CHECKING:
    from typing import Any

    from .hookspecs import hookimpl
    from .types import ChatRequest, Route, RouteDecision

__version__ = "0.1.0"
__all__ = ["hookimpl", "ChatRequest", "Route", "RouteDecision", "__version__"]

#: The public names, each imported on first use: the ``sarai-router`` program loads its
#: modules with the garbage collector paused (``__main__.py``), and importing the package
#: first must not load them before it can.
_LAZY = {"hookimpl": "hookspecs", "ChatRequest": "types", "Route": "types",
         "RouteDecision": "types"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
