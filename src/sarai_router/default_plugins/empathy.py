"""Default empathy ("soft") scorer: how much a message reads as emotional conversation, 0..1,
Spanish and English. Pure Python, no model: a few set lookups after one normalisation pass.

How it scores (docs/configuration.md has the same, with examples):

1. **Normalise once**: lower-case, accents stripped ("preocupación" = "preocupacion"),
   punctuation to spaces, split into words.
2. **Cue families** (tables in ``empathy_lexicon.py``, every inflection expanded at import so
   a word is one set lookup; multi-word phrases are checked only when their rarest word is
   present): feeling words (sad/triste, lonely, worried, llorar, proud, relieved, ...),
   life events (died/murió, funeral, broke up, divorce, pregnant, grandma/abuela, dog, ...),
   first-person feeling phrases, idioms and slang ("me siento", "I feel like", "echo de
   menos", "se me cae el mundo encima", "over the moon", "de bajón", "ngl", ...),
   gratitude, first and second person, intensifiers, "!" or an emoji; and against: task and
   meta-language words (write/escribe, translate, explain, "what does ... mean", poem,
   symptoms, ...), a question word at the start, technical words, code and digits.
   A feeling word right after a negator ("not sad", "no estoy triste") counts half: it is
   still about feelings; a negated positive word ("not great") counts as a low mood.
3. **Weights**: each family's count (capped) times a weight, plus two interactions (a
   feeling cue *and* the first person; a feeling cue *and* a task word). The weights are a
   logistic regression fitted on the dev split of the evaluation set only
   (``scripts/train_empathy.py``, stored in ``empathy_weights.py``); the score is the
   logistic of the sum, shifted so that the default ``empathy_threshold`` of 0.8 is the
   fitted boundary.
4. **Long texts** are damped by ``sqrt(30 / words)`` past 30 words: one sad word in an essay
   is not an emotional conversation.

:func:`lexical_score` is the hand-weighted fallback over the same cues (used when the
fitted weights are missing or unreadable).
"""

from __future__ import annotations

import math
import re
import unicodedata

from ..hookspecs import hookimpl
from . import empathy_lexicon as lex

LONG_TEXT_WORDS = 30
#: A family's count stops adding past this many distinct hits.
CAP = 3
#: Where the default routing threshold sits on the logistic: logit(0.8).
THRESHOLD_SHIFT = math.log(0.8 / 0.2)
#: Scores never claim certainty: the squashed value is kept inside [0, MAX_SCORE].
MAX_SCORE = 0.99

FAMILIES = ("feeling", "negated", "event", "phrase", "gratitude", "first_person",
            "second_person", "intensifier", "exclamation", "task", "question", "technical",
            "code", "feeling_and_first", "feeling_and_task", "thanks_only", "short")

# bit flags per family, so one dict lookup tells every family a word belongs to
_BITS = {name: 1 << i for i, name in enumerate(("feeling", "event", "phrase", "gratitude",
                                                 "first_person",
                                                 "second_person", "intensifier", "task",
                                                 "question", "technical", "negator",
                                                 "positive"))}


def _build_tables():
    words: dict[str, int] = {}
    phrases: dict[str, list[tuple[str, str]]] = {}

    def add(entries, family):
        for entry in entries:
            entry = normalize(entry).strip()
            if not entry:
                continue
            if " " in entry:
                parts = entry.split()
                anchor = max(parts, key=len)  # the longest word is the rarest, as a rule
                phrases.setdefault(anchor, []).append((f" {entry} ", family))
            else:
                words[entry] = words.get(entry, 0) | _BITS[family]

    add(lex.FEELING_WORDS_ES + lex.FEELING_WORDS_EN, "feeling")
    add(lex.EVENT_WORDS_ES + lex.EVENT_WORDS_EN, "event")
    add(lex.FEELING_PHRASES_ES + lex.FEELING_PHRASES_EN, "phrase")
    add(lex.GRATITUDE, "gratitude")
    add(lex.FIRST_PERSON, "first_person")
    add(lex.SECOND_PERSON, "second_person")
    add(lex.INTENSIFIERS, "intensifier")
    add(lex.TASK_WORDS, "task")
    add(lex.QUESTION_WORDS, "question")
    add(lex.TECHNICAL_WORDS, "technical")
    add(lex.NEGATORS, "negator")
    add(lex.POSITIVE_WORDS, "positive")
    return words, phrases


