"""The default routing heuristic and the empathy scorer, on Spanish and English requests.

No model is loaded: routing needs only the config. In these configs ``default_model`` is
``quality`` so that "the default" and "conversation" routes are told apart.
"""

from __future__ import annotations

import pytest

from sarai_router import hookimpl
from sarai_router.default_plugins.empathy import empathy_score
from sarai_router.plugins import build_plugins
from sarai_router.router import Router
from sarai_router.types import AudioInput, ChatRequest, ImageInput

PNG = ImageInput(data=b"\x89PNG\r\n\x1a\n", mime="image/png", source="x.png")
WAV = AudioInput(data=b"RIFF....WAVE", mime="audio/wav", source="x.wav")

EMOTIONAL = [
    "Me siento muy triste hoy",
    "Estoy preocupada por mi madre, no sé qué hacer",
    "Gracias, me siento mucho mejor",
    "Estoy cansado y un poco perdido",
    "Te extraño mucho",
    "I feel so lonely tonight",
    "I'm really worried about my exam",
    "Thank you so much, I was so stressed!",
    "I'm sad and tired",
]
NEUTRAL = [
    "¿Cuál es la capital de Francia?",
    "Explica el algoritmo de Dijkstra",
    "Convierte 25 grados Celsius a Fahrenheit",
    "Escribe una función en Python que ordene una lista",
    "How do I install numpy on Ubuntu?",
    "What is the capital of France?",
    "Write a SQL query that counts rows per day",
    "Summarize the plot of Hamlet in three sentences",
]


@pytest.fixture
def router(make_config) -> Router:
    return Router(make_config(routing='default_model = "quality"'))


def route(router: Router, text: str, **attachments):
    return router.route(ChatRequest.from_prompt(text, **attachments))


@pytest.mark.parametrize("text", EMOTIONAL)
def test_empathy_clearly_emotional_short_messages_score_above_08(text):
    assert empathy_score(text) > 0.8


@pytest.mark.parametrize("text", NEUTRAL)
def test_empathy_neutral_and_technical_messages_score_well_below(text):
    assert empathy_score(text) < 0.4


def test_empathy_ignores_accents_and_case():
    assert empathy_score("ME SIENTO TRISTE") == empathy_score("me siento triste")
    assert empathy_score("Estoy preocupación") == empathy_score("Estoy preocupacion")


def test_empathy_technical_content_and_long_texts_are_damped():
    assert empathy_score("I feel sad") > empathy_score("I feel sad: python raises an error")
    long_text = "I feel sad. " + " ".join(["the report covers quarterly numbers"] * 20)
    assert empathy_score(long_text) < 0.8 < empathy_score("I feel sad.")
    assert empathy_score("") == 0.0 and empathy_score("   ") == 0.0


@pytest.mark.parametrize("text", EMOTIONAL)
def test_short_emotional_goes_to_conversation_model(router, text):
    decision = route(router, text)
    assert decision.model == "fast"
    assert decision.plugin == "heuristic"
    assert "short emotional conversation" in decision.reason
    assert decision.signals["empathy"] > 0.8
    assert decision.signals["chars"] == len(text)
    assert decision.signals["modality"] == "text"


@pytest.mark.parametrize("text", NEUTRAL)
def test_neutral_goes_to_default_model(router, text):
    decision = route(router, text)
    assert decision.model == "quality"  # the default_model of this config
    assert decision.reason == "no rule matched: the default model"
    assert decision.plugin == "heuristic"


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("Describe esta imagen, por favor", "imagen"),
        ("¿Qué ves en la foto?", "foto"),
        ("What is in this photo?", "photo"),
        ("Explain the diagram step by step", "diagram"),
    ],
)
def test_multimodal_keyword_goes_to_multimodal_model(make_config, text, keyword):
    # default_model = fast here, so only the keyword rule can pick quality
    router = Router(make_config())
    decision = route(router, text)
    assert decision.model == "quality"
    assert decision.signals["multimodal_keywords"] == [keyword]
    assert repr(keyword) in decision.reason


def test_keywords_match_whole_words_only(make_config):
    router = Router(make_config())
    decision = route(router, "Use your imagination and photography skills")
    assert decision.signals["multimodal_keywords"] == []
    assert decision.model == "fast"


def test_keywords_are_configurable(make_config):
    router = Router(make_config('[routing.heuristic]\nmultimodal_keywords = ["plano"]\n'))
    assert route(router, "Mira este plano de la casa").model == "quality"
    assert route(router, "Describe esta imagen").model == "fast"


def test_rule_order_emotional_short_beats_keyword(make_config):
    router = Router(make_config())
    text = "Me siento muy triste, mira esta foto de mi perro"
    decision = route(router, text)
    assert decision.model == "fast"
    assert "short emotional" in decision.reason


