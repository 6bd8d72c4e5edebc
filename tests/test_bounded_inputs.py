"""Inputs with no natural bound: attachments that never end (``/dev/zero``), block forever
(a FIFO with no writer) or are huge (a sparse file), and fallback chains as long as the
config. Each gets a clear error at once, with flat memory and no recursion."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from sarai_router.config import fallback_cycles
from sarai_router.loading import parse_config
from sarai_router.errors import AttachmentError
from sarai_router.router import fallback_order
from sarai_router.types import read_attachment
from sarai_router.testing import SARAI_ROUTER as SAR


#: A config that loads no model file: endpoints nobody listens on (port 9, discard).
RING_MODEL = """
[models.m{i}]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
fallbacks = ["m{j}"]
"""


#: The heuristic routes to `m0` for both kinds of request.
HEAD = """
[routing]
default_model = "m0"
[plugins.heuristic]
conversation_model = "m0"
multimodal_model = "m0"
"""


def load_config_text(text: str):
    return parse_config(text, source="test.toml", base_dir=None)


def ring_toml(count: int) -> str:
    head = HEAD
    return head + "".join(RING_MODEL.format(i=i, j=(i + 1) % count) for i in range(count))


#: Runs a command and prints its largest RSS (KB) on a last stderr line: RUSAGE_CHILDREN of
#: this wrapper is that one command's, where the test process's own would include every
#: server the suite started before.
MEASURED = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(f"maxrss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def run_cli(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """The command's result, its wall time and its largest RSS in KB."""
    import sys

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", MEASURED, SAR, *argv], capture_output=True,
                            text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    stderr, _, last = result.stderr.rstrip("\n").rpartition("\n")
    if not last.startswith("maxrss_kb="):  # the command printed nothing on stderr
        stderr, last = "", last or result.stderr
    result.stderr = stderr
    return result, seconds, int(last.removeprefix("maxrss_kb="))


def assert_clean_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


# -- attachments ------------------------------------------------------------------------------

def test_route_audio_from_dev_zero_is_refused_at_once_with_flat_memory(tmp_path):
    result, seconds, max_rss_kb = run_cli("route", "--audio", "/dev/zero", cwd=tmp_path)
    assert_clean_usage_error(result, "--audio /dev/zero: is a device, not a regular file")
    assert seconds < 30
    # Before the check, 60 s of reading /dev/zero grew the process to 15.8 GB.
    assert max_rss_kb < 400 * 1024, f"{max_rss_kb} KB"


def test_query_audio_from_a_fifo_with_no_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "clip.wav"
    os.mkfifo(fifo)
    result, seconds, _ = run_cli("query", "--audio", str(fifo), "hola", cwd=tmp_path)
    assert_clean_usage_error(result, f"--audio {fifo}: is a FIFO (named pipe), not a regular file")
    assert seconds < 30


def test_a_sparse_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.wav"
    with open(huge, "wb") as handle:
        handle.truncate(3 * 1024**3)  # 3 GB, no block on disk
    result, seconds, max_rss_kb = run_cli("route", "--audio", str(huge), cwd=tmp_path)
    assert_clean_usage_error(result, f"--audio {huge}: 3221225472 bytes, more than the limit of "
                                     "16777216 ([server] max_body_bytes)")
    assert seconds < 30 and max_rss_kb < 400 * 1024


def test_an_image_that_is_a_fifo_names_the_image_option(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    result, _, _ = run_cli("route", "--image", str(fifo), "hola", cwd=tmp_path)
    assert_clean_usage_error(result, f"--image {fifo}: is a FIFO")


def test_read_attachment_reads_a_regular_file_and_stops_past_the_limit(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF" + b"\0" * 100)
    assert read_attachment(clip, 104) == b"RIFF" + b"\0" * 100
    with pytest.raises(AttachmentError, match="104 bytes, more than the limit of 103"):
        read_attachment(clip, 103)
    with pytest.raises(AttachmentError, match="is a directory"):
        read_attachment(tmp_path, 10)


# -- fallback chains --------------------------------------------------------------------------

def test_a_ring_of_1500_fallbacks_is_walked_without_recursion():
    config = load_config_text(ring_toml(1500))
    chain = fallback_order(config.models, "m0")
    assert chain == [f"m{i}" for i in range(1, 1500)]
    assert fallback_order(config.models, "m700")[:2] == ["m701", "m702"]
    assert fallback_cycles(config.models) == [[f"m{i}" for i in range(1500)] + ["m0"]]


def test_fallback_order_is_depth_first_and_each_model_once():
    config = load_config_text(HEAD.replace("m0", "a") + """
[models.a]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
fallbacks = ["b", "c"]
[models.b]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
fallbacks = ["d", "a"]
[models.c]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
fallbacks = ["b"]
[models.d]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
""")
    assert fallback_order(config.models, "a") == ["b", "d", "c"]
    assert fallback_order(config.models, "c") == ["b", "d", "a"]
    assert fallback_cycles(config.models) == [["a", "b", "a"]]


def test_config_check_shows_a_two_model_cycle_and_route_survives_a_long_ring(tmp_path):
    pair = tmp_path / "pair.toml"
    pair.write_text(ring_toml(2), encoding="utf-8")
    result, _, _ = run_cli("config", "check", str(pair), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: models.m0.fallbacks: fallback cycle m0 -> m1 -> m0 (2 models" in result.stdout

    ring = tmp_path / "ring.toml"
    ring.write_text(ring_toml(1500), encoding="utf-8")
    result, _, _ = run_cli("config", "check", str(ring), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fallback cycle m0 -> m1 -> m2 -> m3 -> ... -> m1498 -> m1499 -> m0 (1500 models" \
        in result.stdout
    # route --json lists the chain: it used to end in "internal error (RecursionError)".
    result, _, _ = run_cli("--config", str(ring), "route", "--json", "hola", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RecursionError" not in result.stdout + result.stderr
    import json
    assert len(json.loads(result.stdout)["fallback_chain"]) == 1499


def test_a_request_on_a_ring_of_1500_refusing_models_ends_after_max_fallbacks(tmp_path):
    """Over HTTP, the ring used to answer 500 (RecursionError); walked in full it would take
    minutes. Now the request takes at most ``[routing] max_fallbacks`` (3 here) fallbacks
    and gets a clear 502, and the server serves the next request the same way."""
    from test_server_robustness import start_server, stop
    import httpx

    server = start_server(tmp_path, ring_toml(1500).replace(
        'default_model = "m0"', 'default_model = "m0"\nmax_fallbacks = 3'))
    try:
        for stream in (False, True):
            started = time.monotonic()
            response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": "auto", "max_tokens": 8, "stream": stream,
                "messages": [{"role": "user", "content": "hola"}]})
            assert time.monotonic() - started < 30
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert "refused the connection" in error["message"] and "m3" in error["message"]
        log = server.log()
        assert "no more fallbacks for this request ([routing] max_fallbacks = 3)" in log
        assert "falling back to m4" not in log and "Traceback" not in log
    finally:
        stop(server)