# Punctuation that separates words; the apostrophe stays inside words ("i'm", "can't").
_ASCII_PUNCT = str.maketrans({c: " " for c in "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n\r"})
_UNICODE_PUNCT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": " ", "\u201d": " ",
                                "\u00ab": " ", "\u00bb": " ", "\u2014": " ", "\u2013": " ",
                                "\u2026": " ", "\u00bf": " ", "\u00a1": " "})
_DIGITS = str.maketrans("", "", "0123456789")
_CODE_CHARS = "{};=<>`_|\\"


def normalize(text: str) -> str:
    """Lower-case, accents stripped, punctuation turned into spaces (apostrophes kept)."""
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text.translate(_UNICODE_PUNCT))
        text = text.encode("ascii", "ignore").decode("ascii")
    return text.translate(_ASCII_PUNCT)


_WORDS, _PHRASES = _build_tables()
_WORD_SET = frozenset(_WORDS)
_ANCHORS = frozenset(_PHRASES)
_QUESTION_START = frozenset(w for w, bits in _WORDS.items() if bits & _BITS["question"])
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
_LEADING_FILLERS = frozenset({"y", "and", "so", "pero", "but", "hola", "hi", "hey", "oye", "ok",
                              "okay", "bueno", "well", "pues", "entonces"})
_QUESTION_ONLY = frozenset({"how", "why", "which", "where", "who", "whose", "whats", "what's",
                            "is", "are", "does", "do", "can", "could", "should", "cual",
                            "cuales", "cuanto", "cuantos", "cuanta", "cuantas", "donde",
                            "quien", "quienes"})
_AUXILIARIES = frozenset({"is", "are", "was", "were", "does", "do", "did", "can", "should",
                          "would", "will", "es", "son", "significa", "hago", "se", "puedo"})
_FEELING_OPENERS = frozenset({"feeling", "felt", "feel", "been", "sintiendome", "ando", "llevo"})


