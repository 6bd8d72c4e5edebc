"""The example plugins in plugins/, tested as a plugin author tests theirs: with the kit
(``sarai_router.testing``), the ``echo`` backend standing in for the models."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sarai_router.errors import ConfigError
from sarai_router.testing import answer, config_from_toml, route

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def config(extra: str = ""):
    return config_from_toml(f"""
        [plugins]
        dirs = ["{PLUGINS.as_posix()}"]
        {extra}

        [models.fast]
        backend = "echo"

        [models.quality]
        backend = "echo"
    """)


@pytest.mark.parametrize("prompt,found", [
    ("Why does my Python function raise a KeyError?", "technical prompt ('Python')"),
    ("¿Puedes revisar este código?", "technical prompt ('código')"),
    ("Tell me a long story. " * 30, "long prompt (660 chars)"),
])
def test_prefer_quality_for_code_routes_code_and_long_prompts_to_quality(prompt, found):
    decision = route(config(), prompt)
    assert (decision.model, decision.plugin) == ("quality", "prefer_quality_for_code")
    assert decision.reason == f"prefer_quality_for_code: {found}"


def test_prefer_quality_for_code_leaves_the_rest_to_the_heuristic():
    decision = route(config(), "¡Hola! ¿Cómo estás?")
    assert decision.plugin == "heuristic"
    blocked = route(config('disable = ["prefer_quality_for_code"]'),
                    "Why does my Python function raise a KeyError?")
    assert blocked.plugin == "heuristic"


def test_exclamation_empathy_adds_to_the_default_score():
    with_marks = route(config(), "¡Hola! ¿Cómo estás?").signals["empathy"]
    default = route(config('disable = ["exclamation_empathy"]'),
                    "¡Hola! ¿Cómo estás?").signals["empathy"]
    assert with_marks == pytest.approx(default + 0.2, abs=1e-3)  # two marks, 0.1 each
    capped = route(config("[plugins.exclamation_empathy]\nper_mark = 0.5\ncap = 0.3"),
                   "Hola!!!").signals["empathy"]
    plain = route(config('disable = ["exclamation_empathy"]'), "Hola!!!").signals["empathy"]
    assert capped == pytest.approx(min(1.0, plain + 0.3), abs=1e-3)


def test_exclamation_empathy_checks_its_table():
    with pytest.raises(ConfigError, match="per_mark: must be between 0 and 1, got 2.0"):
        config("[plugins.exclamation_empathy]\nper_mark = 2.0")


def test_the_examples_answer_through_a_real_server(sarai_server):
    url = sarai_server(f"""
        [plugins]
        dirs = ["{PLUGINS.as_posix()}"]

        [models.fast]
        backend = "echo"

        [models.quality]
        backend = "echo"
    """, api_key="examples")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": "Bearer examples"},
                          json={"model": "auto", "messages": [
                              {"role": "user", "content": "fix this python bug"}]})
    assert response.status_code == 200
    assert response.headers["x-sarai-route-plugin"] == "prefer_quality_for_code"
    assert response.json()["choices"][0]["message"]["content"] == "fix this python bug"
    assert answer(config(), "hello there").decision.model == "fast"
