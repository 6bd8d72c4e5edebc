"""The core seams: plugin config tables, backend-owned keys, hook snapshots, wrappers.

Everything here goes through real config files, the real plugin discovery and the real
router; no model is loaded (the echo backend below is a plugin, not a double of a part).
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from sarai_router.cli import cli
from sarai_router.config import ConfigError
from sarai_router.loading import load_config
from sarai_router.errors import SaraiError
from sarai_router.types import ResidentInfo
from sarai_router.router import Router
from sarai_router.types import ChatRequest

SAD = "Me siento muy triste hoy"

MATHS_PLUGIN = '''
import attrs
from sarai_router import Route, hookimpl


@attrs.frozen
class Settings:
    keyword: str = "integral"
    model: str = "quality"


@hookimpl
def register_config_tables(register):
    register("maths", Settings)


@hookimpl
def select_route(request, config):
    settings = config.plugin_config("maths")
    if settings["keyword"] in request.text:
        return Route(settings["model"], f"maths: mentions {settings['keyword']!r}")
    return None
'''

ECHO_BACKEND = '''
import attrs
from sarai_router import hookimpl
from sarai_router.backend import Backend, Delta, Usage


@attrs.frozen
class EchoSettings:
    prefix: str = ""


class EchoModel:
    def __init__(self, spec):
        self.spec = spec

    def chat(self, messages, params, *, images=(), audio=None):
        words = messages[-1]["content"].split()
        for word in words:
            yield Delta(text=self.spec.settings.prefix + word + " ")
        yield Delta(text="", finish_reason="stop", usage=Usage(len(words), len(words)))

    def close(self):
        pass


class EchoBackend(Backend):
    settings_class = EchoSettings

    def load(self, spec):
        return EchoModel(spec)


@hookimpl
def register_backends(register):
    register("echo", EchoBackend())
'''


@pytest.fixture(autouse=True)
def _forget_plugin_modules():
    yield
    for name in [m for m in sys.modules if m.startswith("sarai_router_plugins_dir.")]:
        del sys.modules[name]


def plugin_dir(tmp_path: Path, **plugins: str) -> Path:
    folder = tmp_path / "plugs"
    folder.mkdir(exist_ok=True)
    for name, body in plugins.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return folder


def route(router: Router, text: str):
    return router.route(ChatRequest.from_prompt(text))


# -- plugin config tables ---------------------------------------------------------------


def test_hook_register_config_tables(tmp_path, write_config):
    plugin_dir(tmp_path, maths=MATHS_PLUGIN)
    path = write_config('[plugins]\ndirs = ["plugs"]\n[plugins.maths]\nkeyword = "derivada"\n')
    config = load_config(path)
    assert dict(config.plugin_config("maths")) == {"keyword": "derivada", "model": "quality"}
    decision = route(Router(config), "¿Cuál es la derivada de x^2?")
    assert (decision.model, decision.plugin) == ("quality", "maths")
    assert decision.reason == "maths: mentions 'derivada'"
    # The default keyword no longer routes: the table's value is the one in force.
    assert route(Router(config), "una integral").plugin != "maths"
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok (2 models" in result.output


def test_plugin_config_is_read_only_and_empty_when_absent(config):
    table = config.plugin_config("nobody")
    assert dict(table) == {}
    with pytest.raises(TypeError):
        table["x"] = 1  # type: ignore[index]


def test_plugin_table_errors_name_the_key(tmp_path, write_config):
    plugin_dir(tmp_path, maths=MATHS_PLUGIN)
    path = write_config('[plugins]\ndirs = ["plugs"]\n'
                        '[plugins.maths]\nkeyword = 3\ncolour = "red"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any(p.startswith(f"{path}: plugins.maths.keyword: expected str") for p in problems), problems
    assert f"{path}: plugins.maths.colour: unknown key" in problems, problems


def test_config_check_refuses_a_table_for_no_loaded_plugin(write_config):
    path = write_config("[plugins.nobody]\nx = 1\n")
    load_config(path)  # at run time a stale table is no reason to stop
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=True)
    assert any("plugins.nobody: no plugin named 'nobody' is loaded" in p
               for p in info.value.problems), info.value.problems


def test_heuristic_settings_from_the_plugin_table(make_config):
    config = make_config('[plugins.heuristic]\nempathy_threshold = 1.0\n'
                         'conversation_model = "quality"\n')
    decision = route(Router(config), SAD)
    # SAD scores above 0.8 but no score is above 1.0: the table's threshold is in force.
    assert 0.8 < decision.signals["empathy"] <= 1.0
    assert decision.reason == "no rule matched: the default model"
    config = make_config('[plugins.heuristic]\nconversation_model = "quality"\n')
    decision = route(Router(config), SAD)
    assert (decision.model, decision.plugin) == ("quality", "heuristic")


def test_old_routing_heuristic_table_still_routes_the_same(make_config, caplog):
    new = make_config('[plugins.heuristic]\nconversation_model = "quality"\nmax_chars = 20\n')
    with caplog.at_level(logging.WARNING, logger="sarai_router.config"):
        old = make_config('[routing.heuristic]\nconversation_model = "quality"\nmax_chars = 20\n')
    assert any("[routing.heuristic] is deprecated" in r.getMessage() for r in caplog.records)
    for text in (SAD, "Me siento triste", "Describe esta imagen", "What time is it?"):
        a, b = route(Router(new), text), route(Router(old), text)
        assert (a.model, a.plugin, a.reason) == (b.model, b.plugin, b.reason), text


def test_example_plugins_read_their_tables(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "config" / "with-plugins.toml")
    assert config.plugin_config("prefer_quality_for_code")["long_prompt_chars"] == 400
    assert config.plugin_config("exclamation_empathy")["per_mark"] == 0.1
    text = (repo / "config" / "with-plugins.toml").read_text(encoding="utf-8")
    mine = tmp_path / "with-plugins.toml"
    mine.write_text(text.replace("long_prompt_chars = 400", "long_prompt_chars = 10")
                    .replace('"../plugins"', f'"{(repo / "plugins").as_posix()}"'))
    decision = route(Router(load_config(mine)), "a plain question for you")
    assert decision.plugin == "prefer_quality_for_code"
    assert "long prompt" in decision.reason


# -- backends: their own keys, checked by config check ----------------------------------


def test_config_check_rejects_an_unregistered_backend(write_config):
    path = write_config('[models.warp]\nbackend = "warp_drive"\npath = "x.gguf"\n')
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "models.warp.backend: no plugin registers backend 'warp_drive'" in result.output
    assert "registered: llama_cpp" in result.output
    assert "Traceback" not in result.output


def test_backend_keys_belong_to_their_backend(tmp_path, write_config):
    plugin_dir(tmp_path, echo=ECHO_BACKEND)
    path = write_config('[plugins]\ndirs = ["plugs"]\n'
                        '[models.parrot]\nbackend = "echo"\nprefix = "> "\nn_batch = 64\n'
                        '[models.big]\npath = "x.gguf"\nprefix = "!"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert (f"{path}: models.parrot.n_batch: unknown key for backend 'echo' "
            "(a key of backend 'llama_cpp')") in problems, problems
    assert (f"{path}: models.big.prefix: unknown key for backend 'llama_cpp' "
            "(a key of backend 'echo')") in problems, problems
    assert len(problems) == 2, problems


def test_a_backend_reads_its_own_keys(tmp_path, write_config):
    from sarai_router.backend import GenerationParams
    from sarai_router.engine import Engine

    plugin_dir(tmp_path, echo=ECHO_BACKEND)
    config = load_config(write_config('[plugins]\ndirs = ["plugs"]\n'
                                      '[models.parrot]\nbackend = "echo"\nprefix = "> "\n'))
    assert config.models["parrot"].prefix == "> "
    assert config.models["fast"].n_batch == 512  # a llama_cpp default, read the same way
    engine = Engine(config)
    try:
        completion = engine.complete(ChatRequest.from_prompt("hola loro"), GenerationParams(),
                                     model="parrot")
    finally:
        engine.close()
    assert completion.text == "> hola > loro "


# -- hooks see snapshots; wrappers are refused -------------------------------------------


@pytest.mark.models
def test_cache_hooks_get_frozen_snapshots(make_config, tmp_path):
    from sarai_router.engine import Engine

    seen = []

    class Spy:
        @staticmethod
        def model_expired(resident, now, cache):
            seen.append(resident)
            return None

    from sarai_router.hookspecs import hookimpl
    from sarai_router.plugins import build_plugins

    Spy.model_expired = staticmethod(hookimpl(Spy.model_expired))
    config = make_config(quality="ttl_seconds = 1000")
    engine = Engine(config, build_plugins(config, extra=[("spy", Spy)]))
    try:
        engine.pool.prewarm("quality").join()
        engine.pool.reap()
    finally:
        engine.close()
    assert seen and isinstance(seen[0], ResidentInfo)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        seen[0].last_used = 0.0  # type: ignore[misc]


def test_a_wrapper_implementation_is_refused_with_a_clear_message(tmp_path, make_config):
    plugin_dir(tmp_path, wrapping='''
from sarai_router import hookimpl


@hookimpl(wrapper=True)
def select_route(request):
    return (yield)
''')
    router = Router(make_config('[plugins]\ndirs = ["plugs"]\n'))
    assert "wrapping" not in router.plugins.sources
    failure = next(f for f in router.plugins.failures if f.name == "wrapping")
    assert "select_route as a hook wrapper" in failure.error
    assert route(router, SAD).plugin == "heuristic"


def test_every_error_shares_one_base():
    from sarai_router import backend, errors, fetch, pool, router

    for exc in (errors.ConfigError, router.RoutingError, pool.PoolError, pool.QueueFull,
                backend.BackendError, backend.ContextLengthError, fetch.FetchError,
                errors.CapabilityError, errors.PluginError):
        assert issubclass(exc, SaraiError), exc
