#!/usr/bin/env python3
"""Multi-turn conversations with long system prompts through the router to 2 llama-server
replicas of one model: ``balance = "least_busy"`` against ``balance = "prefix"``.

    python scripts/bench_prefix.py [--conversations 4] [--turns 4] [--system-words 1500]
                                   [--max-tokens 24] [--think 3] [--parallel 2]
                                   [--threads 1] [--rounds 2] [--json]

Each round starts a real ``sarai-router serve`` twice (the order of the two alternates by
round), whose only model is the fast GGUF with ``backend = "llama_server"``,
``replicas = 2``, pinned, and the balance under test. Then ``--conversations``
conversations run at once, each ``--turns`` turns one after the other (with a pause of up
to ``--think`` seconds between turns, as a person or a tool takes): every conversation
has a system prompt of its own (``--system-words`` words of generated text, about 2,000
tokens by default: an agent's instructions and tool documentation, say), and each turn
sends the whole history again with the answers as they came, streamed, the way a chat UI
does.

Figures per side: mean and median TTFT of follow-up turns (turn 2 on: what the prompt
cache can save) and of first turns, aggregate tok/s (completion tokens / wall time of
all conversations), and the prefix hit rate from the router's ``/metrics``
(``sarai_prefix_routing_total``: hits / (hits + misses)). The breakdown: how many
follow-ups stayed on the replica of the conversation's previous turn and how many moved
(from each turn's ``sarai.placement``), the mean TTFT of each kind, and the prompt tokens
the replicas evaluated and the seconds that took (each llama-server child's ``/metrics``:
what a prompt cache saves is missing there). ``--think 0`` sends each conversation's turns
back to back, all conversations in lockstep. Each round prints its own ratio prefix /
least_busy of the mean follow-up TTFT; the summary is each side's median over rounds and
the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from sarai_router.config import default_models_dir
from sarai_router.default_plugins.llama_server_install import build_llama_server
from sarai_router.testing import start_serve

from bench_llama_server import wait_until_loaded

FAST_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BALANCES = ("least_busy", "prefix")
WORDS = (
    "account address answer archive batch buffer cache channel check client column config "
    "context counter cursor database deadline default device digest document domain draft "
    "endpoint entry error event field filter folder format frame gateway handler header "
    "history index input invoice item journal key label layer ledger limit listing log "
    "manifest message metric module network node notice number object offset order owner "
    "packet page parameter partner payload policy pool port priority profile prompt queue "
    "quota record region registry replica report request resource response result review "
    "route rule schedule schema scope section segment server session setting shard signal "
    "slot snapshot source stage status step stream summary table target task template "
    "tenant ticket timeout token topic trace transfer update user value version volume "
    "window worker zone").split()
QUESTIONS = (
    "Which rule matters most here? One sentence.",
    "Give one example of that rule in use.",
    "What could go wrong with it?",
    "How would you check it? Be brief.",
    "Summarise the policy in ten words.",
    "What is the first step?",
)


def system_prompt(index: int, words: int) -> str:
    """An agent's instructions of about ``words`` words, different for each conversation."""
    rng = random.Random(index)
    sentences = []
    count = 0
    rule = 1
    while count < words:
        length = rng.randint(8, 16)
        sentences.append(f"Rule {rule}: " + " ".join(rng.choice(WORDS) for _ in range(length))
                         + ".")
        count += length + 2
        rule += 1
    return (f"You are assistant number {index}, an operations agent. Follow these rules "
            "and answer briefly.\n" + "\n".join(sentences))


