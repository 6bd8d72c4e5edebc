"""Example routing plugin: code, technical or long prompts go to the "quality" model.

Enable it with ``[plugins] dirs = ["plugins"]`` (see plugins/README.md). Anything it passes
on (returns None) is decided by the default heuristic, which runs after it. Its settings
come from its own config table::

    [plugins.prefer_quality_for_code]
    model = "quality"
    long_prompt_chars = 400
"""

import re

import attrs

from sarai_router import Route, hookimpl

TECHNICAL = re.compile(
    r"```|\b(def|class|import|code|function|bug|error|traceback|python|sql|regex|"
    r"algorithm|código|función|algoritmo)\b",
    re.IGNORECASE,
)


@attrs.frozen
class Settings:
    model: str = "quality"
    long_prompt_chars: int = 400

    def check(self, config):
        if self.long_prompt_chars < 1:
            yield "long_prompt_chars", "must be >= 1"


@hookimpl
def register_config_tables(register):
    register("prefer_quality_for_code", Settings)


@hookimpl
def select_route(request, signals, models, config):
    settings = config.plugin_config("prefer_quality_for_code")
    model, long_prompt = settings["model"], settings["long_prompt_chars"]
    # Attachments are the heuristic's hard constraint; a config without the model is not ours.
    if model not in models or signals.get("modality") != "text":
        return None
    found = TECHNICAL.search(request.text)
    if found:
        return Route(model, f"prefer_quality_for_code: technical prompt ({found.group(0)!r})")
    if signals["chars"] > long_prompt:
        return Route(model, f"prefer_quality_for_code: long prompt ({signals['chars']} chars)")
    return None
