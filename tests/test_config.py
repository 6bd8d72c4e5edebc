"""Config: TOML -> frozen attrs; every problem reported at once with file and key path."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from sarai_router.config import BUILTIN_CONFIG_LABEL, ConfigError
from sarai_router.loading import load_config, parse_config


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value.problems


def test_base_config_loads_with_resolved_paths(config, fast_path, quality_path):
    assert config.models["fast"].path == str(fast_path)
    assert config.models["quality"].path == str(quality_path)
    assert config.models["fast"].name == "fast"
    assert config.models["fast"].pinned and not config.models["quality"].pinned
    assert config.models["quality"].chat_format == "gemma"
    assert config.plugin_config("heuristic")["empathy_threshold"] == 0.8
    assert config.ttl_for(config.models["quality"]) == 60


def test_config_is_frozen(config):
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.cache.max_loaded = 5


def test_builtin_default_config_describes_the_two_default_models(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./sarai.toml here
    config = load_config(None)
    assert config.source == BUILTIN_CONFIG_LABEL
    fast, quality = config.models["fast"], config.models["quality"]
    assert Path(fast.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(quality.path).name == "gemma-3-270m-q4_k_m.gguf"
    assert fast.pinned and not quality.pinned
    assert (fast.n_ctx, fast.max_tokens, quality.n_ctx, quality.max_tokens) == (2048, 512, 8192, 2048)
    assert quality.chat_format == "gemma"
    assert fast.modalities == ("text",) and quality.modalities == ("text",)
    assert (config.cache.ttl_seconds, config.cache.max_loaded, config.cache.ram_budget_mb) == (60, 2, 12288)


def test_repo_config_mirrors_the_builtin_one():
    from sarai_router.config import builtin_config_text

    repo_file = Path(__file__).resolve().parents[1] / "config" / "sarai.toml"
    from_repo = parse_config(repo_file.read_text(encoding="utf-8"), source="repo", base_dir=None)
    builtin = parse_config(builtin_config_text(), source="repo", base_dir=None)
    assert from_repo == builtin


def test_config_discovery_order(monkeypatch, tmp_path, write_config):
    explicit = write_config(name="explicit.toml")
    from_env = write_config(name="env.toml")
    local = write_config(name="sarai.toml")
    monkeypatch.chdir(tmp_path)
    assert Path(load_config(None).source).resolve() == local.resolve()
    monkeypatch.setenv("SARAI_ROUTER_CONFIG", str(from_env))
    assert load_config(None).source == str(from_env)
    assert load_config(explicit).source == str(explicit)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, fast_path):
    folder = tmp_path / "conf"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "m.gguf").symlink_to(fast_path)
    (folder / "plugs").mkdir()
    path = folder / "c.toml"
    path.write_text('[routing]\ndefault_model = "m"\n[routing.heuristic]\n'
                    'conversation_model = "m"\nmultimodal_model = "m"\n'
                    '[plugins]\ndirs = ["plugs"]\n[models.m]\npath = "weights/m.gguf"\n')
    config = load_config(path, check_files=True)
    assert config.models["m"].path == str(folder / "weights" / "m.gguf")
    assert config.plugins.dirs == (str(folder / "plugs"),)


def test_models_dir_env_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_MODELS_DIR", str(tmp_path / "from-env"))
    monkeypatch.chdir(tmp_path)
    builtin = load_config(None)
    assert builtin.models_dir == str(tmp_path / "from-env")
    assert builtin.models["fast"].path.startswith(str(tmp_path / "from-env"))
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nmodels_dir = "mine"\n[routing]\ndefault_model = "a"\n'
                    '[routing.heuristic]\nconversation_model = "a"\nmultimodal_model = "a"\n'
                    '[models.a]\npath = "{models_dir}/a.gguf"\n')
    config = load_config(path)
    assert config.models["a"].path == str(tmp_path / "mine" / "a.gguf")


def test_every_problem_reported_at_once_with_file_and_key_path(write_config):
    path = write_config(
        """
        [server]
        colour = "blue"

        [models.broken]
        path = "/nowhere/missing.gguf"
        n_ctx = "big"
        """,
        routing='default_model = "nonexistent"',
        cache='max_loaded = "two"',
    )
    problems = problems_of(path, check_files=True)
    text = "\n".join(problems)
    assert all(p.startswith(f"{path}: ") for p in problems), text
    assert any("server.colour: unknown key" in p for p in problems), text
    assert any("cache.max_loaded:" in p and "int" in p for p in problems), text
    assert any("models.broken.n_ctx:" in p and "int" in p for p in problems), text
    assert any("routing.default_model:" in p and "'nonexistent'" in p and "not configured" in p
               for p in problems), text
    assert any("models.broken.path:" in p and "/nowhere/missing.gguf" in p for p in problems), text
    assert len(problems) == 5, text


@pytest.mark.parametrize(
    ("table", "line", "key"),
    [
        ("fast", 'pinned = "false"', "models.fast.pinned"),
        ("fast", "n_batch = 512.5", "models.fast.n_batch"),
        ("fast", 'modalities = "text"', "models.fast.modalities"),
        ("cache", 'max_loaded = "2"\nttl_seconds = 60', "cache.max_loaded"),
        ("cache", "ttl_seconds = true\nmax_loaded = 2", "cache.ttl_seconds"),
    ],
)
def test_wrong_types_are_errors_not_coerced(write_config, table, line, key):
    # cattrs would otherwise turn "false" into True and "text" into ('t', 'e', 'x', 't').
    problems = problems_of(write_config(**{table: line}))
    assert any(p.split(": ", 2)[1] == key for p in problems), problems


def test_plugins_disable_must_be_a_list(write_config):
    problems = problems_of(write_config('[plugins]\ndisable = "heuristic"\n'))
    assert any("plugins.disable" in p for p in problems), problems


def test_routes_to_unconfigured_models_are_errors(write_config):
    path = write_config('[routing.heuristic]\nconversation_model = "chat"\nmultimodal_model = "vision"\n')
    problems = problems_of(path)
    assert any("routing.heuristic.conversation_model" in p and "'chat'" in p for p in problems)
    assert any("routing.heuristic.multimodal_model" in p and "'vision'" in p for p in problems)
    assert any("configured: fast, quality" in p for p in problems)


def test_missing_model_file_only_checked_when_asked(write_config):
    path = write_config('[models.ghost]\npath = "ghost.gguf"\n')
    assert "ghost" in load_config(path).models  # routing and `route` don't need files
    problems = problems_of(path, check_files=True)
    assert problems == [f"{path}: models.ghost.path: model file not found: {path.parent / 'ghost.gguf'}"]


def test_value_ranges_and_modalities(write_config):
    path = write_config(
        '[routing.heuristic]\nempathy_threshold = 1.5\n',
        cache="max_loaded = 0",
        quality='modalities = ["image", "smell"]',
    )
    problems = "\n".join(problems_of(path))
    assert "routing.heuristic.empathy_threshold" in problems
    assert "cache.max_loaded" in problems
    assert "models.quality.modalities: unknown modality 'smell'" in problems
    assert "models.quality.modalities: must include 'text'" in problems
    # 0 < 1 pinned model is reported too
    assert "fewer than the 1 pinned models" in problems


def test_not_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[routing\n")
    [problem] = problems_of(bad)
    assert problem.startswith(f"{bad}: not valid TOML")
    [problem] = problems_of(tmp_path / "absent.toml")
    assert problem == f"{tmp_path / 'absent.toml'}: file not found"


def test_per_model_ttl_overrides_cache_ttl(make_config):
    config = make_config(quality="ttl_seconds = 5")
    assert config.ttl_for(config.models["quality"]) == 5
    assert config.ttl_for(config.models["fast"]) == 60


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "sarai.toml"
    path.write_bytes(b"\xd0\xcf\x11\xe0 binary")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: not a UTF-8 text file (byte 0); a config is TOML text"]


def test_nan_and_inf_are_errors(write_config):
    path = write_config(cache="ttl_seconds = nan\nreap_interval_seconds = inf")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: cache.ttl_seconds: must be a finite number, got nan" in info.value.problems
    assert any("cache.reap_interval_seconds" in p and "inf" in p for p in info.value.problems)


def test_checked_files_must_be_gguf_and_plugin_dirs_must_exist(write_config, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    path = write_config(f'[models.x]\npath = "{fake.as_posix()}"\n[plugins]\ndirs = ["nowhere"]\n')
    load_config(path)  # only `config check` (check_files) reads the files
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=True)
    assert any(p.startswith(f"{path}: models.x.path: not a readable GGUF file")
               for p in info.value.problems), info.value.problems
    assert f"{path}: plugins.dirs[0]: not a directory: {tmp_path / 'nowhere'}" in info.value.problems


def _gguf_string(text: str) -> bytes:
    return len(text).to_bytes(8, "little") + text.encode()


@pytest.mark.parametrize("name, data", [
    ("counts past the file", b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16),
    ("a string length past any offset", b"GGUF" + (3).to_bytes(4, "little")
     + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + (2**63 + 5).to_bytes(8, "little")),
    ("an array longer than the file", b"GGUF" + (3).to_bytes(4, "little")
     + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + _gguf_string("general.x")
     + (9).to_bytes(4, "little") + (8).to_bytes(4, "little") + (2**40).to_bytes(8, "little")),
    ("a number field holding a string", b"GGUF" + (3).to_bytes(4, "little")
     + (0).to_bytes(8, "little") + (2).to_bytes(8, "little")
     + _gguf_string("general.architecture") + (8).to_bytes(4, "little") + _gguf_string("llama")
     + _gguf_string("llama.block_count") + (8).to_bytes(4, "little") + _gguf_string("many")),
])
def test_a_junk_gguf_header_is_a_gguf_error(tmp_path, name, data):
    """A valid magic and a junk header: a clear GGUFError, never OverflowError & co."""
    from sarai_router.default_plugins.gguf_info import GGUFError, read_info

    path = tmp_path / "junk.gguf"
    path.write_bytes(data + b"\0" * 64)
    with pytest.raises(GGUFError, match="GGUF"):
        read_info(path)