async def conversation(client: httpx.AsyncClient, url: str, index: int,
                       args: argparse.Namespace) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt(index, args.system_words)}]
    turns = []
    pauses = random.Random(1000 + index)
    for turn in range(args.turns):
        if turn:
            # A person reads the answer, an agent runs a tool: turns are not in lockstep.
            await asyncio.sleep(pauses.uniform(0, args.think))
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        body = {"model": "fast", "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": args.max_tokens, "temperature": 0.7, "seed": index * 100 + turn,
                "messages": messages}
        row = {"conversation": index, "turn": turn + 1, "ttft": None, "tokens": 0,
               "prompt_tokens": 0, "placement": None, "error": ""}
        text = []
        started = time.perf_counter()
        try:
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    row["error"] = f"HTTP {response.status_code}"
                    turns.append(row)
                    break
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        row["tokens"] = chunk["usage"]["completion_tokens"]
                        row["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                    if isinstance(chunk.get("sarai"), dict) and chunk["sarai"].get("placement"):
                        row["placement"] = chunk["sarai"]["placement"]
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text.append(piece)
                            if row["ttft"] is None:
                                row["ttft"] = time.perf_counter() - started
        except httpx.HTTPError as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        turns.append(row)
        if row["error"]:
            break
        messages.append({"role": "assistant", "content": "".join(text)})
    return turns


async def run_conversations(base: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.conversations + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(conversation(client, url, i, args)
                                         for i in range(args.conversations)))
        wall = time.perf_counter() - started
    return [row for turns in results for row in turns], wall


def prefix_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "sarai_prefix_routing":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] += sample.value
    return counts


def child_prompt_work(base: str) -> dict[str, float]:
    """Prompt tokens the replicas evaluated and the seconds it took, summed over them, from
    each llama-server child's own ``/metrics`` (``llamacpp:prompt_tokens_total``,
    ``llamacpp:prompt_seconds_total``): tokens a prompt cache saved are not counted there."""
    rows = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    endpoints = next(m for m in rows if m["id"] == "fast")["health"]["endpoints"]
    work = {"prompt_tokens": 0.0, "prompt_seconds": 0.0}
    for endpoint in endpoints:
        root = endpoint["url"].rstrip("/").removesuffix("/v1")
        text = httpx.get(f"{root}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens"):
                    work["prompt_tokens"] += sample.value
                elif sample.name in ("llamacpp:prompt_seconds_total", "llamacpp:prompt_seconds"):
                    work["prompt_seconds"] += sample.value
    return work


