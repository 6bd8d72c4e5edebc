"""The two GGUF backends, ``llama_cpp`` (in process) and ``llama_server`` (in child
processes), share one base: the same keys with the same checks, thread sharing, presence,
capabilities and RAM breakdown; each adds only what differs. No model is loaded here (the
RAM estimates read the real models' GGUF headers)."""

from __future__ import annotations

import attrs
import pytest

from sarai_router.config import ConfigError
from sarai_router.default_plugins.gguf_backend import GGUFBackend, GGUFSettings
from sarai_router.default_plugins.llama_cpp import LlamaCppBackend
from sarai_router.default_plugins.llama_server import LlamaServerBackend
from sarai_router.loading import load_config

BACKENDS = {"llama_cpp": LlamaCppBackend(), "llama_server": LlamaServerBackend()}
MB = 1024 * 1024


def _config(write_config, backend: str, lines: str = "", *, check_files: bool = False):
    return load_config(write_config(fast=f'backend = "{backend}"\n{lines}'),
                       check_files=check_files)


def _problems(write_config, backend: str, lines: str, *, check_files: bool = False) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(write_config, backend, lines, check_files=check_files)
    return str(caught.value)


@pytest.mark.parametrize("name", BACKENDS)
def test_both_take_the_shared_keys_through_one_base(name):
    backend = BACKENDS[name]
    assert isinstance(backend, GGUFBackend)
    assert issubclass(backend.settings_class, GGUFSettings)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_negative_thread_count_is_refused_alike(write_config, name):
    assert "models.fast.n_threads: must be >= 0 (0 = all cores)" in _problems(
        write_config, name, "n_threads = -1")


@pytest.mark.parametrize("name", BACKENDS)
def test_threads_are_shared_out_only_when_left_automatic(write_config, name):
    backend = BACKENDS[name]
    automatic = _config(write_config, name).models["fast"]
    assert backend.uses_threads(automatic)
    assert backend.with_threads(automatic, 3).settings.n_threads == 3
    fixed = _config(write_config, name, "n_threads = 5").models["fast"]
    assert backend.with_threads(fixed, 3).settings.n_threads == 5


def test_a_projector_is_needed_for_what_each_backend_takes_through_it(write_config):
    in_process = _problems(write_config, "llama_cpp", 'modalities = ["text", "image", "audio"]',
                           check_files=True)
    assert ("models.fast.mmproj: a model that takes image input needs its multimodal "
            "projector (mmproj)") in in_process
    assert "models.fast.modalities: the llama_cpp backend cannot take audio input" in in_process
    served = _problems(write_config, "llama_server", 'modalities = ["text", "image", "audio"]',
                       check_files=True)
    for modality in ("image", "audio"):
        assert (f"models.fast.mmproj: a model that takes {modality} input needs its "
                "multimodal projector (mmproj)") in served
    assert "cannot take" not in served


@pytest.mark.parametrize("name", BACKENDS)
def test_a_missing_projector_file_is_named(write_config, tmp_path, name):
    problems = _problems(write_config, name,
                         f'mmproj = "{(tmp_path / "gone.gguf").as_posix()}"', check_files=True)
    assert f"models.fast.mmproj: file not found: {(tmp_path / 'gone.gguf').as_posix()}" in problems


@pytest.mark.parametrize("name", BACKENDS)
def test_the_ram_estimate_counts_the_projector(write_config, tmp_path, name):
    backend = BACKENDS[name]
    projector = tmp_path / "mmproj.gguf"
    with open(projector, "wb") as handle:
        handle.truncate(30 * MB)  # its size is what counts, not its content
    plain = _config(write_config, name).models["fast"]
    with_projector = _config(write_config, name,
                             f'mmproj = "{projector.as_posix()}"').models["fast"]
    assert backend.estimate_ram_mb(plain) > 50
    assert backend.estimate_ram_mb(with_projector) == pytest.approx(
        backend.estimate_ram_mb(plain) + 30, abs=0.01)
    described = backend.describe(with_projector)["estimated_ram"]
    assert described["mmproj_mb"] == 30.0
    assert sum(described.values()) == pytest.approx(backend.estimate_ram_mb(with_projector),
                                                    abs=0.5)


def test_each_llama_server_replica_counts_in_the_ram_estimate(write_config):
    backend = BACKENDS["llama_server"]
    one = _config(write_config, "llama_server").models["fast"]
    three = _config(write_config, "llama_server", "replicas = 3").models["fast"]
    assert backend.estimate_ram_mb(three) == pytest.approx(3 * backend.estimate_ram_mb(one))
    # Threads: every core for the model, shared by its replicas.
    fixed = _config(write_config, "llama_server", "replicas = 3\nn_threads = 6").models["fast"]
    assert backend.describe(fixed)["n_threads"] == 2


@pytest.mark.parametrize("name", BACKENDS)
def test_presence_and_capabilities_are_alike(write_config, tmp_path, name):
    backend = BACKENDS[name]
    spec = _config(write_config, name).models["fast"]
    assert backend.presence(spec).present
    gone = backend.presence(attrs.evolve(spec, path=str(tmp_path / "gone.gguf")))
    assert not gone.present and "file not found" in gone.detail
    capabilities = backend.capabilities(spec)
    assert capabilities.tools and capabilities.json_schema and capabilities.logprobs
    assert capabilities.context_length == spec.n_ctx
