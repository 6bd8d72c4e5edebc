"""Default empathy ("soft") scorer: how much a message reads as emotional conversation, 0..1,
Spanish and English. Pure Python (no numpy, no language model): set and dict lookups after
one normalisation pass, tens of microseconds a message.

How it scores (docs/configuration.md has the same, with examples):

1. **Normalise once**: lower-case, accents stripped ("preocupación" = "preocupacion"),
   punctuation to spaces, split into words.
2. **Cue families** (tables in ``empathy_lexicon.py``; every inflection is expanded at import
   so a word is one set lookup, and a multi-word phrase is looked for only when its longest
   word is present): feeling words (sad/triste, lonely, worried, llorar, proud, relieved,
   ...), life events (died/murió, funeral, broke up, divorce, pregnant, grandma/abuela,
   dog, ...), first-person feeling phrases, idioms and slang ("me siento", "I feel like",
   "echo de menos", "se me cae el mundo encima", "over the moon", "de bajón", "ngl", ...),
   gratitude, first and second person, intensifiers, "!" or an emoji; and against: task and
   meta-language words (write/escribe, translate, explain, "¿cómo se dice", poem, symptoms,
   ...), a question (:func:`_asks_question`), technical words, code characters and digits.
   A feeling word right after a negator ("no estoy triste") is its own, weaker family: it is
   still about feelings; a negated positive word ("not doing great") counts as a low mood.
   Four combinations are families too: a feeling cue with the first person, a feeling cue
   with a task, thanks that ask for nothing, a first-person statement that asks for nothing.
3. **Two linear models, averaged**: a logistic regression over the family counts (each
   capped at ``CAP``), and one over the words, word pairs and character 4-grams of the
   first ``NGRAM_WORDS`` words (:func:`ngram_features`), which catches expressions no table
   lists. Both are fitted on the evaluation set's dev data only (``scripts/train_empathy.py``)
   and stored in ``empathy_model.json``. The score is the logistic of the mean of the two
   sums, shifted so that the default ``empathy_threshold`` 0.8 is the fitted boundary, and
   capped at ``MAX_SCORE``.
4. **Long texts** are damped by ``sqrt(30 / words)`` past 30 words: one sad word in an essay
   is not an emotional conversation.

Fallbacks: without a readable ``empathy_model.json``, the family counts with the hand-set
``LEXICAL_WEIGHTS`` (:func:`lexical_score`); without its n-gram table, the fitted family
weights alone.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from pathlib import Path

from ..hookspecs import hookimpl
from . import empathy_lexicon as lex

LONG_TEXT_WORDS = 30
#: A family's count stops adding past this many distinct hits.
CAP = 3
#: Where the default routing threshold sits on the logistic: logit(0.8).
THRESHOLD_SHIFT = math.log(0.8 / 0.2)
#: Scores never claim certainty: the squashed value is kept inside [0, MAX_SCORE].
MAX_SCORE = 0.99
#: The n-gram model reads the first this many words: a chat message fits, and a long text
#: (routed on its length, its score damped) costs no more than a short one.
NGRAM_WORDS = 40
NGRAM_CHARS = 200

FAMILIES = ("feeling", "negated", "event", "phrase", "gratitude", "first_person",
            "second_person", "intensifier", "exclamation", "task", "question", "technical",
            "code", "feeling_and_first", "feeling_and_task", "thanks_only", "statement",
            "short")

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
            if not (entry.isascii() and entry.isalpha() and entry.islower()):
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
_UNICODE_PUNCT = {"\u2019": "'", "\u2018": "'", "\u201c": " ", "\u201d": " ", "\u00ab": " ",
                  "\u00bb": " ", "\u2014": " ", "\u2013": " ", "\u2026": " ", "\u00bf": " ",
                  "\u00a1": " "}


def _fold_table() -> dict[int, str]:
    """Non-ASCII letters of the Latin blocks to their ASCII base ("ñ" -> "n", "é" -> "e"),
    the punctuation above to a space or an apostrophe: one ``str.translate`` instead of an
    NFKD pass per message."""
    table = {ord(c): r for c, r in _UNICODE_PUNCT.items()}
    for code in range(0x80, 0x250):
        folded = unicodedata.normalize("NFKD", chr(code)).encode("ascii", "ignore").decode()
        if folded and code not in table:
            table[code] = folded
    return table


_FOLD = _fold_table()
_DIGITS = str.maketrans("", "", "0123456789")
_CODE_CHARS = "{};=<>`_|\\"


def normalize(text: str) -> str:
    """Lower-case, accents stripped, punctuation turned into spaces (apostrophes kept)."""
    text = text.lower()
    if not text.isascii():
        # what the table doesn't fold (emoji, other scripts) is dropped
        text = text.translate(_FOLD).encode("ascii", "ignore").decode("ascii")
    return text.translate(_ASCII_PUNCT)


_WORDS, _PHRASES = _build_tables()
_WORD_SET = frozenset(_WORDS)
#: The families a word's hit adds to directly (feeling words go through the negation check).
_COUNTED = ("feeling", "negated", "event", "phrase", "gratitude", "first_person",
            "second_person", "intensifier", "task", "technical")
# Worked out once per distinct set of bits (a few dozen), not per word (thousands): this
# runs at import, on every `route`.
_INFO_OF_BITS = {
    bits: (bool(bits & _BITS["feeling"]), bool(bits & _BITS["positive"]),
           tuple(f for f in _COUNTED[2:] if bits & _BITS[f]))
    for bits in set(_WORDS.values())
}
_WORD_INFO = {word: _INFO_OF_BITS[bits] for word, bits in _WORDS.items()}
_NEGATOR_WORDS = frozenset(w for w, bits in _WORDS.items() if bits & _BITS["negator"])
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
    """The cue counts of ``text`` (each family's count capped at ``CAP``), plus ``_words``."""
    return _analyse(text)[0]


def _analyse(text: str) -> tuple[dict[str, float], list[str]]:
    norm = normalize(text)
    tokens = norm.split()
    counts = dict.fromkeys(FAMILIES, 0.0)
    counts["_words"] = float(len(tokens))
    if not tokens:
        return counts, tokens
    present = set(tokens)
    negators = not present.isdisjoint(_NEGATOR_WORDS)
    for word in present & _WORD_SET:
        feeling, positive, families = _WORD_INFO[word]
        if feeling or positive:
            negated = False
            if negators:
                i = tokens.index(word)
                negated = not _NEGATOR_WORDS.isdisjoint(tokens[max(0, i - 2):i])
            if negated and positive and not feeling:
                counts["feeling"] += 1  # "not great", "no estoy bien": a low mood
            elif negated and feeling:
                counts["negated"] += 1
            elif feeling:
                counts["feeling"] += 1
        for family in families:
            counts[family] += 1
    padded = f" {norm} "
    for anchor in present & _ANCHORS:
        for phrase, family in _PHRASES[anchor]:
            if phrase in padded:
                counts[family] += 1
    for family in _COUNTED:
        if counts[family] > CAP:
            counts[family] = CAP
    counts["question"] = 1.0 if _asks_question(text) else 0.0
    if tokens[0] in _FEELING_OPENERS:  # "Feeling pretty blue": the first person is implied
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
    # a first-person statement that asks for nothing: in a chat, that is conversation
    counts["statement"] = 1.0 if counts["first_person"] and not (
        counts["task"] or counts["question"] or counts["technical"] or counts["code"]) else 0.0
    counts["short"] = 1.0 if len(tokens) <= 4 else 0.0
    return counts, tokens


def ngram_features(tokens: list[str]) -> tuple[set[str], set[str], set[str]]:
    """The n-gram model's binary features of the first ``NGRAM_WORDS`` words (and at most
    ``NGRAM_CHARS`` characters): words, word pairs, character 4-grams."""
    words = tokens[:NGRAM_WORDS]
    joined = (" " + " ".join(words) + " ")[:NGRAM_CHARS]
    grams = set(map("".join, zip(joined, joined[1:], joined[2:], joined[3:])))
    return set(words), set(map(" ".join, zip(words, words[1:]))), grams


def ngram_keys(tokens: list[str]) -> list[str]:
    """The same features as flat names (``w:word``, ``b:one two``, ``c:gram``), for training."""
    words, pairs, grams = ngram_features(tokens)
    return ["w:" + w for w in words] + ["b:" + p for p in pairs] + ["c:" + g for g in grams]


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
        start, end = match.span()
        if start and head[start - 1] == "\u00bf":
            return True
        words = match.group().split(None, 3)
        if not words:
            continue
        if not words[0].isascii() or not words[0].isalpha():
            words = normalize(" ".join(words)).split()
            if not words:
                continue
        if words[0] in _LEADING_FILLERS and len(words) > 1:
            words = words[1:]
        if words[0] in _QUESTION_START and (
                head[end:end + 1] == "?" or words[0] in _QUESTION_ONLY
                or (len(words) > 1 and words[1] in _AUXILIARIES)):
            return True
    return False


#: Hand-set weights of the lexical fallback (the fitted ones live in empathy_model.json).
LEXICAL_WEIGHTS = {
    "bias": -1.6, "feeling": 1.2, "negated": 0.6, "event": 0.5, "phrase": 1.2,
    "gratitude": 1.4, "first_person": 0.3, "second_person": 0.3, "intensifier": 0.3,
    "exclamation": 0.4, "task": -1.5, "question": -1.0, "technical": -1.5, "code": -1.5,
    "feeling_and_first": 1.0, "feeling_and_task": -0.5, "thanks_only": 1.0, "statement": 1.0,
    "short": 0.0,
}


#: The fitted model (scripts/train_empathy.py writes it): JSON, because a Python module
#: holding 8,000 weights takes ~100 ms to import when no bytecode cache is written.
MODEL_FILE = Path(__file__).with_name("empathy_model.json")


def _load_fitted(path: Path = MODEL_FILE):
    """The fitted family weights and n-gram model (bias, word, pair and 4-gram tables);
    None for a part missing or malformed: the scorer then falls back to the families alone,
    else to the hand weights."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    family = data.get("families") if isinstance(data, dict) else None
    if not (isinstance(family, dict) and "bias" in family
            and all(isinstance(v, (int, float)) for v in family.values())):
        return None, None
    ngrams = data.get("ngrams")
    try:
        model = (float(ngrams["bias"]), ngrams["words"], ngrams["pairs"], ngrams["chars"])
    except (TypeError, KeyError, ValueError):
        return family, None
    if not all(isinstance(table, dict) for table in model[1:]):
        return family, None
    return family, model


FITTED_WEIGHTS, NGRAM_MODEL = _load_fitted()


def _family_z(counts: dict[str, float], weights: dict[str, float]) -> float:
    z = weights.get("bias", 0.0)
    for name in FAMILIES:
        value = counts[name]
        if value:
            z += weights.get(name, 0.0) * value
    return z


def _ngram_z(tokens: list[str]) -> float:
    bias, word_w, pair_w, char_w = NGRAM_MODEL
    words, pairs, grams = ngram_features(tokens)  # binary, as trained
    zero = itertools.repeat(0.0)
    return (bias + sum(map(word_w.get, words, zero)) + sum(map(pair_w.get, pairs, zero))
            + sum(map(char_w.get, grams, zero)))


def _squash(z: float, words: float) -> float:
    z += THRESHOLD_SHIFT
    score = 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0
    if words > LONG_TEXT_WORDS:
        score *= math.sqrt(LONG_TEXT_WORDS / words)
    return round(min(score, MAX_SCORE), 4)


def _parts(text: str) -> dict[str, float]:
    """What each part adds to the sum before squashing (``bias`` included)."""
    counts, tokens = _analyse(text)
    if FITTED_WEIGHTS is None:
        weights, share = LEXICAL_WEIGHTS, 1.0
    else:
        weights, share = FITTED_WEIGHTS, (0.5 if NGRAM_MODEL is not None else 1.0)
    parts = {"bias": share * weights.get("bias", 0.0)}
    for name in FAMILIES:
        if counts[name]:
            parts[name] = share * weights.get(name, 0.0) * counts[name]
    if share < 1.0:
        parts["ngrams"] = 0.5 * _ngram_z(tokens)
    parts["_words"] = counts["_words"]
    return parts


def lexical_score(text: str) -> float:
    """The hand-weighted fallback: the cue families alone, no fitted weight."""
    if not text.strip():
        return 0.0
    counts = features(text)
    return _squash(_family_z(counts, LEXICAL_WEIGHTS), counts["_words"])


def empathy_score(text: str) -> float:
    """0..1: how much ``text`` reads as emotional conversation (see the module docstring)."""
    if not text.strip():
        return 0.0
    counts, tokens = _analyse(text)
    if FITTED_WEIGHTS is None:
        z = _family_z(counts, LEXICAL_WEIGHTS)
    elif NGRAM_MODEL is None:
        z = _family_z(counts, FITTED_WEIGHTS)
    else:
        z = 0.5 * (_family_z(counts, FITTED_WEIGHTS) + _ngram_z(tokens))
    return _squash(z, counts["_words"])


def empathy_breakdown(text: str) -> dict[str, float]:
    """The cue families found in ``text`` (and ``ngrams``, the n-gram model's share) with
    what each adds to the sum before squashing; ``bias`` is the constant term."""
    if not text.strip():
        return {}
    parts = _parts(text)
    del parts["_words"]
    return {name: round(value, 4) for name, value in parts.items()}


def empathy(request) -> float:
    return empathy_score(request.text)


@hookimpl(trylast=True)
def register_signals(register):
    register("empathy", empathy)