def write_config(folder: Path, balance: str, args: argparse.Namespace) -> Path:
    model = {"backend": "llama_server", "path": str(args.model), "n_ctx": args.n_ctx,
             "max_tokens": args.max_tokens, "parallel": args.parallel, "replicas": 2,
             # n_threads is shared by the replicas: each child gets --threads
             "n_threads": 2 * args.threads, "pinned": True, "balance": balance}
    config = {
        "routing": {"default_model": "fast"},
        "cache": {"max_loaded": 1, "ttl_seconds": 3600},
        "plugins": {"heuristic": {"conversation_model": "fast", "multimodal_model": "fast"}},
        "server": {"queue_size": max(8, args.conversations)},
        "models": {"fast": model},
    }
    path = folder / f"{balance}.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def run_side(config_path: Path, args: argparse.Namespace, log: Path) -> dict:
    # The kit's start_serve: fails with the server's log if it does not answer in time.
    server = start_serve(config_path, env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"},
                         echo=False, log_path=log.with_suffix(f".{config_path.stem}.log"),
                         timeout=300)
    base, process = server.url, server.process
    try:
        wait_until_loaded(base, process, f"serve did not load its model; see {server.log_path}")
        rows, wall = asyncio.run(run_conversations(base, args))
        counts = prefix_counts(base)
        work = child_prompt_work(base)
    finally:
        server.stop(timeout=30)
    ok = [r for r in rows if not r["error"] and r["ttft"] is not None]
    previous: dict[int, str | None] = {}
    for r in sorted(rows, key=lambda r: (r["conversation"], r["turn"])):
        endpoint = (r["placement"] or {}).get("endpoint")
        # Whether the replica that took this turn evaluated the conversation's history.
        r["stayed"] = r["turn"] > 1 and endpoint is not None \
            and previous.get(r["conversation"]) == endpoint
        previous[r["conversation"]] = endpoint
    follow = [r["ttft"] for r in ok if r["turn"] > 1]
    stayed = [r["ttft"] for r in ok if r["turn"] > 1 and r["stayed"]]
    moved = [r["ttft"] for r in ok if r["turn"] > 1 and not r["stayed"]]
    first = [r["ttft"] for r in ok if r["turn"] == 1]
    tokens = sum(r["tokens"] for r in ok)
    judged = counts["hit"] + counts["miss"]
    same = [r for r in ok if r["turn"] > 1 and r["placement"]]
    return {
        "turns": len(rows), "errors": len(rows) - len(ok),
        "first_error": next((r["error"] for r in rows if r["error"]), None),
        "follow_up_ttft_mean_s": round(statistics.mean(follow), 3) if follow else None,
        "follow_up_ttft_p50_s": round(statistics.median(follow), 3) if follow else None,
        "first_turn_ttft_mean_s": round(statistics.mean(first), 3) if first else None,
        "completion_tokens": tokens, "wall_s": round(wall, 2),
        "aggregate_tok_s": round(tokens / wall, 1) if wall else 0.0,
        "prefix_hits": counts["hit"], "prefix_misses": counts["miss"],
        "prefix_hit_rate": round(counts["hit"] / judged, 3) if judged else None,
        "system_prompt_tokens": min((r["prompt_tokens"] for r in ok if r["turn"] == 1),
                                    default=None),
        "endpoints_used": len({r["placement"]["endpoint"] for r in same}),
        # The breakdown: a follow-up that moved to the other replica pays its whole prompt.
        "follow_ups_stayed": len(stayed), "follow_ups_moved": len(moved),
        "follow_up_ttft_stayed_mean_s": round(statistics.mean(stayed), 3) if stayed else None,
        "follow_up_ttft_moved_mean_s": round(statistics.mean(moved), 3) if moved else None,
        "prompt_tokens_evaluated": int(work["prompt_tokens"]),
        "prompt_eval_s": round(work["prompt_seconds"], 2),
        "per_turn": [{k: r[k] for k in ("conversation", "turn", "ttft", "prompt_tokens",
                                        "stayed", "error")}
                     | {"endpoint": (r["placement"] or {}).get("endpoint"),
                        "prefix": (r["placement"] or {}).get("prefix")} for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=1500,
                        help="words of each system prompt (about 2,000 tokens for 1500)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--think", type=float, default=3.0,
                        help="longest pause between a conversation's turns (uniform, seeded)")
    parser.add_argument("--parallel", type=int, default=2, help="slots of each replica")
    parser.add_argument("--threads", type=int, default=1, help="threads of each replica")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context per slot")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=default_models_dir() / FAST_FILE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model} (run `sarai-router models pull`)")
    os.environ["SARAI_ROUTER_LLAMA_SERVER"] = str(
        build_llama_server(report=lambda m: print(m, file=sys.stderr)))

    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        folder = Path(tmp)
        for number in range(1, args.rounds + 1):
            order = BALANCES if number % 2 else BALANCES[::-1]
            sides = {}
            for balance in order:
                sides[balance] = run_side(write_config(folder, balance, args), args,
                                          folder / "serve.log")
                # Each round as it ends, on stderr (--json too): a long run that is
                # stopped early still shows what it measured.
                s = sides[balance]
                print(f"round {number} {balance}: follow-up TTFT mean "
                      f"{s['follow_up_ttft_mean_s']} s (stayed {s['follow_ups_stayed']}: "
                      f"{s['follow_up_ttft_stayed_mean_s']} s, moved "
                      f"{s['follow_ups_moved']}: {s['follow_up_ttft_moved_mean_s']} s), "
                      f"first turn {s['first_turn_ttft_mean_s']} s, "
                      f"{s['aggregate_tok_s']} tok/s, hit rate {s['prefix_hit_rate']}, "
                      f"prompt tokens evaluated {s['prompt_tokens_evaluated']} in "
                      f"{s['prompt_eval_s']} s, errors {s['errors']}", file=sys.stderr)
            sides["follow_up_ttft_ratio"] = round(
                sides["prefix"]["follow_up_ttft_mean_s"]
                / sides["least_busy"]["follow_up_ttft_mean_s"], 3)
            print(f"round {number}: prefix / least_busy follow-up TTFT mean "
                  f"{sides['follow_up_ttft_ratio']}", file=sys.stderr)
            rounds.append(sides)

    keys = ("follow_up_ttft_mean_s", "follow_up_ttft_p50_s", "first_turn_ttft_mean_s",
            "aggregate_tok_s", "follow_ups_moved", "prompt_tokens_evaluated")
    summary = {
        "setup": {"conversations": args.conversations, "turns": args.turns,
                  "think_s": args.think,
                  "system_words": args.system_words, "max_tokens": args.max_tokens,
                  "replicas": 2, "parallel": args.parallel, "threads_per_replica": args.threads,
                  "n_ctx_per_slot": args.n_ctx, "model": args.model.name,
                  "system_prompt_tokens": rounds[0]["prefix"]["system_prompt_tokens"],
                  "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "rounds": rounds,
        **{balance: {key: statistics.median(r[balance][key] for r in rounds) for key in keys}
           for balance in BALANCES},
        "errors": sum(r[b]["errors"] for r in rounds for b in BALANCES),
    }
    summary["prefix"]["prefix_hit_rate"] = statistics.median(
        r["prefix"]["prefix_hit_rate"] or 0.0 for r in rounds)
    # The median of the rounds' own ratios: each round's two sides ran minutes apart, the
    # rounds up to an hour apart, and the machine's load moves in between.
    summary["round_ratios"] = [r["follow_up_ttft_ratio"] for r in rounds]
    summary["follow_up_ttft_ratio"] = statistics.median(summary["round_ratios"])
    summary["tok_s_ratio"] = round(summary["prefix"]["aggregate_tok_s"]
                                   / summary["least_busy"]["aggregate_tok_s"], 3)
    summary["target"] = {"follow_up_ttft_ratio <= 0.5": summary["follow_up_ttft_ratio"] <= 0.5}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.conversations} conversations at once, {args.turns} turns each, system "
          f"prompts of ~{summary['setup']['system_prompt_tokens']} tokens; 2 llama-server "
          f"replicas x {args.parallel} slots, {args.threads} thread(s) each; median of "
          f"{args.rounds} rounds")
    print(f"{'balance':12}{'follow-up TTFT mean':>21}{'p50':>8}{'first turn':>12}"
          f"{'tok/s':>8}{'hit rate':>10}")
    for balance in BALANCES:
        s = summary[balance]
        rate = s.get("prefix_hit_rate", "")
        print(f"{balance:12}{s['follow_up_ttft_mean_s']:>21}{s['follow_up_ttft_p50_s']:>8}"
              f"{s['first_turn_ttft_mean_s']:>12}{s['aggregate_tok_s']:>8}{rate!s:>10}")
    print(f"follow-ups moved to the other replica (median): least_busy "
          f"{summary['least_busy']['follow_ups_moved']}, prefix "
          f"{summary['prefix']['follow_ups_moved']}; prompt tokens evaluated: least_busy "
          f"{summary['least_busy']['prompt_tokens_evaluated']}, prefix "
          f"{summary['prefix']['prompt_tokens_evaluated']}")
    print(f"prefix / least_busy: follow-up TTFT mean {summary['follow_up_ttft_ratio']} "
          f"(median of the rounds' ratios {summary['round_ratios']}; target <= 0.5), tok/s "
          f"{summary['tok_s_ratio']}; errors {summary['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
