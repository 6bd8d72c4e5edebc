"""``sarai-router chat`` driven through a real terminal (pexpect), on the real models."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pexpect
import pytest

from sarai_router.backend import GenerationParams
from sarai_router.cli.chat import PROMPT, ChatSession
from sarai_router.engine import Engine
from sarai_router.testing import SARAI_ROUTER as SAR

from conftest import ctrl_c_as_at_a_terminal


# One thread: robust on a busy 2-core machine (ggml's threads spin-wait when starved).
ONE_THREAD_PINNED = "pinned = true\nn_threads = 1"


def spawn_chat(config_path: Path, *args: str) -> pexpect.spawn:
    env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1", "TERM": "dumb"}
    child = pexpect.spawn(SAR, ["--config", str(config_path), "chat", *args], env=env,
                          encoding="utf-8", timeout=90, dimensions=(50, 200),
                          preexec_fn=ctrl_c_as_at_a_terminal)
    child.expect_exact(PROMPT)
    return child


BRIEF = """
[models.brief]
path = "{models_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 256
n_threads = 1
ttl_seconds = 1
"""


def wait_for_models_line(child: pexpect.spawn, pattern: str, timeout: float = 60) -> None:
    """Send ``/models`` until a line matches ``pattern`` (the reaper runs on its own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        child.sendline("/models")
        child.expect_exact("/models")  # the echo of what we typed
        child.expect_exact(PROMPT)
        if re.search(pattern, child.before):
            return
        assert time.monotonic() < deadline, f"no {pattern!r} in /models after {timeout}s: " \
                                            + child.before
        time.sleep(0.2)


@pytest.mark.models
def test_chat_turns_model_switch_models_and_ttl(write_config):
    # quality keeps the cache's long TTL (its "loaded" line cannot race an expiry); the
    # brief model's 1 s TTL is the one the reaper is watched on.
    path = write_config(BRIEF, cache="ttl_seconds = 3600\nmax_loaded = 3\nreap_interval_seconds = 0.2",
                        fast=ONE_THREAD_PINNED, quality="n_threads = 1")
    child = spawn_chat(path, "--max-tokens", "6", "--seed", "1")
    try:
        child.sendline("Hola, ¿cómo estás?")
        child.expect_exact("[fast] no rule matched")  # the model and why, before the answer
        child.expect(r"\[fast\] \d+ tokens")
        child.expect_exact(PROMPT)

        child.sendline("/model quality")
        child.expect_exact("next turns go to 'quality'")
        child.expect_exact(PROMPT)
        child.sendline("And now?")
        child.expect_exact("[quality] model requested explicitly")
        child.expect(r"\[quality\] \d+ tokens")
        child.expect_exact(PROMPT)

        child.sendline("/models")
        child.expect(r"\* quality\s+loaded\s+ttl 3600s")
        child.expect_exact(PROMPT)

        child.sendline("/model brief")
        child.expect_exact("next turns go to 'brief'")
        child.expect_exact(PROMPT)
        child.sendline("Hi")
        child.expect_exact("[brief] model requested explicitly")
        child.expect(r"\[brief\] \d+ tokens")
        child.expect_exact(PROMPT)
        # No turn from here: the reaper alone unloads brief once it is idle past its TTL.
        wait_for_models_line(child, r"\* brief\s+unloaded\s+ttl 1s")
        assert re.search(r"fast\s+loaded\s+pinned", child.before), child.before
        assert re.search(r"quality\s+loaded", child.before), child.before

        child.sendline("/auto")
        child.expect_exact("routing each turn again")
        child.expect_exact(PROMPT)
        child.sendline("Describe esta imagen")
        child.expect_exact("[quality] multimodal request")
        child.expect_exact(PROMPT)

        child.sendline("/model nope")
        child.expect_exact("unknown model 'nope'")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact("conversation forgotten")
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.wait()
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus, child.before)


@pytest.mark.models
def test_ctrl_c_stops_the_answer_not_the_session(write_config):
    child = spawn_chat(write_config(fast=ONE_THREAD_PINNED), "--max-tokens", "400",
                       "--temperature", "0")
    try:
        child.sendline("Count from 1 to 300, separated by commas.")
        child.expect_exact("[fast]")
        child.expect(r"\d")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]", timeout=30)
        child.expect_exact(PROMPT)
        child.sendline("/models")  # still alive, and the model still loaded
        child.expect(r"fast\s+loaded")
        child.expect_exact(PROMPT)
        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect_exact("/quit or Ctrl-D leaves")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.wait()
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus, child.before)


@pytest.mark.models
def test_history_is_kept_and_reset(make_config):
    engine = Engine(make_config())
    lines = iter(["Hola", "¿Y tú?", "/reset", "/quit"])
    out: list[str] = []
    session = ChatSession(engine, GenerationParams(max_tokens=4, temperature=0),
                          echo=lambda text="", nl=True: out.append(str(text)))
    history_sizes = []

    def read(prompt):
        history_sizes.append(len(session.history))
        return next(lines)

    try:
        session.run(read=read)
    finally:
        engine.close()
    # Before each line: 0 turns, 1 turn (2 messages), 2 turns, then reset.
    assert history_sizes == [0, 2, 4, 0]
    second = session.messages("x")
    assert second == ({"role": "user", "content": "x"},)


@pytest.mark.models
def test_a_conversation_past_the_context_drops_its_oldest_exchanges(make_config):
    engine = Engine(make_config())  # fast: n_ctx 512
    out: list[str] = []
    session = ChatSession(engine, GenerationParams(max_tokens=4, temperature=0),
                          echo=lambda text="", nl=True: out.append(str(text)))
    long_turn = "palabra " * 120  # about 120+ tokens each
    for _ in range(4):
        session.history += [{"role": "user", "content": long_turn},
                            {"role": "assistant", "content": long_turn}]
    try:
        session.turn("Hola")
    finally:
        engine.close()
    assert any("dropped the oldest exchange" in line for line in out)
    assert not any(line.startswith("\x1b[31merror") or "error:" in line for line in out), out
    # Some old exchanges were forgotten; the new one is kept, with its answer.
    assert len(session.history) < 8 + 2
    assert session.history[-2] == {"role": "user", "content": "Hola"}
    assert session.history[-1]["content"].strip()


@pytest.mark.models
def test_a_single_prompt_past_the_context_is_an_error_not_a_crash(make_config):
    engine = Engine(make_config())
    out: list[str] = []
    session = ChatSession(engine, GenerationParams(max_tokens=4, temperature=0),
                          echo=lambda text="", nl=True: out.append(str(text)))
    try:
        session.turn("palabra " * 1000)
    finally:
        engine.close()
    assert any("n_ctx" in line for line in out), out
    assert session.history == []
