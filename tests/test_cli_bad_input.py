"""Bad command lines, run as real ``sarai-router`` subprocesses: each one must end with a
non-zero exit and a message saying what is wrong, never a traceback.

None of these loads a model for long: every mistake is caught before the answer starts
(the one that needs a model file finds it broken). Running as root, a file cannot be made
unreadable by its mode, so "unreadable" here is what the kernel refuses to read
(``/proc/self/mem`` at offset 0) or a directory where a file is expected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_toml

#: Some cases get as far as a model load (a junk GGUF, a directory), and chat loads fast.
pytestmark = pytest.mark.models

SAR = str(Path(sys.executable).with_name("sarai-router"))
BAD = b"\xff\xfe"
#: An argument as Python gets it from bytes that are not UTF-8 (surrogateescape).
BAD_TEXT = os.fsdecode(BAD + b" hola")
UNREADABLE = "/proc/self/mem"


@pytest.fixture(scope="module")
def files(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("badcli")
    good = folder / "sarai.toml"
    good.write_text(base_toml(models_dir), encoding="utf-8")
    (folder / "not-utf8.toml").write_bytes(b"\xff\xfe[routing]\n")
    (folder / "not-toml.toml").write_text("[routing\ndefault_model = ", encoding="utf-8")
    (folder / "empty.toml").write_text("", encoding="utf-8")
    (folder / "wrong-types.toml").write_text(
        base_toml(models_dir, cache='ttl_seconds = "soon"\nmax_loaded = -1'), encoding="utf-8")
    (folder / "mix.jsonl").write_bytes(b"\xff\xfe not json\n")
    (folder / "junk.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    (folder / "text.gguf").write_text("not a model at all", encoding="utf-8")
    (folder / "junk-model.toml").write_text(
        base_toml(models_dir) + f'\n[models.junk]\npath = "{(folder / "junk.gguf").as_posix()}"\n',
        encoding="utf-8")
    (folder / "dir-model.toml").write_text(
        base_toml(models_dir) + f'\n[models.dir]\npath = "{folder.as_posix()}"\n',
        encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def cases(f: Path) -> list[tuple[str, list, dict, bytes]]:
    """(id, argv, extra env, stdin)."""
    good = str(f / "sarai.toml")
    g = ["--config", good]
    return [
        ("query-non-utf8-prompt", [*g, "query", BAD_TEXT], {}, b""),
        ("route-non-utf8-prompt", [*g, "route", BAD_TEXT], {}, b""),
        ("query-json-non-utf8-prompt", [*g, "query", "--json", BAD_TEXT], {}, b""),
        ("query-non-utf8-model", [*g, "query", "--model", os.fsdecode(BAD), "hola"], {}, b""),
        ("query-empty-prompt", [*g, "query", ""], {}, b""),
        ("query-blank-prompt", [*g, "query", "   \n\t"], {}, b""),
        ("query-unknown-model", [*g, "query", "--model", "nope", "hola"], {}, b""),
        ("query-max-tokens-0", [*g, "query", "--max-tokens", "0", "hola"], {}, b""),
        ("query-max-tokens-word", [*g, "query", "--max-tokens", "many", "hola"], {}, b""),
        ("query-negative-temperature", [*g, "query", "--temperature", "-1", "hola"], {}, b""),
        ("query-seed-word", [*g, "query", "--seed", "x", "hola"], {}, b""),
        ("route-image-is-a-directory", [*g, "route", "--image", str(f), "hola"], {}, b""),
        ("route-image-missing", [*g, "route", "--image", str(f / "nope.png"), "hola"], {}, b""),
        ("route-image-unreadable", [*g, "route", "--image", UNREADABLE, "hola"], {}, b""),
        ("route-audio-is-a-directory", [*g, "route", "--audio", str(f), "hola"], {}, b""),
        ("query-image-on-text-models", [*g, "query", "--image", str(f / "image.png"), "hola"],
         {}, b""),
        ("config-is-a-directory", ["--config", str(f), "route", "hola"], {}, b""),
        ("config-missing", ["--config", str(f / "nope.toml"), "route", "hola"], {}, b""),
        ("config-non-utf8-name", ["--config", os.fsdecode(bytes(f / "x") + BAD), "route", "hi"],
         {}, b""),
        ("config-unreadable", ["--config", UNREADABLE, "route", "hola"], {}, b""),
        ("config-not-utf8", ["--config", str(f / "not-utf8.toml"), "route", "hola"], {}, b""),
        ("config-not-toml", ["--config", str(f / "not-toml.toml"), "route", "hola"], {}, b""),
        ("config-empty", ["--config", str(f / "empty.toml"), "route", "hola"], {}, b""),
        ("config-wrong-types", ["--config", str(f / "wrong-types.toml"), "route", "hi"], {}, b""),
        ("config-is-a-gguf", ["--config", str(f / "junk.gguf"), "route", "hola"], {}, b""),
        ("env-config-is-a-directory", ["route", "hola"], {"SARAI_ROUTER_CONFIG": str(f)}, b""),
        ("env-config-non-utf8", ["route", "hola"],
         {"SARAI_ROUTER_CONFIG": os.fsdecode(b"/tmp/" + BAD)}, b""),
        ("config-check-directory", ["config", "check", str(f)], {}, b""),
        ("config-check-missing", ["config", "check", str(f / "nope.toml")], {}, b""),
        ("config-check-unreadable", ["config", "check", UNREADABLE], {}, b""),
        ("config-check-junk-gguf-model", ["config", "check", str(f / "junk-model.toml")], {}, b""),
        ("config-check-directory-model", ["config", "check", str(f / "dir-model.toml")], {}, b""),
        ("query-junk-gguf-model", ["--config", str(f / "junk-model.toml"), "query", "--model",
                                   "junk", "hola"], {}, b""),
        ("query-directory-model", ["--config", str(f / "dir-model.toml"), "query", "--model",
                                   "dir", "hola"], {}, b""),
        ("models-pull-non-utf8", [*g, "models", "pull", os.fsdecode(BAD)], {}, b""),
        ("models-pull-unknown", [*g, "models", "pull", "nope"], {}, b""),
        ("unknown-command", [*g, "fly"], {}, b""),
        ("unknown-option", [*g, "route", "--loud", "hola"], {}, b""),
        ("missing-prompt", [*g, "query"], {}, b""),
        ("bench-zero-iterations", [*g, "bench", "--iterations", "0"], {}, b""),
        ("bench-mix-directory", [*g, "bench", "--mix", str(f)], {}, b""),
        ("bench-mix-not-utf8", [*g, "bench", "--mix", str(f / "mix.jsonl"), "--no-overhead"],
         {}, b""),
        ("bench-bad-target-range", [*g, "bench", "--target-tps", "fast"], {}, b""),
        ("bench-non-utf8-query", [*g, "bench", "--query", BAD_TEXT], {}, b""),
        ("serve-port-0", [*g, "serve", "--port", "0"], {}, b""),
        ("serve-port-too-big", [*g, "serve", "--port", "70000"], {}, b""),
        ("serve-non-utf8-host", [*g, "serve", "--host", os.fsdecode(BAD)], {}, b""),
        ("serve-unresolvable-host", [*g, "serve", "--host", "no.such.host.invalid"], {}, b""),
        ("serve-non-utf8-api-key", [*g, "serve", "--api-key", os.fsdecode(BAD)], {}, b""),
        ("chat-non-utf8-system", [*g, "chat", "--system", BAD_TEXT], {}, b""),
        ("query-audio-on-llama-cpp", [*g, "query", "--audio", str(f / "image.png"), "hola"],
         {}, b""),
        ("config-show-wrong-types", ["--config", str(f / "wrong-types.toml"), "config", "show"],
         {}, b""),
        # a running server's residency: nothing listens on port 1
        ("models-ps-no-server", [*g, "models", "ps", "--server", "http://127.0.0.1:1"], {},
         b""),
        ("models-ps-not-a-url", [*g, "models", "ps", "--server", "localhost:8000"], {}, b""),
        ("models-ps-broken-url", [*g, "models", "ps", "--server", "http://[::1"], {}, b""),
        ("models-ps-port-too-big", [*g, "models", "ps", "--server", "http://127.0.0.1:99999"],
         {}, b""),
        ("models-ps-non-utf8-server", [*g, "models", "ps", "--server", os.fsdecode(BAD)], {},
         b""),
        ("models-ps-non-utf8-api-key", [*g, "models", "ps", "--api-key", os.fsdecode(BAD)],
         {}, b""),
        ("models-load-without-a-name", [*g, "models", "load"], {}, b""),
        ("models-load-non-utf8-name", [*g, "models", "load", os.fsdecode(BAD), "--server",
                                       "http://127.0.0.1:1"], {}, b""),
        ("models-unload-negative-wait", [*g, "models", "unload", "quality", "--wait", "-1"],
         {}, b""),
        ("models-unload-no-server", [*g, "models", "unload", "quality", "--server",
                                     "http://127.0.0.1:1"], {}, b""),
    ]


@pytest.mark.models  # one of the lines loads a junk GGUF, which must fail cleanly
def test_bad_command_lines_fail_cleanly(files):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SARAI_ROUTER_CONFIG", "SARAI_ROUTER_NO_PLUGINS")}
    all_cases = cases(files)
    assert len(all_cases) >= 30
    failures = []
    for case_id, argv, extra_env, stdin in all_cases:
        result = subprocess.run([SAR, *argv], input=stdin, capture_output=True, timeout=300,
                                env={**env, **extra_env}, cwd=files)
        stderr = result.stderr.decode("utf-8", "replace")
        problems = []
        if result.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in stderr:
            problems.append("traceback")
        if "internal error" in stderr:
            problems.append("reached the last-resort handler (a bug)")
        if not stderr.strip():
            problems.append("no message")
        if problems:
            failures.append(f"{case_id}: {', '.join(problems)} (exit {result.returncode}):\n"
                            f"{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_non_utf8_prompt_is_a_usage_error_naming_the_byte(files):
    result = subprocess.run([SAR, "--config", str(files / "sarai.toml"), "query", BAD_TEXT],
                            capture_output=True, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "PROMPT" in stderr and "not valid UTF-8" in stderr and "0xff" in stderr


@pytest.mark.models
def test_chat_skips_a_non_utf8_line_and_goes_on(files):
    # The line with the bad bytes is refused; the session goes on to /models and /quit.
    result = subprocess.run(
        [SAR, "--config", str(files / "sarai.toml"), "chat"],
        input=BAD + b" hola\n/models\n/quit\n", capture_output=True, timeout=300)
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "Traceback" not in result.stderr.decode("utf-8", "replace")
    assert "not UTF-8 text (byte 0xff" in out
    assert "fast" in out and "loaded" in out  # /models ran after the bad line
