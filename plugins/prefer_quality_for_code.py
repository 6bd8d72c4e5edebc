"""Example routing plugin: code, technical or long prompts go to the "quality" model.

Enable it with ``[plugins] dirs = ["plugins"]`` (see plugins/README.md). Anything it passes
on (returns None) is decided by the default heuristic, which runs after it.
"""

import re

from sarai_router import Route, hookimpl

MODEL = "quality"
LONG_PROMPT_CHARS = 400
TECHNICAL = re.compile(
    r"```|\b(def|class|import|code|function|bug|error|traceback|python|sql|regex|"
    r"algorithm|código|función|algoritmo)\b",
    re.IGNORECASE,
)


@hookimpl
def select_route(request, signals, models):
    # Attachments are the heuristic's hard constraint; a config without "quality" is not ours.
    if MODEL not in models or signals.get("modality") != "text":
        return None
    found = TECHNICAL.search(request.text)
    if found:
        return Route(MODEL, f"prefer_quality_for_code: technical prompt ({found.group(0)!r})")
    if signals["chars"] > LONG_PROMPT_CHARS:
        return Route(MODEL, f"prefer_quality_for_code: long prompt ({signals['chars']} chars)")
    return None
