"""Default plugin ``ollama``: Ollama's API on the server's own port (``/api/chat``,
``/api/generate``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``,
``/api/embed``, ``/api/embeddings``), for the clients that speak only that dialect.

Block it with ``[plugins] disable = ["ollama"]``. The translation is in
``sarai_router.serving.ollama_dialect``; docs/serving.md has what maps to what.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def register_routes():
    # Imported here: the server stack stays out of `route` and `--help`.
    from ..serving import ollama

    return ollama.routes()
