"""Default signals: input length, modality and the multimodal keywords the text mentions."""

from __future__ import annotations

import re

from ..hookspecs import hookimpl

#: The words that make a text ask for the multimodal model (``[plugins.heuristic]``).
DEFAULT_MULTIMODAL_KEYWORDS = (
    "imagen", "image", "foto", "photo", "picture", "fotografía", "screenshot",
    "captura", "audio", "vídeo", "video", "diagrama", "diagram",
)


def chars(request) -> int:
    return len(request.text)


def modality(request) -> str:
    """What is attached: ``audio`` beats ``image`` beats plain ``text``."""
    if request.audio is not None:
        return "audio"
    if request.images:
        return "image"
    return "text"


def keyword_matcher(keywords):
    """A function returning the configured keywords that appear as words in the text."""
    if not keywords:
        return lambda request: []
    # One whole-word regex per keyword, run only when the keyword occurs in the lower-cased
    # text at all: a substring test is C-fast, while one alternation regex tried at every
    # position of a 2,000-character text cost ~80 µs a decision. Each regex is compiled the
    # first time its keyword occurs: `route` on a text that names none compiles none.
    needles = [k.lower() for k in sorted(set(keywords), key=len, reverse=True)]
    patterns: dict[str, re.Pattern[str]] = {}

    def pattern(needle: str) -> re.Pattern[str]:
        found = patterns.get(needle)
        if found is None:
            found = patterns[needle] = re.compile(r"(?<!\w)" + re.escape(needle) + r"(?!\w)",
                                                  re.IGNORECASE)
        return found

    def multimodal_keywords(request) -> list[str]:
        text = request.text
        lowered = text.lower()
        found = set()
        for needle in needles:
            if needle in lowered:
                found.update(m.group(0).lower() for m in pattern(needle).finditer(text))
        return sorted(found)

    return multimodal_keywords


@hookimpl(trylast=True)
def register_signals(register, config):
    register("chars", chars)
    register("modality", modality)
    keywords = config.plugin_config("heuristic").get("multimodal_keywords",
                                                    DEFAULT_MULTIMODAL_KEYWORDS)
    register("multimodal_keywords", keyword_matcher(keywords))
