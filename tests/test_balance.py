"""Replicas of one model: ``balance = "prefix"`` keeps a conversation on the replica that
served its history; ``replicas = N`` runs N llama-server children of one model.

The choice itself is checked on the real ``ReplicaSet`` with a fake clock (no request
needed to see where one would go); the rest on real llama-server children of the fast
model, through the engine and the server's metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psutil
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sarai_router.backend import GenerationParams
from sarai_router.cli import cli
from sarai_router.default_plugins.balance import BalanceSettings, PrefixIndex, prefix_key
from sarai_router.default_plugins.openai import ReplicaSet
from sarai_router.serving.metrics import Metrics
from sarai_router.types import ChatRequest
from sarai_router.default_plugins.llama_server_install import BINARY_ENV
from test_llama_server import (config_text, engine_for,  # noqa: F401 - fixtures
                               llama_server_binary, loaded_model)

SYSTEM = {"role": "system", "content": "You are a terse assistant. " * 40}
PREFIX = BalanceSettings(balance="prefix")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def turn(*texts: str) -> list[dict[str, str]]:
    """A conversation: the system prompt, then user and assistant turns alternating."""
    roles = ("user", "assistant")
    return [SYSTEM, *({"role": roles[i % 2], "content": t} for i, t in enumerate(texts))]


def replica_set(balance: BalanceSettings = PREFIX, n: int = 2, clock=None) -> ReplicaSet:
    return ReplicaSet([f"http://127.0.0.1:{9000 + i}/v1" for i in range(n)], max_cooldown=8,
                      balance=balance, clock=clock or FakeClock())


# -- the choice -------------------------------------------------------------------------


def test_a_follow_up_goes_where_its_history_was_served():
    replicas = replica_set()
    home, placed = replicas.choose(key=prefix_key(turn("hi")))
    assert placed == ""  # a new conversation: least busy
    # Still answering the first turn: the other replica is less busy, but holds nothing.
    follow_up, placed = replicas.choose(key=prefix_key(turn("hi", "hello", "and then?")))
    assert (follow_up, placed) == (home, "hit")
    assert home.inflight == 2 and all(r.inflight == 0 for r in replicas.replicas
                                      if r is not home)


def test_least_busy_ignores_the_history():
    replicas = replica_set(BalanceSettings(balance="least_busy"))
    first, placed = replicas.choose(key=None)
    assert placed == "" and replicas.index is None
    second, _ = replicas.choose(key=None)
    assert second is not first  # the least busy one


def test_a_new_conversation_goes_least_busy_even_with_a_known_system_prompt():
    replicas = replica_set()
    first, _ = replicas.choose(key=prefix_key(turn("hi")))
    chosen, placed = replicas.choose(key=prefix_key(turn("a different question")))
    assert placed == "" and chosen is not first


def test_an_overloaded_replica_loses_its_conversations_to_the_least_busy():
    replicas = replica_set(BalanceSettings(balance="prefix", prefix_overload_inflight=2,
                                           prefix_overload_ratio=1.5))
    home, _ = replicas.choose(key=prefix_key(turn("hi")))
    follow_up = prefix_key(turn("hi", "hello", "more"))
    while home.inflight <= 2:  # 3 in flight there, 0 on the other: 3 - 0 > 2 and 3 > 0
        chosen, placed = replicas.choose(key=follow_up)
        assert (chosen, placed) == (home, "hit")
    chosen, placed = replicas.choose(key=follow_up)
    assert chosen is not home and placed == "miss"


def test_too_short_a_match_goes_least_busy():
    replicas = replica_set(BalanceSettings(balance="prefix", prefix_min_match=0.9))
    home, _ = replicas.choose(key=prefix_key(turn("hi")))
    # The known prefix (system + "hi") is far less than 90 % of this history.
    long_history = prefix_key(turn("hi", "x" * 5000, "more"))
    chosen, placed = replicas.choose(key=long_history)
    assert placed == "miss" and chosen is not home


def test_a_cooling_replica_is_forgotten_and_its_conversations_move():
    clock = FakeClock()
    replicas = replica_set(clock=clock)
    home, _ = replicas.choose(key=prefix_key(turn("hi")))
    replicas.release(home)
    known = len(replicas.index)
    assert known == 2  # system prompt, then "hi"
    replicas.failed(home, "refused")
    assert len(replicas.index) == 0
    chosen, placed = replicas.choose(key=prefix_key(turn("hi", "hello", "more")))
    assert chosen is not home and placed == "miss"
    replicas.release(chosen)
    # After its cooldown it probes (health first), then is a replica like any other.
    clock.now += 10
    probe, placed = replicas.choose(key=prefix_key(turn("hi", "hello", "more")))
    assert probe is home and placed == ""


def test_the_index_is_bounded_least_recently_used_first_out():
    index = PrefixIndex(capacity=4)
    old = prefix_key(turn("old"))  # two blocks: the system prompt, then "old"
    follow_up = prefix_key(turn("old", "answer", "next"))
    index.record(old, "a")
    for i in range(3):
        index.record(prefix_key([{"role": "user", "content": f"q{i}"}]), "b")
    assert len(index) == 4  # the system prompt's block went first
    assert index.longest(follow_up) == ("a", sum(old.sizes))
    for i in range(3, 7):
        index.record(prefix_key([{"role": "user", "content": f"q{i}"}]), "b")
    assert len(index) == 4
    assert index.longest(follow_up) == (None, 0)


def test_tools_are_part_of_the_prefix():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = prefix_key(turn("hi", "hello", "more"), tools)
    without = prefix_key(turn("hi", "hello", "more"))
    assert with_tools.hashes[0] != without.hashes[0]
    assert len(with_tools.hashes) == len(without.hashes) + 1


@pytest.mark.models  # config check reads the model's GGUF header
def test_config_check_names_each_bad_balance_key(tmp_path: Path, models_dir: Path):
    path = tmp_path / "bad.toml"
    path.write_text(config_text(models_dir, fast="""
        balance = "sticky"
        prefix_min_match = 2.0
        prefix_overload_ratio = 0.5
        replicas = 0
    """), encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code != 0
    for problem in ("models.fast.balance: must be one of 'least_busy', 'prefix', got 'sticky'",
                    "models.fast.prefix_min_match: must be between 0 and 1",
                    "models.fast.prefix_overload_ratio: must be >= 1",
                    "models.fast.replicas: must be >= 1"):
        assert problem in result.output
    assert "Traceback" not in result.output


# -- real llama-server replicas ------------------------------------------------------------


@pytest.fixture
def _binary(monkeypatch: pytest.MonkeyPatch, llama_server_binary: Path) -> None:
    monkeypatch.setenv(BINARY_ENV, str(llama_server_binary))


def ask(engine, messages):
    request = ChatRequest(messages=tuple(messages))
    completion = engine.complete(request, GenerationParams(max_tokens=8, temperature=0.0))
    return completion


@pytest.mark.llama_server
@pytest.mark.models
def test_two_replicas_keep_each_conversation_on_its_own_child(_binary, engine_for):
    engine = engine_for(fast='balance = "prefix"\nreplicas = 2\nn_ctx = 1024')
    metrics = Metrics(engine.pool, engine.hooks)  # counts the engine's events
    homes = {}
    for name in ("ada", "bob"):
        first = ask(engine, turn(f"My name is {name}. Say hi."))
        assert first.placement["prefix"] is None  # a new conversation: least busy
        homes[name] = (first.placement["endpoint"], first.text)
    assert homes["ada"][0] != homes["bob"][0]  # idle ties rotate: one per child
    for name in ("ada", "bob"):
        endpoint, answer = homes[name]
        follow_up = ask(engine, turn(f"My name is {name}. Say hi.", answer, "And again?"))
        assert follow_up.placement == {"endpoint": endpoint, "balance": "prefix",
                                       "prefix": "hit"}
    model = loaded_model(engine)
    assert len({p for p in model.pids}) == 2
    assert all(psutil.Process(p).is_running() for p in model.pids)
    assert engine.pool.residents()[0]["concurrency"] == 2 * 2  # parallel x replicas
    counted = {s.labels["outcome"]: s.value
               for family in text_string_to_metric_families(metrics.render().decode())
               if family.name == "sarai_prefix_routing" for s in family.samples
               if s.name.endswith("_total")}
    assert counted == {"hit": 2.0}


@pytest.mark.llama_server
@pytest.mark.models
def test_a_dead_child_restarts_the_replicas_at_the_next_request(_binary, engine_for):
    engine = engine_for(fast='balance = "prefix"\nreplicas = 2')
    ask(engine, turn("Say hi."))
    model = loaded_model(engine)
    psutil.Process(model.pids[1]).kill()
    # Not psutil's wait: reaping the child here races the router's own watcher of it (a
    # real crash is seen only by the router). Wait until the router sees it dead.
    deadline = time.monotonic() + 30
    while model.alive():
        assert time.monotonic() < deadline, "the killed child still counts as alive"
        time.sleep(0.05)
    answer = ask(engine, turn("Say hi again."))
    assert answer.text
    fresh = loaded_model(engine)
    assert fresh is not model and len(fresh.pids) == 2
    assert model.pids[1] not in fresh.pids


@pytest.mark.llama_server
@pytest.mark.models
def test_the_server_answer_names_the_replica_and_metrics_count_hits(_binary, tmp_path: Path,
                                                                    models_dir: Path):
    from sarai_router.testing import start_serve

    config = tmp_path / "sarai.toml"
    config.write_text(config_text(models_dir, fast='balance = "prefix"\nreplicas = 2\n'
                                                  'pinned = true'), encoding="utf-8")
    with start_serve(config, echo=False, timeout=300) as server:
        url = f"{server.url}/v1/chat/completions"
        first = httpx.post(url, json={"model": "fast", "max_tokens": 8,
                                      "messages": turn("Say hi.")}, timeout=300).json()
        placement = first["sarai"]["placement"]
        assert placement["balance"] == "prefix" and placement["prefix"] is None
        answer = first["choices"][0]["message"]["content"]
        last = None
        with httpx.stream("POST", url, timeout=300, json={
                "model": "fast", "max_tokens": 8, "stream": True,
                "messages": turn("Say hi.", answer, "Again.")}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("sarai"):
                        last = chunk["sarai"]
        assert last is not None and last["placement"] == {
            "endpoint": placement["endpoint"], "balance": "prefix", "prefix": "hit"}
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    counted = {s.labels["outcome"]: s.value
               for family in text_string_to_metric_families(metrics)
               if family.name == "sarai_prefix_routing" for s in family.samples
               if s.name.endswith("_total")}
    assert counted == {"hit": 1.0}
