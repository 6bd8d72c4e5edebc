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
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True)) + r")(?!\w)",
        re.IGNORECASE,
    )

    def multimodal_keywords(request) -> list[str]:
        return sorted({m.group(1).lower() for m in pattern.finditer(request.text)})

    return multimodal_keywords


@hookimpl(trylast=True)
def register_signals(register, config):
    register("chars", chars)
    register("modality", modality)
    keywords = config.plugin_config("heuristic").get("multimodal_keywords",
                                                    DEFAULT_MULTIMODAL_KEYWORDS)
    register("multimodal_keywords", keyword_matcher(keywords))
