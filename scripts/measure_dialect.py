"""What tools, JSON output and logprobs cost and give with the default models.

In process (``Engine``, no HTTP), the built-in config's two models at temperature 0:

- cost: process CPU time per generated token, the prompt's cost taken out (one llama
  thread, so other processes on a busy machine cannot inflate it), for the same prompt as
  plain text, with a JSON-schema grammar, as a constrained tool call, and with logprobs
  (top 5);
- quality: for a few prompts, which function the model calls when it must
  (``tool_choice`` "required"), whether it calls one when it may ("auto"), and whether
  its JSON-schema answers parse and fit (always, by the grammar) and end by themselves.

    python scripts/measure_dialect.py [--json] [--speed-only]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import attrs

from sarai_router.backend import GenerationParams
from sarai_router.loading import load_config
from sarai_router.engine import Completion, Engine
from sarai_router.types import ChatRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                     "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
TOOL_PROMPTS = [("What's the weather in Paris?", "get_weather"),
                ("¿Qué tiempo hace en Madrid?", "get_weather"),
                ("What is 2 plus 3?", "add"),
                ("Add 17 and 25.", "add"),
                ("Tell me a joke.", None)]


def run(engine: Engine, model: str, text: str, **params) -> tuple[Completion, float]:
    """One answer; the process CPU seconds it took (all threads: with n_threads 1, the
    figure other processes on a busy machine cannot inflate, unlike wall time)."""
    request = ChatRequest.from_prompt(text)
    decision = engine.prepare(request, model=model, prewarm=False)
    completion = Completion(decision=decision)
    started = time.process_time()
    for _ in engine.stream(request, decision, GenerationParams(temperature=0, seed=1, **params),
                           completion):
        pass
    return completion, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="skip the quality runs")
    args = parser.parse_args()
    os.environ.setdefault("SARAI_ROUTER_NO_PLUGINS", "1")
    config = load_config(None)
    # One thread per model: CPU time per token then measures the work, not the spinning.
    config = attrs.evolve(config, models={
        name: attrs.evolve(spec, settings=attrs.evolve(spec.settings, n_threads=1))
        for name, spec in config.models.items()})
    engine = Engine(config)
    results: dict = {"load_average": os.getloadavg()[0], "models": {}}
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for model in ("fast", "quality"):
        row: dict = {}
        run(engine, model, "Hi", max_tokens=4)  # load and warm
        modes = {
            "plain": dict(max_tokens=48),
            "json_schema": dict(max_tokens=48, response_format=schema_format),
            "tool_required": dict(max_tokens=48, tools=(WEATHER, ADD), tool_choice="required"),
            "logprobs_top5": dict(max_tokens=48, logprobs=True, top_logprobs=5),
        }
        prompt = "Invent a person and describe them."
        for mode, params in modes.items():
            run(engine, model, prompt, **params)  # warm: pages, caches
            _, first = run(engine, model, prompt, **{**params, "max_tokens": 1})
            completion, cpu = run(engine, model, prompt, **params)
            tokens = completion.usage.completion_tokens
            # The prompt's cost (in the one-token run) taken out: per generated token.
            row[f"{mode}_cpu_ms_per_token"] = round(1000 * (cpu - first) / max(1, tokens - 1), 1)
            row[f"{mode}_tokens"] = tokens
        if args.speed_only:
            results["models"][model] = row
            continue
        required, auto = [], []
        for text, expected in TOOL_PROMPTS:
            completion, _ = run(engine, model, text, max_tokens=64, tools=(WEATHER, ADD),
                                tool_choice="required")
            call = completion.tool_calls[0] if completion.tool_calls else None
            required.append({"prompt": text, "expected": expected,
                             "called": call and f"{call.name}({call.arguments})"})
            completion, _ = run(engine, model, text, max_tokens=64, tools=(WEATHER, ADD))
            auto.append({"prompt": text, "expected": expected,
                         "called": bool(completion.tool_calls),
                         "finish": completion.finish_reason})
        row["required_right_function"] = sum(
            1 for r in required if r["expected"] and r["called"]
            and r["called"].startswith(r["expected"] + "("))
        row["required_cases"] = sum(1 for r in required if r["expected"])
        row["auto_called"] = sum(1 for r in auto if r["called"])
        row["required"] = required
        row["auto"] = auto
        json_runs = []
        for text in ("Invent a person. Answer with their name and age as JSON.",
                     "Give me a JSON person: a Spanish name and an age.",
                     "Name and age of a famous scientist, as JSON."):
            completion, _ = run(engine, model, text, max_tokens=80,
                                response_format=schema_format)
            try:
                value = json.loads(completion.text)
                fits = set(value) == {"name", "age"} and isinstance(value["age"], int)
            except ValueError:
                fits = False
            json_runs.append({"text": completion.text, "finish": completion.finish_reason,
                              "fits": fits})
        row["json_schema_runs"] = json_runs
        results["models"][model] = row
    engine.close()
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    print(f"load average at start: {results['load_average']:.1f}")
    for model, row in results["models"].items():
        print(f"\n[{model}]")
        for mode in ("plain", "json_schema", "tool_required", "logprobs_top5"):
            print(f"  {mode:14} {row[mode + '_cpu_ms_per_token']:6.1f} CPU ms per generated "
                  f"token ({row[mode + '_tokens']} tokens)")
        if args.speed_only:
            continue
        print(f"  required: right function {row['required_right_function']}/"
              f"{row['required_cases']}")
        for r in row["required"]:
            print(f"    {r['prompt']!r:40} -> {r['called']}")
        print(f"  auto: called a tool in {row['auto_called']}/{len(row['auto'])}")
        for r in row["json_schema_runs"]:
            print(f"    json_schema: fits={r['fits']} finish={r['finish']} {r['text'][:60]!r}")


if __name__ == "__main__":
    main()
