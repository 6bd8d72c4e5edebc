"""What one event of the stream costs: ``Hooks.emit`` timed with no observer, with one
``observe`` plugin that does nothing, with the server's Prometheus metrics, and with a
plugin that appends each event to a JSON-lines file.

    python scripts/measure_events.py [--events 20000] [--repeats 5]

Prints the median cost per event (and the spread over the repeats) of a
``generation_finished`` event, the largest the core emits per request. No model loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sarai_router.engine import Engine
from sarai_router.hookspecs import hookimpl
from sarai_router.serving.metrics import Metrics
from sarai_router.testing import config_from_toml

CONFIG = """
[plugins]
disable = ["heuristic"]

[models.small]
backend = "echo"

[routing]
default_model = "small"
"""

DATA = dict(request_id="req_0123456789abcdef0123", prompt_tokens=24, completion_tokens=64,
            ttft_s=0.05, generation_s=1.2, total_s=1.3, tokens_per_second=53.3,
            finish_reason="stop", stopped_by=None)


class Nothing:
    @hookimpl
    def observe(self, event):
        pass


class JsonLines:
    def __init__(self, path: Path):
        self.out = path.open("a", encoding="utf-8")

    @hookimpl
    def observe(self, event):
        self.out.write(json.dumps(event.to_dict()) + "\n")


def per_event_ns(engine: Engine, events: int) -> float:
    emit = engine.hooks.emit
    started = time.perf_counter_ns()
    for _ in range(events):
        emit("generation_finished", "small", **DATA)
    return (time.perf_counter_ns() - started) / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sarai-events-"))
    setups = {
        "no observer": lambda engine: None,
        "one observe plugin (does nothing)": lambda engine: engine.hooks.pm.register(
            Nothing(), name="nothing"),
        "the server's metrics": lambda engine: Metrics(engine.pool, engine.hooks),
        "a plugin writing JSON lines": lambda engine: engine.hooks.pm.register(
            JsonLines(folder / "events.jsonl"), name="jsonl"),
    }
    print(f"Python {sys.version.split()[0]}; {options.events} generation_finished events, "
          f"{options.repeats} repeats; median (min-max) per event")
    for label, setup in setups.items():
        engine = Engine(config_from_toml(CONFIG))
        setup(engine)
        per_event_ns(engine, 1000)  # warm-up
        runs = [per_event_ns(engine, options.events) for _ in range(options.repeats)]
        engine.close()
        print(f"  {label:36} {statistics.median(runs) / 1000:7.2f} us "
              f"({min(runs) / 1000:.2f}-{max(runs) / 1000:.2f})")


if __name__ == "__main__":
    main()
