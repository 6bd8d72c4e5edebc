"""Where llama.cpp's grammar work breaks, and what it costs: the figures behind the limits
in ``default_plugins/grammar_limits.py`` (docs/RELIABILITY.md, "Grammars").

- ``overflow``: for ``maxLength`` N (N nested groups once converted), whether llama.cpp
  parses the grammar, refuses it, or crashes the process (SIGSEGV), on a thread with the
  default 8 MB stack (``--stack-mb`` to try another). Each N runs in a child process, since
  a crash takes the process down. Uses llama-cpp-python's own converter, unguarded.
- ``per-token``: the sampling time of each token (what ``max_token_sampling_seconds``
  bounds) for a schema, with the fast model, the grammar built by the router's own
  converter with its limits off.

    python scripts/measure_grammar.py overflow [--sizes 1000,1020,15000,18500,18750]
    python scripts/measure_grammar.py per-token --pattern '^(a?){32}a{32}$' [--tokens 12]
    python scripts/measure_grammar.py per-token --optional 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import attrs

from sarai_router.config import default_models_dir

FAST = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CHILD = r"""
import json, sys, threading, llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf
size, stack_mb, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
quiet = llama_cpp.llama_log_callback(lambda *a: None)
llama_cpp.llama_log_set(quiet, None)
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = llama_cpp.llama_model_load_from_file(path.encode(), params)
vocab = llama_cpp.llama_model_get_vocab(model)
grammar = json_schema_to_gbnf(json.dumps({"type": "string", "maxLength": size}))
def parse():
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    print("parsed" if sampler else "refused", len(grammar), flush=True)
threading.stack_size(stack_mb << 20)
thread = threading.Thread(target=parse)
thread.start()
thread.join()
"""


def overflow(sizes: list[int], stack_mb: int) -> None:
    path = str(default_models_dir() / FAST)
    print(f"maxLength N -> llama.cpp on a {stack_mb} MB thread stack")
    for size in sizes:
        started = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", _CHILD, str(size), str(stack_mb), path],
                               capture_output=True, text=True)
        seconds = time.perf_counter() - started
        words = child.stdout.split()
        if child.returncode < 0:
            outcome = f"crashed (signal {-child.returncode})"
        elif words:
            outcome = f"{words[0]} (grammar {int(words[1]) / 1024:.1f} KB)"
        else:
            outcome = f"exit {child.returncode}"
        print(f"  {size:>7}: {outcome}, {seconds:.2f} s")


def per_token(schema: dict, tokens: int) -> None:
    import llama_cpp

    from sarai_router.default_plugins import grammar_limits
    from sarai_router.loading import load_config
    from sarai_router.default_plugins.llama_cpp import LlamaCppBackend, route_llama_logs_to_logging
    from sarai_router.default_plugins.llama_cpp_features import schema_grammar

    route_llama_logs_to_logging(llama_cpp)
    # The limits off: this measures what they keep out.
    grammar_limits.check_schema = lambda *_: None
    grammar_limits.check_grammar_text = lambda *_: None
    import sarai_router.default_plugins.llama_cpp_features as features
    features.check_schema = features.check_grammar_text = lambda *_: None
    grammar = schema_grammar(schema, "schema")
    # Loaded as the backend loads it (one thread; no weight repacking on AMX CPUs).
    spec = load_config(None).models["fast"]
    spec = attrs.evolve(spec, settings=attrs.evolve(spec.settings, n_threads=1))
    llm = LlamaCppBackend().load(spec).llama
    times: list[float] = []
    sample = type(llm).sample.__get__(llm)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        token = sample(*args, **kwargs)
        times.append(time.perf_counter() - started)
        return token

    llm.sample = timed
    started = time.perf_counter()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "hola"}],
                                     max_tokens=tokens, temperature=0,
                                     grammar=llama_cpp.LlamaGrammar.from_string(grammar))
    total = time.perf_counter() - started
    text = out["choices"][0]["message"]["content"]
    print(f"grammar {len(grammar) / 1024:.1f} KB; {len(times)} tokens in {total:.1f} s: "
          f"{text[:60]!r}")
    print("sampling s per token:", " ".join(f"{t:.2f}" for t in times))
    print(f"slowest {max(times):.2f} s, mean {sum(times) / len(times):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overflow")
    over.add_argument("--sizes", default="1000,1020,15000,18500,18750,20000")
    over.add_argument("--stack-mb", type=int, default=8)
    token = sub.add_parser("per-token")
    token.add_argument("--pattern")
    token.add_argument("--optional", type=int, help="an object of N optional properties")
    token.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    if args.command == "overflow":
        overflow([int(n) for n in args.sizes.split(",")], args.stack_mb)
    elif args.optional:
        per_token({"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                                    for i in range(args.optional)}},
                  args.tokens)
    else:
        per_token({"type": "string", "pattern": args.pattern or "^(a?){32}a{32}$"},
                  args.tokens)


if __name__ == "__main__":
    main()
