"""The OpenAI-compatible server: the app (``app``), the OpenAI dialect (``openai``) and the
Prometheus metrics (``metrics``). A front end of the core, imported only by ``serve``."""

from .app import SaraiServer, create_app, serve

__all__ = ["SaraiServer", "create_app", "serve"]
