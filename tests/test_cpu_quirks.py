"""CPU-specific workarounds in the GGUF backends: llama.cpp's AMX kernels crash the process
at the first decode of the default models (seen here on a Sapphire Rapids machine), so
weight repacking is off on CPUs with AMX unless a model's `repack` says otherwise."""

from __future__ import annotations

import pytest

from sarai_router.default_plugins import gguf_backend
from sarai_router.default_plugins import llama_cpp as llama_cpp_backend
from sarai_router.default_plugins.gguf_backend import cpu_has_amx, repack_weights
from sarai_router.default_plugins.llama_server import server_argv

AMX_FLAGS = "flags\t\t: fpu vme avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
PLAIN_FLAGS = "flags\t\t: fpu vme avx2 avx512f avx512_vnni\n"


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    for text, expected in ((AMX_FLAGS, True), (PLAIN_FLAGS, False)):
        info = tmp_path / "cpuinfo"
        info.write_text("processor\t: 0\nmodel name\t: Xeon\n" + text, encoding="utf-8")
        assert cpu_has_amx(str(info)) is expected
    assert cpu_has_amx(str(tmp_path / "missing")) is False


def test_repack_follows_the_setting_and_defaults_to_off_only_with_amx(monkeypatch):
    assert repack_weights(True) is True and repack_weights(False) is False
    monkeypatch.setattr(gguf_backend, "cpu_has_amx", lambda: True)
    assert repack_weights(None) is False
    monkeypatch.setattr(gguf_backend, "cpu_has_amx", lambda: False)
    assert repack_weights(None) is True


def _server_spec(make_config, repack: str):
    config = make_config(fast=f'backend = "llama_server"\n{repack}')
    return config.models["fast"]


@pytest.mark.parametrize("line, flag", [("repack = true", "--repack"),
                                        ("repack = false", "--no-repack")])
def test_llama_server_gets_the_repack_flag(make_config, line, flag):
    argv = server_argv(_server_spec(make_config, line), "llama-server", 8080)
    assert flag in argv
    assert argv.count("--repack") + argv.count("--no-repack") == 1


@pytest.mark.models
def test_a_loaded_model_repacks_only_where_it_is_safe(make_config):
    config = make_config()
    backend = llama_cpp_backend.LlamaCppBackend()
    model = backend.load(config.models["quality"])
    try:
        assert model.llama.model_params.use_extra_bufts is (not cpu_has_amx())
        # The quality model crashed here at its first decode on an AMX CPU with repacking on.
        answer = model.llama.create_chat_completion(
            messages=[{"role": "user", "content": "hola"}], max_tokens=4)
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        model.close()
