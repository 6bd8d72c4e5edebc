"""Plugin discovery (plugins dir, entry points), blocking, isolation, and the routing hooks."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from sarai_router import Route, hookimpl
from sarai_router.errors import AudioError
from sarai_router.plugins import DEFAULT_PLUGINS, Hooks, build_plugins
from sarai_router.router import FALLBACK_PLUGIN, Router, RoutingError
from sarai_router.types import AudioInput, ChatRequest, Transcript

SAD = "Me siento muy triste hoy"
NEUTRAL = "What is the capital of France?"


def write_plugin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text("from sarai_router import hookimpl, Route\n\n" + textwrap.dedent(body))
    return path


def plugins_dir_config(make_config, tmp_path, *, disable=(), **parts):
    disable_list = ", ".join(f'"{n}"' for n in disable)
    return make_config(f'[plugins]\ndirs = ["plugs"]\ndisable = [{disable_list}]\n', **parts)


def route(router: Router, text: str):
    return router.route(ChatRequest.from_prompt(text))


@pytest.fixture(autouse=True)
def _forget_plugin_modules():
    """Plugins-dir modules are cached in sys.modules under a fixed prefix; drop them after."""
    yield
    for name in [m for m in sys.modules if m.startswith(("sarai_router_plugins_dir.", "sr_test_ep_"))]:
        del sys.modules[name]


# -- discovery -----------------------------------------------------------------------


def test_plugins_dir_loads_py_files_and_they_change_routing(make_config, tmp_path):
    plugs = tmp_path / "plugs"
    source = write_plugin(plugs, "always_quality", """
        @hookimpl
        def select_route(request, signals, models):
            return "quality"
    """)
    write_plugin(plugs, "_helper", "raise RuntimeError('files starting with _ are not plugins')\n")
    (plugs / "notes.txt").write_text("not a plugin")
    router = Router(plugins_dir_config(make_config, tmp_path))
    decision = route(router, SAD)
    assert decision.model == "quality"
    assert decision.plugin == "always_quality"
    assert decision.reason == "chosen by plugin 'always_quality'"
    assert router.plugins.sources["always_quality"] == str(source)
    assert "_helper" not in router.plugins.sources
    assert router.plugins.failures == []


def make_distribution(site: Path, dist: str, module: str, body: str, ep_name: str) -> None:
    """A real installed distribution: a module plus a .dist-info with entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text("from sarai_router import hookimpl, Route\n\n" + textwrap.dedent(body))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sarai_router]\n{ep_name} = {module}\n")


@pytest.fixture
def entry_point_plugin(tmp_path, monkeypatch):
    make_distribution(tmp_path / "site", "sr-test-plugin", "sr_test_ep_quality", """
        @hookimpl
        def select_route(request, signals, models):
            return Route("quality", "the entry point plugin says so")
    """, ep_name="ep_quality")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "ep_quality"


def test_entry_point_plugin_is_discovered_and_routes(entry_point_plugin, config):
    # Plugins are discovered when the config loads, so the plugin is installed first.
    router = Router(config)
    decision = route(router, SAD)
    assert decision.model == "quality"
    assert decision.plugin == entry_point_plugin
    assert decision.reason == "the entry point plugin says so"
    assert router.plugins.sources[entry_point_plugin] == "entry point sr_test_ep_quality"


def test_no_plugins_env_disables_entry_points_and_plugin_dirs(make_config, tmp_path, monkeypatch,
                                                               entry_point_plugin):
    write_plugin(tmp_path / "plugs", "always_quality", """
        @hookimpl
        def select_route(request, signals, models):
            return "quality"
    """)
    monkeypatch.setenv("SARAI_ROUTER_NO_PLUGINS", "1")
    router = Router(plugins_dir_config(make_config, tmp_path))
    assert set(router.plugins.sources) == set(DEFAULT_PLUGINS)
    decision = route(router, SAD)
    assert (decision.model, decision.plugin) == ("fast", "heuristic")