def features(text: str) -> dict[str, float]:
    """The cue counts of ``text`` (each family's count capped at ``CAP``)."""
    norm = normalize(text)
    tokens = norm.split()
    counts = dict.fromkeys(FAMILIES, 0.0)
    if not tokens:
        return counts
    present = set(tokens)
    fb, nb, pb = _BITS["feeling"], _BITS["negator"], _BITS["positive"]
    for word in present & _WORD_SET:
        bits = _WORDS[word]
        if bits & (fb | pb):
            i = tokens.index(word)
            negated = any(_WORDS.get(t, 0) & nb for t in tokens[max(0, i - 2):i])
            if negated and bits & pb and not bits & fb:
                counts["feeling"] += 1  # "not great", "no estoy bien": a low mood
            elif negated and bits & fb:
                counts["negated"] += 1
            elif bits & fb:
                counts["feeling"] += 1
        for family in ("event", "phrase", "gratitude", "first_person", "second_person", "intensifier",
                       "task", "technical"):
            if bits & _BITS[family]:
                counts[family] += 1
    padded = f" {norm} "
    for anchor in present & _ANCHORS:
        for phrase, family in _PHRASES[anchor]:
            if phrase in padded:
                counts[family] += 1
    for family in counts:
        if counts[family] > CAP:
            counts[family] = CAP
    first = tokens[0]
    counts["question"] = 1.0 if _asks_question(text) else 0.0
    if first in _FEELING_OPENERS:  # "Feeling pretty blue": the first person is implied
        counts["first_person"] += 1
    for family in ("first_person", "second_person"):
        counts[family] = min(counts[family], 1.0)
    head = text[:CODE_SCAN_CHARS]
    code = sum(map(head.count, _CODE_CHARS))
    digits = len(head) - len(head.translate(_DIGITS))
    counts["code"] = min(CAP, code + (1.0 if digits > max(2, len(head) // 20) else 0.0))
    if "!" in text or "\u00a1" in text or (not text.isascii() and _EMOJI.search(text)):
        counts["exclamation"] = 1.0
    emotional = counts["feeling"] + counts["negated"] + counts["phrase"] + counts["event"]
    counts["feeling_and_first"] = 1.0 if emotional and counts["first_person"] else 0.0
    counts["feeling_and_task"] = 1.0 if emotional and counts["task"] else 0.0
    # thanks with no request attached: "gracias, de verdad" but not "gracias, ahora en JSON"
    counts["thanks_only"] = 1.0 if counts["gratitude"] and not (
        counts["task"] or counts["question"] or counts["technical"] or counts["code"]) else 0.0
    counts["short"] = 1.0 if len(tokens) <= 4 else 0.0
    counts["_words"] = float(len(tokens))
    return counts


_SENTENCE = re.compile(r"[^.,;:!?\u00a1\u00bf\n]+")
#: Only the opening sentences are looked at for a question: enough for chat messages, and
#: a 2,000-character text costs no more than a short one.
QUESTION_SCAN_CHARS = 240
#: Code characters and digits are counted in this many opening characters.
CODE_SCAN_CHARS = 400


def _asks_question(text: str) -> bool:
    """A clause is a question: opened by "¿", or opening with a question word and either
    closed by "?" or led by a word that can only ask (how, why, is, ...). "What a day" and
    "¡Qué bajón!" are not."""
    head = text[:QUESTION_SCAN_CHARS].lower()
    for match in _SENTENCE.finditer(head):
        words = normalize(match.group()).split()
        if not words:
            continue
        start, end = match.start(), match.end()
        if start and head[start - 1] == "\u00bf":
            return True
        if words[0] in _LEADING_FILLERS and len(words) > 1:
            words = words[1:]
        if words[0] in _QUESTION_START and (
                head[end:end + 1] == "?" or words[0] in _QUESTION_ONLY
                or (len(words) > 1 and words[1] in _AUXILIARIES)):
            return True
    return False


#: Hand-set weights of the lexical fallback (the fitted ones live in empathy_weights.py).
LEXICAL_WEIGHTS = {
    "bias": -1.6, "feeling": 1.2, "negated": 0.6, "event": 0.5, "phrase": 1.2,
    "gratitude": 1.4, "first_person": 0.3, "second_person": 0.3, "intensifier": 0.3,
    "exclamation": 0.4, "task": -1.5, "question": -1.0, "technical": -1.5, "code": -1.5,
    "feeling_and_first": 1.0, "feeling_and_task": -0.5, "thanks_only": 1.0, "short": 0.0,
}


def _load_fitted() -> dict[str, float] | None:
    try:
        from .empathy_weights import WEIGHTS
    except ImportError:
        return None
    if not isinstance(WEIGHTS, dict) or "bias" not in WEIGHTS:
        return None
    return WEIGHTS


FITTED_WEIGHTS = _load_fitted()


def _score(counts: dict[str, float], weights: dict[str, float]) -> float:
    z = weights.get("bias", 0.0) + THRESHOLD_SHIFT
    for name in FAMILIES:
        value = counts[name]
        if value:
            z += weights.get(name, 0.0) * value
    score = 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0
    words = counts["_words"]
    if words > LONG_TEXT_WORDS:
        score *= math.sqrt(LONG_TEXT_WORDS / words)
    return round(min(score, MAX_SCORE), 4)


def lexical_score(text: str) -> float:
    """The hand-weighted fallback score of ``text``."""
    if not text.strip():
        return 0.0
    return _score(features(text), LEXICAL_WEIGHTS)


def empathy_score(text: str) -> float:
    """0..1: how much ``text`` reads as emotional conversation (see the module docstring)."""
    if not text.strip():
        return 0.0
    return _score(features(text), FITTED_WEIGHTS or LEXICAL_WEIGHTS)


def empathy_breakdown(text: str) -> dict[str, float]:
    """The cue families found in ``text`` and what each adds to the sum before squashing."""
    weights = FITTED_WEIGHTS or LEXICAL_WEIGHTS
    counts = features(text)
    return {name: round(weights.get(name, 0.0) * counts[name], 4)
            for name in FAMILIES if counts[name]}


def empathy(request) -> float:
    return empathy_score(request.text)


@hookimpl(trylast=True)
def register_signals(register):
    register("empathy", empathy)
