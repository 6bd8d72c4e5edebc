#!/usr/bin/env python3
"""The relay's own CPU per token, with the engine's cost taken out.

    python scripts/measure_relay_cost.py [--concurrency 16] [--requests 64] [--tokens 64]
                                         [--interval 0.02] [--rounds 3] [--profile FILE]

An upstream in this process streams llama-server's events (the same JSON, one chunk per
token over chunked HTTP/1.1, a finish chunk, usage, ``[DONE]``) at one token per
``--interval`` seconds per stream, for no CPU worth counting; a real ``sarai-router serve``
(``sarai_router.testing.start_serve``) relays it as an ``openai`` model to
``--concurrency`` streaming clients. The figure is the serve process's user + system time
over the tokens relayed: what the router spends per token, without the noise of a real
engine sharing the cores (``scripts/bench_relay.py`` measures it against llama-server).
Run it with ``PYTHONPATH`` pointing at another checkout's ``src`` to compare two versions
in the same minutes; the median over rounds is printed. ``--profile FILE``: py-spy's raw
samples of the serve process during the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil

from sarai_router.testing import start_serve

#: the answers' words, drawn at random: text that repeats itself would trip the runaway
#: guard, which ends the answer early
WORDS = ("sea salt wave tide shore reef coral whale gull storm calm deep blue green grey cold "
         "warm wind sail ship boat port dock net fish crab shell sand rock cliff cave light "
         "night moon star sun cloud rain fog mist foam spray swell current drift north south "
         "east west island bay gulf strait harbour beacon anchor rope mast deck hull keel "
         "oar").split()
#: what llama-server puts in every chunk besides its choices
BASE = {"created": 1796617074, "id": "chatcmpl-LH0WysFpd8VeLL2FEkTC5JFocgLDCUMI",
        "model": "fast", "system_fingerprint": "b0-unknown", "object": "chat.completion.chunk"}


def _event(payload: dict) -> bytes:
    data = f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _choice(delta: dict, finish: str | None = None) -> dict:
    return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], **BASE}


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   interval: float) -> None:
    """One connection: chat requests, each answered as llama-server streams."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            tokens = json.loads(await reader.readexactly(length)).get("max_tokens") or 16
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            writer.write(_event(_choice({"role": "assistant", "content": None})))
            words = random.Random(tokens)
            for _ in range(tokens):
                await asyncio.sleep(interval)
                writer.write(_event(_choice({"content": " " + words.choice(WORDS)})))
            writer.write(_event(_choice({}, "length")))
            writer.write(_event({"choices": [], **BASE, "usage": {
                "completion_tokens": tokens, "prompt_tokens": 15,
                "total_tokens": tokens + 15}}))
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def one(client: httpx.AsyncClient, url: str, tokens: int) -> int:
    body = {"model": "fast", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": tokens, "messages": [{"role": "user", "content": "hola"}]}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"serve answered {response.status_code}: "
                             f"{(await response.aread())[:300]!r}")
        relayed = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                relayed = usage["completion_tokens"] if usage else relayed
        return relayed


async def load(url: str, args: argparse.Namespace, tokens: int, requests: int) -> int:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=0)
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600, trust_env=False) as client:
        async def bounded() -> int:
            async with gate:
                return await one(client, url, tokens)

        return sum(await asyncio.gather(*(bounded() for _ in range(requests))))


def write_config(folder: Path, port: int, args: argparse.Namespace) -> Path:
    path = folder / "relay.toml"
    path.write_text(textwrap.dedent(f"""\
        [routing]
        default_model = "fast"
        [server]
        queue_size = {max(8, args.requests)}
        [plugins.heuristic]
        conversation_model = "fast"
        multimodal_model = "fast"
        [models.fast]
        backend = "openai"
        base_url = "http://127.0.0.1:{port}/v1"
        max_tokens = {args.tokens}
        max_concurrency = {args.concurrency + 4}
        pinned = true
        """), encoding="utf-8")
    return path


async def main_async(args: argparse.Namespace) -> list[float]:
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # clients that hang up early
    server = await asyncio.start_server(
        lambda r, w: upstream(r, w, args.interval), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    figures = []
    with tempfile.TemporaryDirectory(prefix="relay-cost-") as tmp:
        env = {**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"}
        serve = await asyncio.to_thread(start_serve, write_config(Path(tmp), port, args),
                                        echo=False, env=env, timeout=120)
        try:
            url = serve.url + "/v1/chat/completions"
            process = psutil.Process(serve.process.pid)
            await load(url, args, 8, args.concurrency)  # warm-up, not counted
            for number in range(1, args.rounds + 1):
                spy = None
                if args.profile and number == args.rounds:
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                         str(process.pid), "-r", "250", "-f", "raw", "-o", args.profile],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1.0)
                before, started = process.cpu_times(), time.perf_counter()
                tokens = await load(url, args, args.tokens, args.requests)
                wall, after = time.perf_counter() - started, process.cpu_times()
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                cpu = (after.user + after.system) - (before.user + before.system)
                figures.append(1000 * cpu / tokens)
                print(f"round {number}: {tokens} tokens in {wall:.1f} s, serve CPU "
                      f"{cpu:.2f} s = {figures[-1]:.3f} ms per token", file=sys.stderr)
        finally:
            serve.stop()
            server.close()
    return figures


def top_frames(path: str, count: int = 15) -> list[tuple[float, str]]:
    """The functions py-spy found on the CPU most often (their own time, not their callees'),
    as (percent of the busy samples, function (file)); idle waits left out."""
    own: dict[str, int] = {}
    busy = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frame = stack.split(";")[-1]
        if frame.startswith(("select (", "Condition.wait", "EpollSelector.select", "wait (")):
            continue  # waiting, not working
        name, _, where = frame.partition(" (")
        where = where.rsplit(":", 1)[0].split("site-packages/")[-1]
        key = f"{name} ({where})"
        own[key] = own.get(key, 0) + int(samples)
        busy += int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return [(round(100 * n / max(1, busy), 1), key) for key, n in ranked]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--interval", type=float, default=0.02,
                        help="seconds between two tokens of one stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="", help="py-spy's raw samples, last round")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    print(f"router CPU per relayed token: {statistics.median(figures):.3f} ms (median of "
          f"{len(figures)} rounds; {args.concurrency} streams, {args.tokens} tokens each, "
          f"one every {args.interval:g} s)")
    if args.profile:
        print("where the serve process's CPU went in the last round (py-spy, own time; its "
              "sampling counts in that round's figure):")
        for share, frame in top_frames(args.profile):
            print(f"{share:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
