"""Finding and building llama.cpp's llama-server (``default_plugins.llama_server_install``).

Tests that need the binary use the real build: the session fixture calls
``build_llama_server()``, which builds it from the llama-cpp-python sdist on first use (a
few minutes) and returns the cached copy after that. Nothing here is skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest

from sarai_router.default_plugins import llama_server_install as lsi
from sarai_router.default_plugins.gguf_backend import repack_weights
from sarai_router.default_plugins.llama_server_install import (
    BuildToolMissing,
    LlamaServerBuildError,
    LlamaServerNotFound,
    build_llama_server,
    cache_dir,
    cached_llama_server,
    find_llama_server,
    installed_llama_cpp_version,
)
from sarai_router.testing import free_port as _free_port

FAST_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def built_server() -> Path:
    """The real llama-server for the installed llama-cpp-python: built once, then cached."""
    return build_llama_server(report=_stderr)


@pytest.fixture(autouse=True)
def _no_binary_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own llama-server setting must not decide what these tests find."""
    monkeypatch.delenv(lsi.BINARY_ENV, raising=False)


def _program(folder: Path, name: str = "llama-server", mode: int = 0o755) -> Path:
    """A real executable file: a shell script that says which one it is."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho {folder.name}\n")
    path.chmod(mode)
    return path


def _copy_build(source_binary: Path, cache_root: Path) -> Path:
    """A copy of the real cached build folder under another cache root."""
    version_folder = cache_root / "llama-server" / installed_llama_cpp_version()
    shutil.copytree(source_binary.parent, version_folder)
    return version_folder / "llama-server"


# -- where the cache is ------------------------------------------------------------------------


def test_cache_dir_follows_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine" / "llama-server"
    monkeypatch.delenv("SARAI_ROUTER_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "sarai-router" / "llama-server"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sarai-router" / "llama-server"


def test_installed_version_matches_the_llama_cpp_package_source():
    # Read the package's own __version__ line without importing llama_cpp (it loads the library).
    init = Path(find_spec("llama_cpp").origin).read_text(encoding="utf-8")
    source_version = re.search(r'__version__\s*=\s*"([^"]+)"', init).group(1)
    assert installed_llama_cpp_version() == source_version


# -- find order --------------------------------------------------------------------------------


def test_explicit_beats_env_beats_path(monkeypatch, tmp_path):
    explicit = _program(tmp_path / "explicit")
    from_env = _program(tmp_path / "env")
    on_path = _program(tmp_path / "path")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setenv(lsi.BINARY_ENV, str(from_env))
    assert find_llama_server(str(explicit)) == explicit
    assert find_llama_server() == from_env
    monkeypatch.delenv(lsi.BINARY_ENV)
    assert find_llama_server() == on_path
    # The found program is the real file: running it answers with its folder's name.
    assert subprocess.run([find_llama_server()], capture_output=True, text=True).stdout == "path\n"


def test_a_bare_name_is_looked_up_on_path(monkeypatch, tmp_path):
    custom = _program(tmp_path / "bin", name="my-llama-server")
    monkeypatch.setenv("PATH", str(custom.parent))
    assert find_llama_server("my-llama-server") == custom


@pytest.mark.llama_server
def test_path_beats_the_cache_and_the_cache_is_last(monkeypatch, tmp_path, built_server):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(built_server.parents[2]))
    assert cache_dir() == built_server.parents[1]
    on_path = _program(tmp_path / "path")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_llama_server() == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_server() == built_server


def test_nothing_anywhere_finds_none(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_server() is None


# -- clear errors ------------------------------------------------------------------------------


def test_missing_explicit_path_is_an_error_naming_it_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(_program(tmp_path / "path").parent))  # not a fallback
    missing = tmp_path / "nowhere" / "llama-server"
    with pytest.raises(LlamaServerNotFound) as caught:
        find_llama_server(str(missing))
    message = str(caught.value)
    assert f"binary = '{missing}'" in message
    assert "no such file" in message
    assert "sarai-router engines install" in message


def test_non_executable_explicit_path_says_chmod(tmp_path):
    plain = _program(tmp_path / "plain", mode=0o644)
    with pytest.raises(LlamaServerNotFound, match=rf"not executable; run `chmod \+x {plain}`"):
        find_llama_server(str(plain))


def test_a_directory_is_not_a_binary(tmp_path):
    with pytest.raises(LlamaServerNotFound, match="not a file"):
        find_llama_server(str(tmp_path))


def test_env_var_to_a_missing_file_names_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(_program(tmp_path / "path").parent))
    monkeypatch.setenv(lsi.BINARY_ENV, str(tmp_path / "gone"))
    with pytest.raises(LlamaServerNotFound, match=r"\$SARAI_ROUTER_LLAMA_SERVER = .*gone.*no such file"):
        find_llama_server()


def test_bare_name_not_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LlamaServerNotFound, match="no program of that name on PATH"):
        find_llama_server("llama-server-typo")


# -- the real build ----------------------------------------------------------------------------


@pytest.mark.llama_server
def test_built_binary_runs_and_matches_its_record(built_server):
    manifest = json.loads((built_server.parent / "build.json").read_text())
    assert manifest["llama_cpp_python"] == installed_llama_cpp_version()
    assert built_server.parent.name == installed_llama_cpp_version()
    assert "-DBUILD_SHARED_LIBS=OFF" in manifest["cmake_args"]
    result = subprocess.run([built_server, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert (result.stdout + result.stderr).strip() == manifest["version_output"]
    assert "version:" in manifest["version_output"]


@pytest.mark.llama_server
def test_second_call_returns_the_cached_build_without_rebuilding(built_server):
    before = built_server.stat()
    manifest_before = (built_server.parent / "build.json").read_text()
    messages: list[str] = []
    again = build_llama_server(report=messages.append)
    assert again == built_server
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (built_server.parent / "build.json").read_text() == manifest_before
    assert messages == [f"llama-server for llama-cpp-python {installed_llama_cpp_version()} "
                        f"is cached: {built_server}"]


@pytest.mark.llama_server
def test_built_binary_stands_alone(built_server, tmp_path):
    """Static build: no llama/ggml shared library, nothing unresolved, runs from anywhere."""
    ldd = subprocess.run(["ldd", built_server], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd
    assert not re.search(r"lib(llama|ggml|mtmd)", ldd), ldd
    moved = tmp_path / "elsewhere" / "llama-server"
    moved.parent.mkdir()
    shutil.copy2(built_server, moved)
    result = subprocess.run([moved, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "version:" in result.stderr + result.stdout


@pytest.mark.llama_server
def test_a_waiting_caller_takes_the_build_the_lock_holder_made(monkeypatch, tmp_path,
                                                               built_server):
    """Two callers: the second waits on the lock, then finds the first one's build."""
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path))
    root = cache_dir()
    root.mkdir(parents=True)
    waiting = threading.Event()
    messages: list[str] = []
    outcome: list[object] = []

    def report(message: str) -> None:
        messages.append(message)
        if "waiting" in message:
            waiting.set()

    def second_caller() -> None:
        try:
            outcome.append(build_llama_server(report=report))
        except Exception as error:  # handed to the test thread below
            outcome.append(error)

    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first caller, mid-build
        caller = threading.Thread(target=second_caller)
        caller.start()
        assert waiting.wait(timeout=120), messages
        finished = _copy_build(built_server, tmp_path)  # the first caller's finished build
        fcntl.flock(lock, fcntl.LOCK_UN)
    caller.join(timeout=120)
    assert outcome == [finished]
    assert not any("downloading" in m or "compiling" in m for m in messages), messages


