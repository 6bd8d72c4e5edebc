"""Routing measured on the labelled bilingual set (eval/), through the real Router and the
default plugins; case-file errors; the cost replay; calibration.

No model is loaded (but for the one test of the spoken cases): routing and the cost
estimate need only the config (and GGUF headers); spoken cases are routed on their
labelled transcript.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path

import attrs
import pytest

from sarai_router.loading import load_config
from sarai_router.evaluation import (
    HEURISTIC_TABLE,
    Case,
    CaseError,
    ModelCost,
    calibrate,
    evaluate,
    load_cases,
    render_calibration,
    render_text,
    replay_cost,
    with_heuristic,
)
from sarai_router.engine import Engine
from sarai_router.router import Router
from sarai_router.types import ChatRequest, Transcript

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EVAL = Path(__file__).resolve().parent.parent / "eval"
NO_COST: dict = {}  # accuracy only: skip the GGUF-header cost estimate


@pytest.fixture(scope="module")
def eval_config():
    return load_config(EVAL / "eval.toml")


@pytest.fixture(scope="module")
def eval_router(eval_config):
    return Router(eval_config)


def cases_of(name: str, config) -> list[Case]:
    return load_cases(EVAL / f"routing-{name}.jsonl", config.models)


def heard_cases_of(name: str, config) -> list[Case]:
    """The cases with each spoken clip replaced by its labelled transcript (``heard``):
    routing is measured on what was said, not on one CPU's int8 transcription of it."""
    return [as_heard(case) for case in cases_of(name, config)]


def as_heard(case: Case) -> Case:
    if case.request.audio is None:
        return case
    transcript = Transcript(text=case.extra["heard"], language=case.lang)
    return attrs.evolve(case, request=case.request.with_transcript(transcript))


# -- the set itself -----------------------------------------------------------------------

def test_the_set_has_400_bilingual_cases_split_dev_and_test(eval_config):
    dev, test = cases_of("dev", eval_config), cases_of("test", eval_config)
    assert len(dev) + len(test) >= 400
    assert 0.35 <= len(test) / (len(dev) + len(test)) <= 0.45
    for split in (dev, test):
        assert {c.lang for c in split} == {"es", "en", "mixed"}
        assert {"emotional", "neutral", "technical", "image_keyword", "media", "long",
                "long_emotional", "conversation"} <= {c.kind for c in split}
        assert {c.expect for c in split} == {"fast", "quality"}
    assert not {c.text for c in dev} & {c.text for c in test}


def test_every_label_follows_the_rule(eval_config):
    """images -> quality; audio -> what was said ("Me siento muy bien hoy.": short and
    emotional -> fast); short emotional -> fast; the rest -> quality (eval.toml's default)."""
    for name in ("dev", "test", "fresh1", "fresh2", "fresh3"):
        for case in cases_of(name, eval_config):
            emotional = case.kind in ("emotional", "long_emotional") or (
                case.kind == "conversation" and case.expect == "fast")
            should = ("fast" if case.request.audio is not None else
                      "quality" if case.media else
                      "fast" if emotional and len(case.text) < 200 else "quality")
            assert case.expect == should, (name, case.line, case.text)


def test_media_fixtures_are_real_files(eval_config):
    media = [c for c in cases_of("test", eval_config) + cases_of("dev", eval_config) if c.media]
    assert any(c.request.images for c in media) and any(c.request.audio for c in media)
    for case in media:
        for image in case.request.images:
            assert image.data.startswith(b"\x89PNG\r\n\x1a\n") and image.mime == "image/png"
        if case.request.audio is not None:
            assert case.request.audio.data[:4] == b"RIFF" and case.request.audio.mime in (
                "audio/wav", "audio/x-wav")


# -- accuracy through the real router -----------------------------------------------------

@pytest.mark.parametrize("name", ["test", "fresh3"])
def test_routing_accuracy_on_held_out_cases(eval_router, eval_config, name):
    cases = heard_cases_of(name, eval_config)
    assert any(case.request.transcript for case in cases)  # the spoken cases are in
    report = evaluate(eval_router, cases, config=eval_config, costs=NO_COST)
    assert report["accuracy"] >= 0.95, render_text(report)
    for kind in ("media", "image_keyword"):
        assert report["by_kind"][kind]["accuracy"] == 1.0, render_text(report)


