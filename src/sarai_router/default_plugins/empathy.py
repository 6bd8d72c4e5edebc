"""Default empathy ("soft") scorer: how emotional a message reads, 0..1, Spanish and English.

How it scores (documented in docs/configuration.md as well):

1. The text is lower-cased and stripped of accents, so "preocupación" and "preocupacion"
   match alike.
2. Each cue family that matches adds its weight once: a first-person feeling phrase
   ("me siento", "I feel", "estoy muy", "I'm so") 0.6; a feeling word (sad/triste,
   worried/preocupado, tired/cansado, lonely/solo, happy/feliz, frustrated/frustrado,
   anxious/ansioso, ...) 0.6 for the first and 0.25 for each further one; gratitude
   ("gracias", "thank you") 0.45; reaching out ("I need to talk", "necesito hablar",
   "no sé qué hacer") 0.45; a greeting or check-in ("hola", "how are you", "¿cómo estás?")
   0.3; an intensifier ("muy", "so", "really", "tan") 0.15; an exclamation or emoji 0.1.
3. Technical content (code, "error", "function", "install", digits-heavy text) halves the sum.
4. The sum is squashed: ``score = 1 - exp(-2.5 * sum)``, so one feeling phrase plus one
   feeling word (1.2) gives 0.95, a feeling word alone 0.78, a greeting alone 0.53.
5. Long texts are damped by ``sqrt(30 / words)`` past 30 words: one sad word in an essay
   is not an emotional conversation.
"""

from __future__ import annotations

import math
import re
import unicodedata

from ..hookspecs import hookimpl

FEELING_PHRASES = (
    r"me siento", r"me encuentro", r"estoy (muy |tan |bastante |un poco )?"
    r"(triste|mal|preocupad[oa]|cansad[oa]|agotad[oa]|sol[oa]|deprimid[oa]|feliz|content[oa]|"
    r"frustrad[oa]|nervios[oa]|ansios[oa]|perdid[oa]|confundid[oa]|asustad[oa]|harto|harta)",
    r"i feel", r"i'?m feeling", r"i am feeling", r"(i'?m|i am) (so |really |very |a bit )?"
    r"(sad|down|worried|tired|exhausted|lonely|depressed|happy|frustrated|anxious|lost|"
    r"confused|scared|stressed|overwhelmed|upset|heartbroken)",
    r"me duele", r"tengo miedo", r"i'?m scared", r"i miss", r"te extrano", r"lo extrano",
    r"la extrano", r"los extrano",
)
FEELING_WORDS = (
    r"trist\w*", r"preocup\w*", r"cansad\w*", r"agotad\w*", r"solitari\w*", r"soledad",
    r"deprimid\w*", r"depresion", r"feliz", r"felicidad", r"alegr\w*", r"content[oa]s?",
    r"frustra\w*", r"ansios\w*", r"ansiedad", r"nervios\w*", r"perdid[oa]", r"confundid[oa]",
    r"asustad[oa]", r"miedo", r"llor\w*", r"angusti\w*", r"agobiad[oa]", r"estresad[oa]",
    r"estres", r"dolor", r"sufr\w*", r"enfadad[oa]", r"enojad[oa]", r"emocionad[oa]",
    r"sad", r"sadness", r"unhappy", r"worr(y|ied|ies|ying)", r"tired", r"exhausted",
    r"lonely", r"alone", r"depress\w*", r"happy", r"happiness", r"glad", r"joy\w*",
    r"frustrat\w*", r"anxious", r"anxiety", r"nervous", r"lost", r"confused", r"scared",
    r"afraid", r"fear\w*", r"cry\w*", r"cried", r"upset", r"stress(ed)?", r"overwhelm\w*",
    r"heartbroken", r"hurt\w*", r"miserable", r"angry", r"excited", r"grateful", r"agradecid[oa]",
    r"love", r"amor", r"quiero mucho",
)
GRATITUDE = (r"gracias", r"muchas gracias", r"te lo agradezco", r"thank(s| you)", r"thx",
             r"i appreciate", r"appreciate it")
