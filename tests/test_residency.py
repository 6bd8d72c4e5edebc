"""Routing that knows what is loaded: ``select_route``'s ``residency``, the heuristic's
``borderline_margin`` and ``sticky_turns``, and where ``previous_models`` comes from (chat,
the server's assistant ``name``, the CLI).

Only the tests marked ``models`` load a model (the pool's view of a real load).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sarai_router import Route, hookimpl
from sarai_router.cli import cli
from sarai_router.engine import Engine
from sarai_router.plugins import build_plugins
from sarai_router.router import Router
from sarai_router.serving.openai import parse_chat_body
from sarai_router.types import (COLD_LOAD_MB_PER_S, ChatRequest, ImageInput, ModelState,
                                Residency)

PNG = ImageInput(data=b"\x89PNG\r\n\x1a\n", mime="image/png", source="x.png")
EVAL_LIKE = 'default_model = "quality"'  # only emotional talk goes to fast


class SeesResidency:
    """Records what select_route was shown, and passes."""

    def __init__(self):
        self.seen: list[dict[str, ModelState]] = []

    @hookimpl
    def select_route(self, residency):
        self.seen.append({name: residency[name] for name in residency})
        return None


class FixedEmpathy:
    def __init__(self, score: float):
        self.score = score

    @hookimpl
    def register_signals(self, register):
        register("empathy", lambda request: self.score)


def heuristic(**settings) -> str:
    return "[plugins.heuristic]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


def residency(**states: str) -> Residency:
    return Residency(states, lambda name: ({"fast": 0.13, "quality": 0.40}[name], True))


# -- the hook's argument ------------------------------------------------------------------

def test_without_a_pool_every_model_is_unloaded_with_an_estimated_cold_load(config):
    spy = SeesResidency()
    router = Router(config, build_plugins(config, extra=[("spy", spy)]))
    decision = router.route(ChatRequest.from_prompt("hola"))
    assert decision.plugin == "heuristic"  # the spy passed
    (seen,) = spy.seen
    assert set(seen) == {"fast", "quality"}
    for name, state in seen.items():
        assert state.state == "unloaded" and not state.warm and not state.measured
        spec = config.models[name]
        mb = router.hooks.backend(spec.backend).estimate_ram_mb(spec)
        assert state.cold_load_seconds == pytest.approx(mb / COLD_LOAD_MB_PER_S)
    # the larger model is expected to load slower
    assert seen["quality"].cold_load_seconds > seen["fast"].cold_load_seconds > 0


def test_route_cli_shows_every_model_unloaded(tmp_path, write_config):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "show_residency.py").write_text(
        "from sarai_router import Route, hookimpl\n\n\n"
        "@hookimpl\n"
        "def select_route(residency):\n"
        "    states = ', '.join(f'{n}={s.state}' for n, s in sorted(residency.items()))\n"
        "    return Route('fast', states)\n", encoding="utf-8")
    path = write_config(f'[plugins]\ndirs = ["{plugins.as_posix()}"]\n')
    result = CliRunner().invoke(cli, ["--config", str(path), "route", "--json", "hola"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reason"] == "fast=unloaded, quality=unloaded"


def test_residency_reads_cold_load_times_only_when_asked():
    asked = []

    def cold(name):
        asked.append(name)
        return 1.5, False

    view = Residency({"fast": "loaded", "quality": "unloaded"}, cold)
    assert view.state("quality") == "unloaded" and view.state("other") == "unloaded"
    assert asked == []
    assert view["quality"] == ModelState("unloaded", 1.5, False)
    assert view["quality"] is view["quality"] and asked == ["quality"]
    assert view["fast"].warm and not view["quality"].warm
    with pytest.raises(KeyError):
        view["other"]


@pytest.mark.models
def test_an_engine_shows_its_pool_with_the_measured_load(make_config):
    config = make_config()  # fast pinned, quality on demand
    spy = SeesResidency()
    engine = Engine(config, build_plugins(config, extra=[("spy", spy)]))
    try:
        engine.route(ChatRequest.from_prompt("hola"))
        engine.start()  # loads the pinned fast model
        engine.route(ChatRequest.from_prompt("hola"))
        load_seconds = engine.pool.residents()[0]["load_seconds"]
    finally:
        engine.close()
    before, after = spy.seen
    assert before["fast"].state == "unloaded" and not before["fast"].measured
    assert after["fast"].state == "loaded" and after["fast"].measured
    assert after["fast"].cold_load_seconds == pytest.approx(load_seconds, abs=1e-3)
    assert after["quality"] == before["quality"]  # never loaded: the same estimate


# -- borderline_margin --------------------------------------------------------------------

def borderline_router(make_config, score: float, **settings) -> Router:
    config = make_config(heuristic(empathy_threshold=0.8, **settings), routing=EVAL_LIKE)
    return Router(config, build_plugins(config, extra=[("fixed", FixedEmpathy(score))]))


def test_a_borderline_case_goes_to_the_model_already_loaded(make_config):
    request = ChatRequest.from_prompt("Hola, ¿qué tal?")
    router = borderline_router(make_config, 0.85, borderline_margin=0.1)
    # the rules alone say fast (0.85 > 0.8); only quality is in memory
    moved = router.route(request, residency=residency(fast="unloaded", quality="loaded"))
    assert moved.model == "quality"
    assert moved.reason == ("borderline: empathy 0.85 is within 0.1 of 0.8 and 'quality' is "
                            "loaded; the rules alone say 'fast', which would load cold "
                            "(~0.13 s)")
    # a load under way counts as in memory too
    assert router.route(request, residency=residency(fast="unloaded",
                                                     quality="loading")).model == "quality"
    # both or neither in memory: the rules decide
    for states in (dict(fast="loaded", quality="loaded"), dict(fast="unloaded", quality="unloaded")):
        decision = router.route(request, residency=residency(**states))
        assert decision.model == "fast" and "short emotional" in decision.reason
    # below the threshold, within the margin: fast if only fast is loaded
    below = borderline_router(make_config, 0.75, borderline_margin=0.1)
    assert below.route(request, residency=residency(fast="loaded", quality="unloaded")
                       ).model == "fast"


def test_a_score_exactly_at_the_margin_is_borderline(make_config):
    # 0.75 - 0.5 is exactly 0.25 in binary floating point: on the edge, not past it.
    config = make_config(heuristic(empathy_threshold=0.5, borderline_margin=0.25),
                         routing=EVAL_LIKE)
    router = Router(config, build_plugins(config, extra=[("fixed", FixedEmpathy(0.75))]))
    decision = router.route(ChatRequest.from_prompt("Hola, ¿qué tal?"),
                            residency=residency(fast="unloaded", quality="loaded"))
    assert decision.model == "quality" and decision.reason.startswith("borderline:")


def test_outside_the_margin_or_off_the_residency_is_ignored(make_config):
    request = ChatRequest.from_prompt("Hola, ¿qué tal?")
    only_quality = residency(fast="unloaded", quality="loaded")
    for score, margin in ((0.95, 0.1), (0.85, 0.0)):
        router = borderline_router(make_config, score, borderline_margin=margin)
        assert router.route(request, residency=only_quality).model == "fast"
    # a long text is not conversation whatever its score: no borderline either
    router = borderline_router(make_config, 0.85, borderline_margin=0.1, max_chars=5)
    assert router.route(request, residency=residency(fast="loaded", quality="unloaded")
                        ).model == "quality"


# -- sticky_turns -------------------------------------------------------------------------

SAD = "Me siento muy triste hoy"  # the rules alone: fast


def sticky_router(make_config, turns: int) -> Router:
    return Router(make_config(heuristic(sticky_turns=turns), routing=EVAL_LIKE))


def test_a_conversation_stays_with_its_model_for_n_turns(make_config):
    router = sticky_router(make_config, 2)
    for previous, expected in [
        ((), "fast"),                                   # a new conversation: the rules
        (("quality",), "quality"),                      # moved to quality last turn: stay
        (("fast", "quality", "quality"), "quality"),    # 2 turns on quality: still <= 2
        (("quality", "quality", "quality"), "fast"),    # 3 in a row: the rules again
        (("", "quality"), "quality"),                   # an unknown earlier turn is no matter
        (("quality", ""), "fast"),                      # the latest is unknown: the rules
        (("vision",), "fast"),                          # not a configured model: ignored
    ]:
        request = ChatRequest.from_prompt(SAD, previous_models=previous)
        decision = router.route(request)
        assert decision.model == expected, (previous, decision.reason)
        if expected == "quality":
            run = request.previous_run
            assert decision.reason.startswith(
                f"sticky: 'quality' answered this conversation's last {run} turn")
            assert "the rules alone say 'fast' (short emotional conversation" in decision.reason


def test_an_attachment_overrides_stickiness(make_config):
    router = sticky_router(make_config, 5)
    request = ChatRequest.from_prompt("¿Qué ves?", images=(PNG,), previous_models=("fast",))
    assert router.route(request).model == "quality"


def test_sticky_off_by_default(make_config):
    router = Router(make_config(routing=EVAL_LIKE))
    request = ChatRequest.from_prompt(SAD, previous_models=("quality",))
    assert router.route(request).model == "fast"


def test_bad_settings_are_config_errors(write_config):
    path = write_config(heuristic(borderline_margin=1.5, sticky_turns=-1))
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "plugins.heuristic.borderline_margin: must be between 0 and 1" in result.output
    assert "plugins.heuristic.sticky_turns: must be >= 0" in result.output
    # a margin that reaches past 1 from the threshold makes every emotional text borderline
    path = write_config(heuristic(empathy_threshold=0.8, borderline_margin=0.2))
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "borderline_margin: 0.2 reaches 0 or 1 from empathy_threshold 0.8" in result.output


# -- where previous_models comes from -----------------------------------------------------

def test_the_server_reads_previous_models_from_assistant_names():
    body = {"model": "auto", "messages": [
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": "¡Hola!", "name": "quality"},
        {"role": "user", "content": "¿Qué tal?"},
        {"role": "assistant", "content": "Bien"},
        {"role": "assistant", "content": "¿Y tú?", "name": "fast"},
        {"role": "user", "content": "Me siento solo"},
    ]}
    parsed = parse_chat_body(body)
    assert parsed.request.previous_models == ("quality", "", "fast")
    assert parsed.request.previous_model == "fast" and parsed.request.previous_run == 1
    # the names are not passed on to the model
    assert all(set(m) == {"role", "content"} for m in parsed.request.messages)


@pytest.mark.models
def test_chat_remembers_which_model_answered_each_turn(make_config):
    from sarai_router.backend import GenerationParams
    from sarai_router.cli.chat import ChatSession

    engine = Engine(make_config(heuristic(sticky_turns=1), routing=EVAL_LIKE))
    out: list[str] = []
    session = ChatSession(engine, GenerationParams(max_tokens=2, temperature=0),
                          echo=lambda text="", nl=True: out.append(str(text)))
    try:
        session.turn("What is the capital of France?")  # the rules: quality
        assert session.answered == ["quality"]
        assert session.request(SAD).previous_models == ("quality",)
        session.turn(SAD)  # the rules say fast; sticky keeps quality one more turn
        assert session.answered == ["quality", "quality"]
        assert any("sticky: 'quality'" in line for line in out), out
        session.turn(SAD)  # two turns on quality > sticky_turns 1: the rules again
        assert session.answered == ["quality", "quality", "fast"]
        session.command("/reset")
        assert session.answered == [] and session.request("x").previous_models == ()
    finally:
        engine.close()


# -- measured by eval: a replay with a simulated pool -------------------------------------

TIGHT = dict(cache="ttl_seconds = 60\nmax_loaded = 1", fast="", routing=EVAL_LIKE)


def write_cases(tmp_path, *rows: dict) -> str:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def test_eval_chains_a_conversations_turns_for_sticky_turns(tmp_path, write_config):
    config = write_config(heuristic(sticky_turns=1), **TIGHT)
    cases = write_cases(
        tmp_path,
        {"prompt": "What is the capital of France?", "expect": "quality", "conversation": 1},
        {"prompt": SAD, "expect": "fast", "conversation": 1},       # sticks to quality
        {"prompt": SAD, "expect": "fast", "conversation": "other"},  # another conversation
        {"prompt": SAD, "expect": "fast", "conversation": 1},       # 2 turns > 1: the rules
    )
    result = CliRunner().invoke(cli, ["--config", str(config), "eval", "--json", cases])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (miss,) = report["misses"]
    assert miss["line"] == 2 and miss["chosen"] == "quality"
    assert miss["reason"].startswith("sticky: 'quality' answered this conversation's last 1 turn")
    with_, without = report["residency"]["with"], report["residency"]["without"]
    assert report["residency"]["settings"] == {"borderline_margin": 0.0, "sticky_turns": 1}
    assert (with_["accuracy"], without["accuracy"]) == (0.75, 1.0)
    # one model at a time: q f f f without (2 loads), q q f f with stickiness (2 loads too)
    assert without["cold_loads"] == {"fast": 1, "quality": 1}
    assert with_["cold_loads"] == {"fast": 1, "quality": 1}
    text = CliRunner().invoke(cli, ["--config", str(config), "eval", cases]).stdout
    assert "routing that knows what is loaded (borderline_margin 0.0, sticky_turns 1)" in text


def test_eval_simulates_the_pool_that_borderline_margin_reads(make_config):
    from sarai_router.evaluation import Case, evaluate

    config = make_config(heuristic(empathy_threshold=0.8, borderline_margin=0.1), **TIGHT)
    router = Router(config, build_plugins(config, extra=[("fixed", FixedEmpathy(0.85))]))
    requests = [ChatRequest.from_prompt("hola"), ChatRequest.from_prompt("¿y esto?", images=(PNG,)),
                ChatRequest.from_prompt("hola"), ChatRequest.from_prompt("hola")]
    cases = [Case(request=request, expect=expect, line=i + 1)
             for i, (request, expect) in enumerate(zip(requests, ["fast", "quality", "fast", "fast"]))]
    report = evaluate(router, cases, config=config)
    # 1: nothing loaded, fast by the rules; 2: an image -> quality (now the only one resident,
    # max_loaded 1); 3: borderline -> quality, already loaded; 4: the same
    assert [m["line"] for m in report["misses"]] == [3, 4]
    assert all(m["reason"].startswith("borderline: empathy 0.85 is within 0.1 of 0.8 and "
                                      "'quality' is loaded") for m in report["misses"])
    assert report["residency"]["with"]["cold_loads"] == {"fast": 1, "quality": 1}
    assert report["residency"]["without"]["cold_loads"] == {"fast": 2, "quality": 1}
    assert report["residency"]["without"]["accuracy"] == 1.0
    # the trade: one cold load of fast saved, two turns answered by the slower model
    from sarai_router.evaluation import ModelCost, request_seconds

    costs = {m: ModelCost(**c) for m, c in report["cost"]["models"].items()}
    expected = costs["fast"].load_s + 2 * (request_seconds(costs["fast"], "hola", 100)
                                           - request_seconds(costs["quality"], "hola", 100))
    saved = report["residency"]["without"]["total_s"] - report["residency"]["with"]["total_s"]
    assert saved == pytest.approx(expected, abs=0.11)


def test_an_assistant_name_in_a_case_is_a_previous_model(tmp_path, make_config):
    from sarai_router.evaluation import load_cases

    path = write_cases(tmp_path, {"messages": [
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": "Hola", "name": "quality"},
        {"role": "user", "content": SAD}], "expect": "fast"})
    (case,) = load_cases(path)
    assert case.request.previous_models == ("quality",)
    bad = write_cases(tmp_path, {"prompt": "x", "expect": "fast", "conversation": [1]})
    with pytest.raises(Exception, match=r"cases\.jsonl:1: \"conversation\" must be a string"):
        load_cases(bad)