def test_plugin_that_fails_to_import_is_reported_and_others_load(make_config, tmp_path, caplog):
    write_plugin(tmp_path / "plugs", "broken", "def (:\n")
    write_plugin(tmp_path / "plugs", "ok_plugin", """
        @hookimpl
        def select_route(request, signals, models):
            return "quality"
    """)
    with caplog.at_level(logging.WARNING):
        router = Router(plugins_dir_config(make_config, tmp_path))
    [failure] = router.plugins.failures
    assert failure.name == "broken" and "SyntaxError" in failure.error
    assert "broken" in caplog.text
    assert route(router, SAD).plugin == "ok_plugin"


def test_missing_plugins_dir_is_reported(make_config, tmp_path):
    router = Router(plugins_dir_config(make_config, tmp_path))  # tmp_path/plugs does not exist
    [failure] = router.plugins.failures
    assert "not a directory" in failure.error


# -- blocking by name ---------------------------------------------------------------


def test_blocking_the_default_heuristic_falls_back_to_default_model(make_config):
    config = make_config('[plugins]\ndisable = ["heuristic"]\n', routing='default_model = "quality"')
    router = Router(config)
    assert "heuristic" not in router.plugins.sources
    decision = route(router, SAD)
    assert decision.model == "quality"
    assert decision.plugin == FALLBACK_PLUGIN
    assert decision.fallback is True
    assert "no routing plugin chose a model" in decision.reason
    assert "default_model 'quality'" in decision.reason


def test_blocking_the_default_empathy_scorer_removes_the_signal(make_config):
    router = Router(make_config('[plugins]\ndisable = ["empathy"]\n', routing='default_model = "quality"'))
    decision = route(router, SAD)
    assert "empathy" not in decision.signals
    assert decision.model == "quality"  # no empathy: the short-emotional rule cannot fire


def test_blocking_a_user_plugin_by_name(make_config, tmp_path):
    write_plugin(tmp_path / "plugs", "always_quality", """
        @hookimpl
        def select_route(request, signals, models):
            return "quality"
    """)
    router = Router(plugins_dir_config(make_config, tmp_path, disable=["always_quality"]))
    assert "always_quality" not in router.plugins.sources
    assert route(router, SAD).model == "fast"


def test_blocking_an_entry_point_plugin_by_name(make_config, entry_point_plugin):
    router = Router(make_config(f'[plugins]\ndisable = ["{entry_point_plugin}"]\n'))
    assert entry_point_plugin not in router.plugins.sources
    assert route(router, SAD).plugin == "heuristic"


# -- select_route -------------------------------------------------------------------


class ChooseByKeyword:
    """A user plugin: 'urgent' goes to quality as a Route, 'fast please' to fast as a str."""

    @hookimpl
    def select_route(self, request, signals, models, config):
        assert set(models) == set(config.models)
        assert {"empathy", "chars", "modality"} <= set(signals)
        if "urgent" in request.text:
            return Route("quality", "urgent requests get the quality model")
        if "fast please" in request.text:
            return "fast"
        return None


def test_hook_select_route(make_config):
    config = make_config(routing='default_model = "quality"')
    router = Router(config, build_plugins(config, extra=[("by_keyword", ChooseByKeyword())]))
    as_route = route(router, "I feel so sad, it's urgent")
    assert (as_route.model, as_route.plugin, as_route.reason) == (
        "quality", "by_keyword", "urgent requests get the quality model")
    as_str = route(router, "Summarize this, fast please")
    assert (as_str.model, as_str.plugin) == ("fast", "by_keyword")
    assert as_str.reason == "chosen by plugin 'by_keyword'"
    # None passes to the next plugin: the default heuristic decides
    passed = route(router, SAD)
    assert (passed.model, passed.plugin) == ("fast", "heuristic")


class RaisingRouter:
    @hookimpl
    def select_route(self, request):
        raise RuntimeError("boom")


def test_plugin_that_raises_is_logged_and_skipped(config, caplog):
    router = Router(config, build_plugins(config, extra=[("raiser", RaisingRouter())]))
    with caplog.at_level(logging.WARNING):
        decision = route(router, SAD)
    assert (decision.model, decision.plugin) == ("fast", "heuristic")
    [error] = router.hooks.errors
    assert "'raiser'" in error and "select_route" in error and "RuntimeError: boom" in error
    assert "raiser" in caplog.text and "boom" in caplog.text