@pytest.mark.models  # whisper
def test_the_spoken_clip_is_heard_close_to_its_label(eval_config):
    """The clip through the real whisper plugin, as ``eval`` hears it. Int8 transcription
    differs a little from CPU to CPU (one hears "Me piensó muy bien hoy"): at most one word
    in five of the labelled transcript may be heard differently."""
    (case, *_) = [case for case in cases_of("test", eval_config) if case.request.audio]
    engine = Engine(eval_config)
    try:
        heard = engine.transcribe(case.request.audio, case.request, why="the test").text
    finally:
        engine.close()
    label, words = _words(case.extra["heard"]), _words(heard)
    assert difflib.SequenceMatcher(None, label, words).ratio() >= 0.8, (heard, label)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def test_the_issues_examples_route_to_the_conversation_model(eval_router):
    for text in ("Me siento solo últimamente", "Echo mucho de menos a mi abuela",
                 "Tengo el corazón roto, me dejó mi novio", "I feel like nobody understands me",
                 "My dog died this morning and I can't stop crying",
                 "Thanks for being there for me, it means a lot"):
        decision = eval_router.route(ChatRequest.from_prompt(text))
        assert decision.model == "fast", (text, decision.signals["empathy"])


def test_report_counts_agree_and_misses_explain_themselves(eval_config):
    router = Router(eval_config)
    cases = [
        Case(request=ChatRequest.from_prompt("Me siento muy triste hoy"), expect="quality", line=1),
        Case(request=ChatRequest.from_prompt("Explain the CAP theorem"), expect="quality", line=2),
        Case(request=ChatRequest.from_prompt("I'm so lonely tonight"), expect="fast", line=3),
    ]
    report = evaluate(router, cases, config=eval_config, costs=NO_COST)
    assert report["cases"] == 3 and report["correct"] == 2
    assert report["accuracy"] == round(2 / 3, 4)
    assert report["confusion"] == {"fast": {"fast": 1}, "quality": {"fast": 1, "quality": 1}}
    assert report["models"]["fast"] == {"expected": 1, "chosen": 2, "correct": 1,
                                        "precision": 0.5, "recall": 1.0}
    assert report["models"]["quality"]["precision"] == 1.0
    assert report["models"]["quality"]["recall"] == 0.5
    (miss,) = report["misses"]
    assert miss["line"] == 1 and miss["prompt"] == "Me siento muy triste hoy"
    assert (miss["expected"], miss["chosen"], miss["plugin"]) == ("quality", "fast", "heuristic")
    assert "short emotional conversation" in miss["reason"]
    json.dumps(report)  # JSON-ready
    text = render_text(report)
    assert "accuracy: 66.7% (2/3)" in text and "line 1: expected quality, chose fast" in text


def test_evaluate_agrees_with_route_case_by_case(eval_router, eval_config):
    # The Router alone hears no audio: spoken cases are compared with `route --audio`,
    # which transcribes, in test_cli_eval.py.
    cases = [c for c in cases_of("fresh3", eval_config) if c.request.audio is None]
    report = evaluate(eval_router, cases, config=eval_config, costs=NO_COST)
    missed = {m["line"]: m["chosen"] for m in report["misses"]}
    for case in cases:
        chosen = eval_router.route(case.request).model
        assert (chosen == case.expect) == (case.line not in missed)
        if case.line in missed:
            assert missed[case.line] == chosen


# -- case-file errors ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "hola", "expect": "fast"', "not valid JSON"),
        ('["hola", "fast"]', "expected a JSON object"),
        ('{"expect": "fast"}', 'missing "prompt"'),
        ('{"prompt": "hola"}', 'missing "expect"'),
        ('{"prompt": "hola", "expect": "turbo"}', "unknown model 'turbo'"),
        ('{"prompt": 3, "expect": "fast"}', '"prompt" must be a string'),
        ('{"prompt": "a", "messages": [], "expect": "fast"}', "not both"),
        ('{"messages": [], "expect": "fast"}', '"messages" must be a non-empty list'),
        ('{"messages": [{"role": "assistant", "content": "x"}], "expect": "fast"}',
         'no "user" message'),
        ('{"prompt": "mira", "images": ["nope.png"], "expect": "quality"}',
         "image 'nope.png': cannot read"),
        ('{"prompt": "oye", "audio": "nope.wav", "expect": "quality"}',
         "audio 'nope.wav': cannot read"),
        ('{"prompt": "mira", "images": "a.png b.png", "expect": "quality"}', "cannot read"),
        ('{"prompt": "mira", "images": [1], "expect": "quality"}', "list of path strings"),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_number(tmp_path, eval_config, line, message):
    path = tmp_path / "cases.jsonl"
    good = '{"prompt": "Hola", "expect": "fast"}'
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(CaseError) as caught:
        load_cases(path, eval_config.models)
    assert str(caught.value).startswith(f"{path}:3: "), str(caught.value)
    assert message in str(caught.value)


