"""Example signal plugin: replaces the ``empathy`` signal with one that also counts "!".

The default scorer, plus 0.1 for every "!" or "¡" (at most 0.3), capped at 1. It registers
the same signal name as the default ``empathy`` plugin and, not being ``trylast``, runs
first, so its value is the one routing sees. Routing itself is untouched.
"""

from sarai_router import hookimpl
from sarai_router.default_plugins.empathy import empathy_score


def empathy(request):
    text = request.text
    bangs = text.count("!") + text.count("¡")
    return round(min(1.0, empathy_score(text) + min(0.3, 0.1 * bangs)), 4)


@hookimpl
def register_signals(register):
    register("empathy", empathy)