@pytest.mark.llama_server
def test_a_build_made_for_another_cpu_is_not_used(monkeypatch, tmp_path, built_server):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    copied = _copy_build(built_server, tmp_path)
    version = installed_llama_cpp_version()
    assert cached_llama_server(version) == copied
    manifest_path = copied.parent / "build.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cpu"] = "x86_64-0000000000000000"  # as if restored from another machine's cache
    manifest_path.write_text(json.dumps(manifest))
    assert cached_llama_server(version) is None
    assert find_llama_server() is None


@pytest.mark.llama_server
@pytest.mark.models
def test_the_built_binary_serves_chat_with_the_fast_model(built_server, models_dir):
    port = _free_port()
    process = subprocess.Popen(
        [built_server, "-m", models_dir / FAST_FILE, "--host", "127.0.0.1", "--port", str(port),
         "-c", "1024", "--parallel", "2", "-t", "2",
         # llama.cpp's AMX kernels crash in decode; the backends pass this too
         *([] if repack_weights(None) else ["--no-repack"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(port, process)
        body = json.dumps({"messages": [{"role": "user", "content": "Say hi"}],
                           "max_tokens": 8}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["object"] == "chat.completion"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert 0 < answer["usage"]["completion_tokens"] <= 8
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_healthy(port: int, process: subprocess.Popen, deadline_seconds: float = 120) -> None:
    """Poll /health until 200 (503 while the model loads); fail if the server exits."""
    give_up = time.monotonic() + deadline_seconds
    while time.monotonic() < give_up:
        assert process.poll() is None, f"llama-server exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"llama-server on port {port} not healthy after {deadline_seconds} s")


# -- build errors (faults forced through the environment; nothing is downloaded) -------------


def test_missing_compiler_is_named_before_any_download(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(BuildToolMissing) as caught:
        build_llama_server(version="0.0.0")
    message = str(caught.value)
    assert "$CXX" in message and "no-such-g++" in message
    assert "apt-get install g++" in message
    assert not (tmp_path / "llama-server").exists()


def test_no_compiler_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BuildToolMissing, match=r"no C compiler found \(tried cc, gcc, clang\)"):
        build_llama_server(version="0.0.0")


@pytest.mark.network  # pip download
def test_a_version_missing_from_the_index_fails_with_pips_message(monkeypatch, tmp_path):
    monkeypatch.setenv("SARAI_ROUTER_CACHE_DIR", str(tmp_path))
    with pytest.raises(LlamaServerBuildError) as caught:
        build_llama_server(version="0.0.0.dev1")
    message = str(caught.value)
    assert "`pip download llama-cpp-python==0.0.0.dev1` failed" in message
    assert "No matching distribution" in message
    # The work folder is gone; nothing half-made is left in the cache.
    assert not list((tmp_path / "llama-server").glob(".build-*"))
    assert not (tmp_path / "llama-server" / "0.0.0.dev1").exists()


@pytest.mark.network  # pip download
def test_cmake_and_ninja_come_from_the_index_when_the_system_has_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    root = tmp_path / "cache"
    root.mkdir()
    messages: list[str] = []
    cmake, ninja = lsi._find_build_tools(root, messages.append)
    if lsi._script_in_env("cmake") is None:  # else this environment's pip cmake is used
        assert cmake == str(root / "tools" / "cmake" / "data" / "bin" / "cmake")
        assert any("installing the cmake and ninja wheels" in m for m in messages)
    if lsi._script_in_env("ninja") is None:
        assert ninja == str(root / "tools" / "bin" / "ninja")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True)
    assert lsi._cmake_version(cmake) >= lsi.MIN_CMAKE, version.stdout
    assert subprocess.run([ninja, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()
    # Installed once: the next build finds them in the cache without pip.
    messages.clear()
    assert lsi._find_build_tools(root, messages.append) == (cmake, ninja)
    assert messages == []


# -- command line ------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sarai_router.default_plugins.llama_server_install", *args],
        capture_output=True, text=True, env=env)


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != lsi.BINARY_ENV}
    env.update(changes)
    return env


def test_cli_print_with_nothing_found_exits_1(tmp_path):
    result = _cli("--print", env=_env(SARAI_ROUTER_CACHE_DIR=str(tmp_path),
                                      PATH=str(tmp_path / "empty")))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no llama-server" in result.stderr
    assert "sarai-router engines install" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_env_var_is_a_clean_error(tmp_path):
    result = _cli("--print", env=_env(SARAI_ROUTER_LLAMA_SERVER=str(tmp_path / "gone")))
    assert result.returncode == 1
    assert result.stderr.startswith("error: $SARAI_ROUTER_LLAMA_SERVER = ")
    assert "Traceback" not in result.stderr


@pytest.mark.llama_server
def test_cli_prints_the_cached_build(built_server, tmp_path):
    env = _env(SARAI_ROUTER_CACHE_DIR=str(built_server.parents[2]),
               PATH=str(tmp_path / "empty"))
    for args in ((), ("--print",)):
        result = _cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{built_server}\n"
