"""Default plugin ``embeddings``: ``POST /v1/embeddings`` (OpenAI's shape) for the models
configured with ``embedding = true``.

Block it with ``[plugins] disable = ["embeddings"]``. The work is in
``sarai_router.serving.embeddings``, shared with the Ollama dialect's ``/api/embed``.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def register_routes():
    # Imported here: the server stack stays out of `route` and `--help`.
    from ..serving import embeddings

    return embeddings.routes()