def test_media_paths_are_relative_to_the_case_file(tmp_path, eval_config):
    (tmp_path / "media").mkdir()
    png = (EVAL / "fixtures" / "gradient.png").read_bytes()
    (tmp_path / "media" / "cat.png").write_bytes(png)
    path = tmp_path / "cases.jsonl"
    path.write_text('{"prompt": "¿Qué es?", "images": ["media/cat.png"], "expect": "quality",'
                    ' "kind": "media", "lang": "es", "note": "kept"}\n', encoding="utf-8")
    (case,) = load_cases(path, eval_config.models)
    assert case.request.images[0].data == png and case.kind == "media"
    assert case.extra == {"note": "kept"} and case.line == 1


def test_missing_or_empty_files_are_reported(tmp_path):
    with pytest.raises(CaseError, match="file not found"):
        load_cases(tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(CaseError, match="no cases"):
        load_cases(empty)


def test_evaluate_refuses_an_expect_the_config_lacks(eval_router, eval_config, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "hola", "expect": "vision"}\n', encoding="utf-8")
    cases = load_cases(path)  # no models given: checked at evaluation
    with pytest.raises(CaseError, match=r"c\.jsonl:1: .*unknown model 'vision'"):
        evaluate(eval_router, cases, config=eval_config, costs=NO_COST)


# -- cost replay --------------------------------------------------------------------------

COSTS = {"fast": ModelCost(tokens_per_second=100.0, load_s=1.0, ram_mb=1024.0, source="test"),
         "quality": ModelCost(tokens_per_second=50.0, load_s=2.0, ram_mb=2048.0, source="test")}


def _cases(n: int) -> list[Case]:
    return [Case(request=ChatRequest.from_prompt("x" * 8), expect="fast", line=i + 1)
            for i in range(n)]


def test_replay_counts_cold_loads_with_pinning_and_ttl(make_config):
    # quality's TTL is 1.5 s: two fast requests (~1 s each) in between let it expire
    config = make_config(quality="ttl_seconds = 1.5")
    plan = ["quality", "fast", "quality", "fast", "fast", "quality"]
    cost = replay_cost(config, _cases(len(plan)), plan, COSTS, reply_tokens=100)
    routed = cost["routed"]
    assert routed["cold_loads"] == {"quality": 2}  # fast is pinned: loaded before any request
    fast_s, quality_s = (100 + 2 / 8) / 100, (100 + 2 / 8) / 50
    assert routed["total_s"] == round(3 * fast_s + 3 * quality_s + 2 * 2.0, 1)
    assert cost["all quality"]["cold_loads"] == {"quality": 1}
    assert cost["all fast"]["cold_loads"] == {}
    assert cost["all fast"]["mean_latency_s"] == round(fast_s, 3)
    # RAM: fast (1 GB) all along; quality (2 GB) only while resident
    assert cost["all fast"]["ram_gb_s"] == round(1.0 * 6 * fast_s, 1)
    assert cost["all quality"]["mean_ram_gb"] == 3.0


MOST_RECENT_OUT = """
from sarai_router.hookspecs import hookimpl

@hookimpl
def select_eviction(candidates, needed_mb, loading):
    return max(candidates, key=lambda resident: resident.last_used).name
"""

NEVER_EXPIRE = """
from sarai_router.hookspecs import hookimpl

@hookimpl
def model_expired(resident, now, cache):
    return False
"""


def _with_plugin(tmp_path, make_config, source: str | None, extra: str = "", **parts: str):
    """The base config (and ``extra``), with a plugin file of ``source`` when given."""
    if source is not None:
        (tmp_path / "plugs").mkdir(exist_ok=True)
        (tmp_path / "plugs" / "mine.py").write_text(source, encoding="utf-8")
        extra += '[plugins]\ndirs = ["plugs"]\n'
    return make_config(extra, **parts)


def test_replay_asks_the_cache_plugins_which_model_to_evict(tmp_path, make_config):
    # three unpinned models, two fit: loading "third" evicts quality (least recently used)
    # by default, fast under a plugin that evicts the most recently used
    parts = dict(fast="", quality="", cache="ttl_seconds = 600\nmax_loaded = 2")
    third = '[models.third]\npath = "{models_dir}/third.gguf"\n'
    costs = {**COSTS, "third": COSTS["quality"]}
    plan = ["fast", "quality", "fast", "third", "fast", "quality"]
    estimates = {}
    for label, plugin in (("default", None), ("most recent out", MOST_RECENT_OUT)):
        config = _with_plugin(tmp_path, make_config, plugin, third, **parts)
        estimates[label] = replay_cost(config, _cases(len(plan)), plan, costs)["routed"]
    assert estimates["default"]["cold_loads"] == {"fast": 1, "quality": 2, "third": 1}
    assert estimates["most recent out"]["cold_loads"] == {"fast": 2, "quality": 1, "third": 1}
    assert estimates["most recent out"]["total_s"] < estimates["default"]["total_s"]


def test_replay_asks_the_cache_plugins_when_a_model_expired(tmp_path, make_config):
    # quality's TTL (1.5 s) runs out between its requests, unless a plugin keeps it
    plan = ["quality", "fast", "quality", "fast", "fast", "quality"]
    loads = {}
    for label, plugin in (("default", None), ("never expire", NEVER_EXPIRE)):
        config = _with_plugin(tmp_path, make_config, plugin, quality="ttl_seconds = 1.5")
        loads[label] = replay_cost(config, _cases(len(plan)), plan, COSTS)["routed"]["cold_loads"]
    assert loads == {"default": {"quality": 2}, "never expire": {"quality": 1}}


def test_replay_without_cost_figures_says_so(config):
    cost = replay_cost(config, _cases(2), ["fast", "quality"], {"fast": COSTS["fast"]})
    assert cost["unknown"] == ["quality"] and "quality" in cost["note"]


def test_cost_estimate_from_gguf_headers(config):
    report = evaluate(Router(config), _cases(3), config=config)
    models = report["cost"]["models"]
    assert set(models) == {"fast", "quality"}
    # the larger file decodes slower and takes more RAM (estimated from the header)
    assert models["quality"]["tokens_per_second"] < models["fast"]["tokens_per_second"]
    assert models["quality"]["ram_mb"] > models["fast"]["ram_mb"]
    assert "estimated cost" in render_text(report)


# -- calibration --------------------------------------------------------------------------

def test_calibration_picks_a_threshold_and_prints_a_pasteable_snippet(eval_config):
    cases = heard_cases_of("dev", eval_config)
    result = calibrate(eval_config, cases, thresholds=(0.2, 0.5, 0.8, 0.95),
                       max_chars=(120, 200), costs=NO_COST)
    best = result["best"]
    assert 0.0 <= best["empathy_threshold"] <= 1.0 and best["max_chars"] in (120, 200)
    assert len(result["curve"]) == 8
    current = next(r for r in result["curve"]
                   if (r["empathy_threshold"], r["max_chars"]) == (0.8, 200))
    assert best["accuracy"] >= current["accuracy"]
    assert best["accuracy"] == max(r["accuracy"] for r in result["curve"])
    table = tomllib.loads(result["toml"])
    section, name = HEURISTIC_TABLE.split(".")
    assert table[section][name] == {"empathy_threshold": best["empathy_threshold"],
                                    "max_chars": best["max_chars"]}
    assert result["toml"].rstrip() in render_calibration(result)


def test_calibration_for_latency_sends_more_to_the_fast_model(eval_config, config):
    cases = heard_cases_of("dev", eval_config)
    grid = dict(thresholds=(0.1, 0.5, 0.8, 0.95), max_chars=(200, 400), costs=COSTS)
    accurate = calibrate(eval_config, cases, target="accuracy", **grid)
    quick = calibrate(eval_config, cases, target="latency", min_accuracy=0.8, **grid)
    assert quick["best"]["accuracy"] >= 0.8
    assert quick["best"]["mean_latency_s"] <= accurate["best"]["mean_latency_s"]
    assert quick["best"]["share"]["fast"] >= accurate["best"]["share"]["fast"]
    with pytest.raises(ValueError, match="target"):
        calibrate(eval_config, cases, target="speed")


def test_with_heuristic_changes_what_the_router_decides(eval_config):
    text = ChatRequest.from_prompt("Me siento muy triste hoy")
    assert Router(eval_config).route(text).model == "fast"
    strict = with_heuristic(eval_config, empathy_threshold=0.995)
    assert Router(strict).route(text).model == "quality"
    assert eval_config.plugin_config("heuristic")["empathy_threshold"] == 0.8  # the original is untouched


def test_render_plot_writes_a_png(tmp_path, eval_config):
    from sarai_router.evaluation import render_plot  # matplotlib: a test dependency

    result = calibrate(eval_config, heard_cases_of("fresh3", eval_config),
                       thresholds=(0.5, 0.8), max_chars=(200,), costs=COSTS)
    out = render_plot(result["curve"], tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
