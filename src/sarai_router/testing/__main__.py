"""``python -m sarai_router.testing ARGS``: ``sarai-router ARGS`` with the ``echo`` test
backend registered, for the servers the testing kit starts."""

from __future__ import annotations

from ..cli import main
from ..plugins import PROCESS_PLUGINS
from .echo import ECHO_BACKEND, echo_plugin

PROCESS_PLUGINS[ECHO_BACKEND] = echo_plugin
main()
