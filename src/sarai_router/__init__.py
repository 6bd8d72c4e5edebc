"""sarai-router: a plugin-based router for local LLMs (fast vs quality, and who stays in RAM)."""

from .hookspecs import hookimpl
from .types import ChatRequest, Route, RouteDecision

__version__ = "0.1.0"
__all__ = ["hookimpl", "ChatRequest", "Route", "RouteDecision", "__version__"]
