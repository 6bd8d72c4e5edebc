"""The default empathy scorer: its parts, its fallbacks, and the heuristic's comparisons at
exactly the threshold (strictly greater / strictly fewer, as documented)."""

from __future__ import annotations

import json
import math

import pytest

from sarai_router.default_plugins import empathy
from sarai_router.default_plugins.empathy import empathy_breakdown, empathy_score, lexical_score
from sarai_router.evaluation import with_heuristic
from sarai_router.router import Router
from sarai_router.types import ChatRequest

TEXT = "Me siento muy triste hoy"


def route(config, text: str):
    return Router(config).route(ChatRequest.from_prompt(text))


# -- the heuristic's comparisons at the threshold (kill `>` -> `>=` and `<` -> `<=`) --------

def test_empathy_equal_to_the_threshold_is_not_above_it(config):
    score = empathy_score(TEXT)
    assert 0.0 < score < 1.0
    at = with_heuristic(config, empathy_threshold=score)
    decision = route(at, TEXT)
    assert decision.signals["empathy"] == score
    assert decision.model == "fast" and decision.reason == "no rule matched: the default model"
    # default_model is fast in this config: prove the rule itself did not fire, then that it
    # fires just below the score
    below = with_heuristic(config, empathy_threshold=round(score - 0.0001, 4))
    assert "short emotional conversation" in route(below, TEXT).reason


def test_empathy_at_the_threshold_goes_to_the_default_model(make_config):
    config = make_config(routing='default_model = "quality"')
    score = empathy_score(TEXT)
    assert route(with_heuristic(config, empathy_threshold=score), TEXT).model == "quality"
    assert route(with_heuristic(config, empathy_threshold=score - 0.0001), TEXT).model == "fast"


def test_length_equal_to_max_chars_is_not_short(make_config):
    config = make_config(routing='default_model = "quality"')
    n = len(TEXT)
    at = route(with_heuristic(config, max_chars=n), TEXT)
    assert at.signals["chars"] == n and at.model == "quality"
    one_more = route(with_heuristic(config, max_chars=n + 1), TEXT)
    assert one_more.model == "fast" and f"{n} < {n + 1} chars" in one_more.reason


# -- the score ------------------------------------------------------------------------------

def test_breakdown_adds_up_to_the_score():
    for text in (TEXT, "Thanks, talking to you really helped", "Write a SQL query per day",
                 "¿Cuál es la capital de Francia?", "I'm not doing great rn"):
        parts = empathy_breakdown(text)
        z = sum(parts.values()) + empathy.THRESHOLD_SHIFT
        assert math.isclose(min(1 / (1 + math.exp(-z)), empathy.MAX_SCORE),
                            empathy_score(text), abs_tol=1e-4), (text, parts)


def test_breakdown_names_the_cues_found():
    parts = empathy_breakdown("Gracias, de verdad. Me siento mucho mejor")
    assert {"gratitude", "phrase", "first_person", "ngrams", "bias"} <= set(parts)
    assert parts["gratitude"] > 0 and parts["bias"] < 0
    tech = empathy_breakdown("Escribe una función en Python que ordene una lista")
    assert tech["task"] < 0 and tech["technical"] < 0
    assert empathy_breakdown("") == {} and empathy_breakdown("  ") == {}


@pytest.mark.parametrize("text", ["I'm sad", "Estoy triste", "Me siento solo", "I miss her"])
def test_a_question_or_a_task_lowers_the_score(text):
    assert empathy_score(f"{text}. Translate that into French") < empathy_score(text)
    assert empathy_score(f"¿Cómo se dice '{text}' en alemán?") < 0.8 < empathy_score(text)


def test_exclamations_are_not_questions():
    assert not empathy._asks_question("¡Qué bajón lo de hoy!")
    assert not empathy._asks_question("What a day")
    assert empathy._asks_question("¿Qué hora es?")
    assert empathy._asks_question("Thanks! How do I sort it")
    assert empathy._asks_question("Hola, ¿le doy ibuprofeno?")


def test_a_negated_feeling_still_talks_about_feelings():
    counts = empathy.features("I'm not doing great")
    assert counts["feeling"] == 1  # "not great": a low mood
    assert empathy.features("No estoy triste")["negated"] == 1
    assert empathy.features("Estoy triste")["feeling"] >= 1


def test_scores_stay_in_range_and_long_texts_are_damped():
    long_text = "Me siento fatal. " + "El informe trata de las cifras trimestrales. " * 30
    assert empathy_score(long_text) < 0.5 < empathy_score("Me siento fatal.")
    for text in ("x", "!!!", "😢", "a" * 5000, "I " * 3000, TEXT):
        assert 0.0 <= empathy_score(text) <= empathy.MAX_SCORE


def test_accents_case_and_typographic_quotes_do_not_matter():
    assert empathy_score("ME SIENTO TRISTE") == empathy_score("me siento triste")
    assert empathy_score("preocupación") == empathy_score("preocupacion")
    assert empathy_score("I\u2019m so tired") == empathy_score("I'm so tired")


# -- fallbacks ------------------------------------------------------------------------------

def test_a_missing_or_broken_model_file_falls_back(tmp_path):
    assert empathy._load_fitted(tmp_path / "none.json") == (None, None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert empathy._load_fitted(bad) == (None, None)
    families_only = tmp_path / "families.json"
    families_only.write_text(json.dumps({"families": {"bias": -1.0, "feeling": 2.0}}),
                             encoding="utf-8")
    assert empathy._load_fitted(families_only) == ({"bias": -1.0, "feeling": 2.0}, None)


def test_the_shipped_model_loads_whole():
    family, ngrams = empathy._load_fitted()
    assert family is not None and set(family) == {"bias", *empathy.FAMILIES}
    assert ngrams is not None and len(ngrams[1]) > 100 and len(ngrams[3]) > 1000


def test_without_a_fitted_model_the_hand_weights_score(monkeypatch):
    monkeypatch.setattr(empathy, "FITTED_WEIGHTS", None)
    monkeypatch.setattr(empathy, "NGRAM_MODEL", None)
    assert empathy_score(TEXT) == lexical_score(TEXT) > 0.8
    assert empathy_score("Write a SQL query that counts rows per day") < 0.4
    assert "ngrams" not in empathy_breakdown(TEXT)


def test_families_alone_when_the_ngram_table_is_missing(monkeypatch):
    monkeypatch.setattr(empathy, "NGRAM_MODEL", None)
    z = empathy._family_z(empathy.features(TEXT), empathy.FITTED_WEIGHTS)
    assert empathy_score(TEXT) == round(min(1 / (1 + math.exp(-(z + empathy.THRESHOLD_SHIFT))),
                                            empathy.MAX_SCORE), 4)