def test_emotional_but_long_falls_through_to_keyword_rule(make_config):
    router = Router(make_config('[routing.heuristic]\nmax_chars = 20\n'))
    decision = route(router, "Me siento muy triste, mira esta foto")
    assert decision.signals["empathy"] > 0.8 and decision.signals["chars"] >= 20
    assert decision.model == "quality"
    assert "multimodal request" in decision.reason


def test_empathy_threshold_is_configurable(make_config):
    router = Router(make_config('[routing.heuristic]\nempathy_threshold = 0.99\n',
                                routing='default_model = "quality"'))
    decision = route(router, "Me siento muy triste hoy")
    assert 0.8 < decision.signals["empathy"] <= 0.99
    assert decision.model == "quality"


VISION = """
[models.vision]
path = "{models_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"
modalities = ["text", "image"]

[models.ears]
path = "{models_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"
modalities = ["text", "audio"]
"""


@pytest.mark.parametrize("text", ["Me siento muy triste, ¿qué ves aquí?", "I feel so sad, look"])
def test_attached_image_goes_to_a_model_that_takes_images_whatever_the_empathy(make_config, text):
    router = Router(make_config(VISION))
    decision = route(router, text, images=(PNG,))
    assert decision.signals["empathy"] > 0.8 and decision.signals["modality"] == "image"
    assert decision.model == "vision"
    assert decision.warnings == ()
    assert "image attached" in decision.reason


def test_attached_image_prefers_the_multimodal_model_when_it_takes_images(make_config):
    router = Router(make_config(quality='modalities = ["text", "image"]'))
    decision = route(router, "Hola, gracias", images=(PNG,))
    assert decision.model == "quality" and decision.warnings == ()


def test_attached_audio_goes_to_a_model_that_takes_audio(make_config):
    router = Router(make_config(VISION))
    decision = route(router, "Gracias, me siento mejor", audio=WAV)
    assert decision.signals["modality"] == "audio"
    assert decision.model == "ears" and decision.warnings == ()


def test_attachment_no_model_supports_is_routed_and_flagged(make_config):
    router = Router(make_config())  # both models text only, as in the default config
    decision = route(router, "Me siento triste", images=(PNG,))
    assert decision.model == "quality"
    assert "no configured model lists 'image'" in decision.reason
    assert len(decision.warnings) == 1
    assert "does not take image input" in decision.warnings[0]


def test_text_of_request_is_the_latest_user_message(router):
    request = ChatRequest(messages=(
        {"role": "user", "content": "Describe esta imagen"},
        {"role": "assistant", "content": "Claro."},
        {"role": "user", "content": [{"type": "text", "text": "Me siento muy triste hoy"}]},
    ))
    decision = router.route(request)
    assert request.text == "Me siento muy triste hoy"
    assert decision.model == "fast"


# -- the rule's boundaries: "strictly greater" and "strictly fewer", as documented ---------


class FixedEmpathy:
    """Replaces the empathy signal with a fixed score, to stand exactly on the threshold."""

    def __init__(self, score: float):
        self.score = score

    @hookimpl
    def register_signals(self, register):
        register("empathy", lambda request: self.score)


def route_with_empathy(config, score: float, text: str):
    plugins = build_plugins(config, extra=[("fixed_empathy", FixedEmpathy(score))])
    return Router(config, plugins).route(ChatRequest.from_prompt(text))


def test_empathy_exactly_at_the_threshold_is_not_emotional(make_config):
    config = make_config(routing='default_model = "quality"')
    threshold = config.plugin_config("heuristic")["empathy_threshold"]
    text = "Hola, ¿qué tal?"  # short, no multimodal keyword: only the empathy rule can pick fast
    at = route_with_empathy(config, threshold, text)
    assert at.signals["empathy"] == threshold
    assert (at.model, at.reason) == ("quality", "no rule matched: the default model")
    above = route_with_empathy(config, threshold + 1e-9, text)
    assert above.model == "fast" and "short emotional conversation" in above.reason


def test_a_message_exactly_max_chars_long_is_not_short(make_config):
    text = "Me siento muy triste hoy"  # the real scorer: 0.97, well above the threshold
    routing = 'default_model = "quality"'
    at = Router(make_config(f"[routing.heuristic]\nmax_chars = {len(text)}\n", routing=routing))
    decision = route(at, text)
    assert decision.signals["chars"] == len(text) and decision.signals["empathy"] > 0.8
    assert decision.model == "quality" and decision.reason == "no rule matched: the default model"
    above = Router(make_config(f"[routing.heuristic]\nmax_chars = {len(text) + 1}\n",
                               routing=routing))
    decision = route(above, text)
    assert decision.model == "fast" and f"{len(text)} < {len(text) + 1} chars" in decision.reason