class QualityRouter:
    @hookimpl
    def select_route(self, request):
        return Route("quality", "asked for quality")


def test_a_raising_plugin_is_skipped_inside_the_pm_hook_call_and_the_next_answers(config):
    """Registered last, the raiser is asked first; the plugin after it answers, in the same
    ``pm.hook.select_route`` call (pluggy's own call monitoring sees exactly one call, whose
    result names the plugin that answered)."""
    plugins = build_plugins(config, extra=[("quality", QualityRouter()),
                                           ("raiser", RaisingRouter())])
    router = Router(config, plugins)
    seen = []
    undo = plugins.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: seen.append((hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: seen.append((hook, outcome.get_result())))
    try:
        decision = route(router, NEUTRAL)
    finally:
        undo()
    assert (decision.model, decision.plugin) == ("quality", "quality")
    assert decision.reason == "asked for quality"
    calls = [entry for entry in seen if entry[0] == "select_route"]
    assert calls == [("select_route", ["heuristic", "quality", "raiser"]),
                     ("select_route", ("quality", Route("quality", "asked for quality")))]
    [error] = router.hooks.errors
    assert "'raiser' raised in select_route: RuntimeError: boom" in error


def test_pm_hook_called_directly_keeps_pluggys_behaviour(config):
    """Only the facade's calls isolate plugins: a direct ``pm.hook`` call raises as
    pluggy does, and the facade records nothing for it."""
    plugins = build_plugins(config, extra=[("raiser", RaisingRouter())])
    router = Router(config, plugins)
    with pytest.raises(RuntimeError, match="boom"):
        plugins.pm.hook.select_route(request=ChatRequest.from_prompt(SAD), signals={},
                                     models=config.models, config=config, residency={})
    assert not router.hooks.errors


class DefaultsRouter:
    """An implementation that gives an argument a default: pluggy hands it what the call has."""

    @hookimpl
    def select_route(self, request, signals=None, nonsense="kept"):
        return Route("quality", f"chars={signals['chars']} nonsense={nonsense}")


def test_an_argument_with_a_default_gets_the_calls_value(config):
    router = Router(config, build_plugins(config, extra=[("defaults", DefaultsRouter())]))
    decision = route(router, "hola")
    assert (decision.plugin, decision.reason) == ("defaults", "chars=4 nonsense=kept")


class Refuses:
    @hookimpl
    def transcribe(self, audio):
        raise AudioError("not audio (refused by the test plugin)")


class AnswersNonsense:
    @hookimpl
    def transcribe(self, audio):
        return "a bare string, not a Transcript"


class Hears:
    @hookimpl
    def transcribe(self, audio):
        return Transcript(text="hola", language="es", duration=1.0)


def test_transcribe_passes_a_refusal_on_and_skips_a_wrong_answer(config):
    """Asked last-registered first: a SaraiError passes the word on (not a failure), a
    wrong type is skipped as a failure, and the next plugin's transcript is the answer."""
    # whisper is blocked: the test plugins alone are asked
    config = attrs.evolve(config, plugins=attrs.evolve(config.plugins, disable=["whisper"]))
    clip = AudioInput(data=b"RIFF")
    plugins = build_plugins(config, extra=[("hears", Hears()), ("nonsense", AnswersNonsense()),
                                           ("refuses", Refuses())])
    hooks = Hooks(plugins, config)
    answer = hooks.transcribe(audio=clip, request=None)
    assert (answer.plugin, answer.value.text) == ("hears", "hola")
    [error] = hooks.errors
    assert "'nonsense' raised in transcribe" in error and "expected a sarai_router" in error
    # Nobody transcribes: the first refusal is what the caller hears.
    alone = Hooks(build_plugins(config, extra=[("refuses", Refuses())]), config)
    with pytest.raises(AudioError, match="refused by the test plugin"):
        alone.transcribe(audio=clip, request=None)
    assert not alone.errors


class UnknownModelRouter:
    @hookimpl
    def select_route(self):
        return Route("gpt-5", "wishful")


def test_plugin_returning_unknown_model_is_a_clear_error(config):
    router = Router(config, build_plugins(config, extra=[("dreamer", UnknownModelRouter())]))
    with pytest.raises(RoutingError) as info:
        route(router, SAD)
    message = str(info.value)
    assert "'dreamer'" in message and "'gpt-5'" in message and "not configured" in message
    assert "fast, quality" in message


class WrongTypeRouter:
    @hookimpl
    def select_route(self):
        return 42


def test_plugin_returning_wrong_type_is_a_clear_error(config):
    router = Router(config, build_plugins(config, extra=[("numbers", WrongTypeRouter())]))
    with pytest.raises(RoutingError, match="plugin 'numbers' returned int"):
        route(router, SAD)


class PassingRouter:
    calls = 0

    @hookimpl
    def select_route(self):
        PassingRouter.calls += 1
        return None


def test_every_plugin_passing_falls_back_to_default_model(make_config):
    config = make_config('[plugins]\ndisable = ["heuristic"]\n')
    router = Router(config, build_plugins(config, extra=[("passer", PassingRouter())]))
    decision = route(router, NEUTRAL)
    assert PassingRouter.calls == 1
    assert decision.fallback and decision.plugin == FALLBACK_PLUGIN
    assert decision.model == "fast"
    assert "fell back to [routing] default_model 'fast'" in decision.reason


def test_explicit_model_bypasses_routing_plugins(config):
    router = Router(config, build_plugins(config, extra=[("dreamer", UnknownModelRouter())]))
    decision = router.route(ChatRequest.from_prompt(SAD), model="quality")
    assert (decision.model, decision.plugin) == ("quality", "(explicit)")
    with pytest.raises(RoutingError, match="'nope'"):
        router.route(ChatRequest.from_prompt(SAD), model="nope")


# -- register_signals ---------------------------------------------------------------


class AlwaysEmotional:
    """Replaces the default empathy scorer (and adds a signal of its own)."""

    @hookimpl
    def register_signals(self, register, config):
        register("empathy", lambda request: 0.99)
        register("shouting", lambda request: request.text.isupper())


def test_hook_register_signals(make_config):
    config = make_config(routing='default_model = "quality"')
    default_router = Router(config)
    assert route(default_router, NEUTRAL).model == "quality"
    router = Router(config, build_plugins(config, extra=[("always_emotional", AlwaysEmotional())]))
    decision = route(router, NEUTRAL)
    assert decision.signals["empathy"] == 0.99
    assert decision.signals["shouting"] is False
    assert decision.model == "fast" and "short emotional" in decision.reason
    functions = router.hooks.signal_functions()
    assert functions["empathy"][0] == "always_emotional"
    assert functions["chars"][0] == "signals"


def test_empathy_scorer_replaced_from_a_plugins_dir(make_config, tmp_path):
    write_plugin(tmp_path / "plugs", "calm_scorer", """
        @hookimpl
        def register_signals(register):
            register("empathy", lambda request: 0.0)
    """)
    router = Router(plugins_dir_config(make_config, tmp_path, routing='default_model = "quality"'))
    decision = route(router, SAD)
    assert decision.signals["empathy"] == 0.0
    assert decision.model == "quality"


class RaisingSignal:
    @hookimpl
    def register_signals(self, register):
        register("empathy", lambda request: 1 / 0)


def test_signal_that_raises_is_left_out_and_reported(config):
    router = Router(config, build_plugins(config, extra=[("bad_signal", RaisingSignal())]))
    decision = route(router, SAD)
    assert "empathy" not in decision.signals
    assert any("'empathy'" in e and "'bad_signal'" in e and "ZeroDivisionError" in e
               for e in router.hooks.errors)


def test_a_misspelt_hook_name_is_warned_about(make_config, tmp_path):
    write_plugin(tmp_path / "plugs", "typo", """
        @hookimpl
        def select_rout(request):
            return "quality"
    """)
    router = Router(plugins_dir_config(make_config, tmp_path))
    assert router.plugins.warnings == [
        "plugin 'typo' implements 'select_rout', which is not a sarai_router hook, "
        "so it is never called (a typo?)"
    ]
    assert route(router, SAD).plugin == "heuristic"
