#!/usr/bin/env python3
"""The request path's own CPU per token, with the model's cost taken out.

    python scripts/measure_path_cost.py [--requests 40] [--tokens 200] [--rounds 5] [--json]

A model whose ``chat`` yields ``--tokens`` one-character pieces as fast as it can (a
plugin in a temporary ``[plugins] dirs`` folder, a blocking ``chat`` as llama.cpp's) is
driven through the engine in two ways:

* **sync**: ``Engine.stream`` from this thread, as ``query``, ``bench`` and ``eval`` do;
* **server**: a ``streaming.Generation`` per request, its events handed to a handler on an
  event loop through an ``asyncio.Queue``, as the server does, ``--concurrency`` at once.

The figure is this process's CPU time (user + system) over the tokens: everything the
router does per token (the thread handing a piece over, the engine's accounting, the
runaway guard, the hand-over to the consumer), since the model itself costs next to
nothing. The sync way is also split: the same requests with one token each give what a
request costs apart from its tokens (``sync, per request``), and the difference what
each further token costs (``sync, per further token``). Its letters never repeat in a
period, so the runaway guard (on, for its cost) lets every token through. Run it with
``PYTHONPATH`` pointing at another checkout's ``src`` to compare two versions on the
same machine in the same minutes; the median over rounds is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PLUGIN = textwrap.dedent('''
    from sarai_router.backend import Backend, Delta, Usage
    from sarai_router.hookspecs import hookimpl


    class PathModel:
        def chat(self, messages, params, *, images=(), audio=None):
            count = params.max_tokens or 1
            state = 12345
            for _ in range(count):
                # Letters with no period the runaway guard would stop: every token counts.
                state = (state * 1103515245 + 12345) & 0x7FFFFFFF
                yield Delta(text=chr(97 + (state >> 16) % 26))
            yield Delta(text="", finish_reason="length", usage=Usage(1, count))

        def close(self):
            pass


    class PathBackend(Backend):
        def load(self, spec):
            return PathModel()


    @hookimpl
    def register_backends(register):
        register("pathcost", PathBackend())
''')

CONFIG = textwrap.dedent('''
    [routing]
    default_model = "path"

    [plugins]
    dirs = ["{plugins}"]

    [plugins.heuristic]
    conversation_model = "path"
    multimodal_model = "path"

    [generation]
    runaway_guard = true

    [models.path]
    backend = "pathcost"
    max_tokens = {tokens}
''')


def cpu() -> float:
    return time.process_time()


def build_engine(folder: Path, tokens: int):
    from sarai_router.engine import Engine
    try:
        from sarai_router.loading import load_config
    except ImportError:  # an older checkout, to compare with
        from sarai_router.config import load_config

    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / "pathcost.py").write_text(PLUGIN)
    config_file = folder / "sarai.toml"
    config_file.write_text(CONFIG.format(plugins=plugins, tokens=tokens))
    return Engine(load_config(config_file))


def sync_round(engine, requests: int, tokens: int) -> tuple[float, int]:
    from sarai_router.backend import GenerationParams
    from sarai_router.types import ChatRequest

    request = ChatRequest.from_prompt("hi")
    decision = engine.prepare(request, prewarm=False)
    params = GenerationParams(max_tokens=tokens)
    produced = 0
    started = cpu()
    for _ in range(requests):
        for _piece in engine.stream(request, decision, params):
            produced += 1
    return cpu() - started, produced


def server_round(engine, requests: int, tokens: int, concurrency: int) -> tuple[float, int]:
    """As ``serving/app.py`` drives a generation: one per request, events through a queue."""
    from sarai_router import streaming
    from sarai_router.backend import GenerationParams
    from sarai_router.types import ChatRequest

    request = ChatRequest.from_prompt("hi")
    decision = engine.prepare(request, prewarm=False)
    params = GenerationParams(max_tokens=tokens)
    threaded = hasattr(streaming, "AsyncGeneration")  # the version before one request path

    async def one() -> int:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if threaded:
            def sink(event) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)
        else:
            sink = events.put_nowait
        generation = streaming.Generation(engine, request, decision, params, sink,
                                          queue_limit=None)
        generation.start()
        pieces = 0
        while True:
            event = await events.get()
            if isinstance(event, streaming.Piece):
                pieces += 1
            else:
                if isinstance(event, streaming.Failed):
                    raise event.error
                return pieces

    async def run() -> int:
        gate = asyncio.Semaphore(concurrency)

        async def limited() -> int:
            async with gate:
                return await one()

        return sum(await asyncio.gather(*(limited() for _ in range(requests))))

    started = cpu()
    produced = asyncio.run(run())
    return cpu() - started, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import sarai_router

    with tempfile.TemporaryDirectory() as folder:
        engine = build_engine(Path(folder), args.tokens)
        try:
            sync_round(engine, 2, args.tokens)  # warm up: imports, the load
            figures: dict[str, list[float]] = {"sync": [], "server": [], "sync_token": [],
                                               "sync_request": []}
            for _ in range(args.rounds):
                spent, produced = sync_round(engine, args.requests, args.tokens)
                figures["sync"].append(1e6 * spent / produced)
                # The same requests with one token each: what a request costs apart from
                # its tokens, and so what each further token costs.
                alone, few = sync_round(engine, args.requests, 1)
                figures["sync_request"].append(1e6 * alone / args.requests)
                figures["sync_token"].append(1e6 * (spent - alone) / (produced - few))
                spent, produced = server_round(engine, args.requests, args.tokens,
                                               args.concurrency)
                figures["server"].append(1e6 * spent / produced)
        finally:
            engine.close()
    result = {"source": str(Path(sarai_router.__file__).parent),
              "requests": args.requests, "tokens": args.tokens, "rounds": args.rounds,
              "concurrency": args.concurrency,
              "cpu_us_per_token": {way: round(statistics.median(values), 2)
                                   for way, values in figures.items()},
              "rounds_us_per_token": {way: [round(v, 2) for v in values]
                                      for way, values in figures.items()}}
    if args.json:
        json.dump(result, sys.stdout)
        print()
        return
    labels = {"sync": "sync, per token", "server": "server, per token",
              "sync_token": "sync, per further token", "sync_request": "sync, per request"}
    for way, value in result["cpu_us_per_token"].items():
        unit = "request" if way == "sync_request" else "token"
        print(f"{labels[way]:>24}: {value:8.2f} µs of CPU per {unit} "
              f"(median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
