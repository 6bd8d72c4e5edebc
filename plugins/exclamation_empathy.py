"""Example signal plugin: replaces the ``empathy`` signal with one that also counts "!".

The default scorer, plus ``per_mark`` for every "!" or "¡" (at most ``cap``), capped at 1.
It registers the same signal name as the default ``empathy`` plugin and, not being
``trylast``, runs first, so its value is the one routing sees. Routing itself is untouched.

Its settings live in its own config table, checked when the config loads::

    [plugins.exclamation_empathy]
    per_mark = 0.1
    cap = 0.3
"""

import attrs

from sarai_router import hookimpl
from sarai_router.default_plugins.empathy import empathy_score


@attrs.frozen
class Settings:
    per_mark: float = 0.1
    cap: float = 0.3

    def check(self, config):
        for key in ("per_mark", "cap"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                yield key, f"must be between 0 and 1, got {getattr(self, key)}"


@hookimpl
def register_config_tables(register):
    register("exclamation_empathy", Settings)


@hookimpl
def register_signals(register, config):
    settings = config.plugin_config("exclamation_empathy")

    def empathy(request):
        text = request.text
        bangs = text.count("!") + text.count("¡")
        bonus = min(settings["cap"], settings["per_mark"] * bangs)
        return round(min(1.0, empathy_score(text) + bonus), 4)

    register("empathy", empathy)
