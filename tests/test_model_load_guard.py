"""The load guard (model_load_guard/) refuses and records every kind of model load: a GGUF in
this process or a child, the speech model, a llama-server child. Nothing is loaded here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_FILE, GUARD_DIR, load_guard


@pytest.fixture
def record(tmp_path, monkeypatch) -> Path:
    """This test's own record of forbidden loads (the conftest's stays empty)."""
    path = tmp_path / "loads.txt"
    path.write_text("", encoding="utf-8")
    monkeypatch.setenv(load_guard.ENV, str(path))
    return path


def test_a_gguf_through_llama_cpp_is_refused(record, models_dir):
    import llama_cpp

    with pytest.raises(ValueError, match="not marked `models`"):
        llama_cpp.Llama(model_path=str(models_dir / FAST_FILE), verbose=False)
    assert f"loaded llama_cpp.Llama({models_dir / FAST_FILE})" in record.read_text()


def test_a_gguf_through_the_backend_is_refused(record, config):
    from sarai_router.engine import Engine
    from sarai_router.errors import BackendError

    engine = Engine(config)
    try:
        with pytest.raises(BackendError, match="not marked `models`"):
            engine.pool.ensure_loaded("fast")
    finally:
        engine.close()
    assert "loaded model 'fast'" in record.read_text()


def test_a_child_process_is_guarded_too(record, models_dir):
    code = ("import llama_cpp, sys\n"
            f"llama_cpp.Llama(model_path={str(models_dir / FAST_FILE)!r}, verbose=False)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(GUARD_DIR)}, timeout=120)
    assert result.returncode != 0 and "not marked `models`" in result.stderr
    assert f"loaded llama_cpp.Llama({models_dir / FAST_FILE})" in record.read_text()


def test_the_speech_model_is_refused(record, config, tmp_path):
    from faster_whisper import WhisperModel

    from sarai_router.default_plugins import whisper
    from sarai_router.errors import TranscriptionUnavailable

    with pytest.raises(RuntimeError, match="not marked `models`"):
        WhisperModel(str(tmp_path))
    with pytest.raises(TranscriptionUnavailable, match="not marked `models`"):
        whisper.load_model(whisper.settings_of(config), config)
    lines = record.read_text().splitlines()
    assert any("faster_whisper.WhisperModel" in line for line in lines)
    assert any("used the speech model" in line for line in lines)


def test_a_llama_server_child_is_refused(record, tmp_path):
    from sarai_router.default_plugins.llama_server_process import ServerProcess
    from sarai_router.errors import BackendError

    server = ServerProcess("fast", [str(tmp_path / "llama-server")], port=9)
    with pytest.raises(BackendError, match="not marked `models`"):
        server.start(timeout=5)
    assert server.proc is None  # nothing was started
    assert "started llama-server for 'fast'" in record.read_text()