REACHING_OUT = (r"necesito hablar", r"no se que hacer", r"ayudame", r"escuchame",
                r"i need to talk", r"i don'?t know what to do", r"need someone", r"listen to me",
                r"can we talk", r"podemos hablar")
GREETING = (r"hola", r"buenos dias", r"buenas tardes", r"buenas noches", r"como estas",
            r"que tal", r"hello", r"hi", r"hey", r"good morning", r"good evening",
            r"how are you", r"how'?s it going")
INTENSIFIERS = (r"muy", r"mucho", r"tan", r"demasiado", r"super", r"so", r"really", r"very", r"too")
TECHNICAL = (r"error", r"exception", r"traceback", r"function", r"funcion", r"codigo", r"code",
             r"install\w*", r"instal\w*", r"compil\w*", r"python", r"sql", r"api", r"server",
             r"servidor", r"kernel", r"algorithm\w*", r"algoritmo", r"config\w*", r"json",
             r"docker", r"bug", r"stack", r"calcula\w*", r"equation", r"ecuacion", r"explain",
             r"explica\w*", r"analy[sz]\w*", r"analiza\w*", r"summari[sz]e", r"resume\w*")

WEIGHTS = {
    "feeling_phrase": 0.6,
    "feeling_word": 0.6,
    "feeling_word_more": 0.25,
    "gratitude": 0.45,
    "reaching_out": 0.45,
    "greeting": 0.3,
    "intensifier": 0.15,
    "exclamation": 0.1,
}
SQUASH = 2.5
LONG_TEXT_WORDS = 30


def _words_pattern(alternatives) -> re.Pattern[str]:
    return re.compile(r"(?<![\w'])(?:" + "|".join(alternatives) + r")(?![\w'])")


_PHRASES = _words_pattern(FEELING_PHRASES)
_FEELINGS = _words_pattern(FEELING_WORDS)
_GRATITUDE = _words_pattern(GRATITUDE)
_REACHING = _words_pattern(REACHING_OUT)
_GREETING = _words_pattern(GREETING)
_INTENSIFIERS = _words_pattern(INTENSIFIERS)
_TECHNICAL = _words_pattern(TECHNICAL)
_CODE = re.compile(r"[{};=<>]|\(\)|`|def |class |import ")
_EMOJI_OR_BANG = re.compile("[!¡]|[\U0001F300-\U0001FAFF\u2639\u263A\u2764]")


def normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return text.replace("\u2019", "'")


def empathy_breakdown(text: str) -> dict[str, float]:
    """The cue families found in ``text`` and what each adds (before squashing)."""
    norm = normalize(text)
    found: dict[str, float] = {}
    if _PHRASES.search(norm):
        found["feeling_phrase"] = WEIGHTS["feeling_phrase"]
    feelings = {m.group(0) for m in _FEELINGS.finditer(norm)}
    if feelings:
        found["feeling_word"] = WEIGHTS["feeling_word"] + WEIGHTS["feeling_word_more"] * (
            len(feelings) - 1
        )
    for name, pattern in (("gratitude", _GRATITUDE), ("reaching_out", _REACHING),
                          ("greeting", _GREETING), ("intensifier", _INTENSIFIERS)):
        if pattern.search(norm):
            found[name] = WEIGHTS[name]
    if _EMOJI_OR_BANG.search(text):
        found["exclamation"] = WEIGHTS["exclamation"]
    return found


def empathy_score(text: str) -> float:
    """0..1: how much ``text`` reads as emotional conversation (see the module docstring)."""
    if not text.strip():
        return 0.0
    total = sum(empathy_breakdown(text).values())
    norm = normalize(text)
    digits = sum(ch.isdigit() for ch in norm)
    if _TECHNICAL.search(norm) or _CODE.search(text) or digits > max(4, len(norm) // 10):
        total *= 0.5
    score = 1.0 - math.exp(-SQUASH * total)
    words = len(norm.split())
    if words > LONG_TEXT_WORDS:
        score *= math.sqrt(LONG_TEXT_WORDS / words)
    return round(score, 4)


def empathy(request) -> float:
    return empathy_score(request.text)


@hookimpl(trylast=True)
def register_signals(register):
    register("empathy", empathy)
