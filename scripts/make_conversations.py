"""Chain labelled single requests into synthetic conversations, for measuring ``sticky_turns``.

    python scripts/make_conversations.py eval/routing-test.jsonl --turns 5 \
        --out eval/routing-conversations.jsonl

The cases are ordered by the sha1 of their JSON line (the files themselves are in authoring
order, one kind after another) and every ``--turns`` consecutive ones become the turns of
one conversation (``"conversation": "c001"``, ...). Each keeps its own label, the rule's
answer for that turn alone, and gains ``"source": "FILE:LINE"``. The topics of a
conversation's turns are unrelated: the file is a stress test of switching between models,
not a sample of real conversations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def conversations(lines: list[tuple[str, str]], turns: int) -> list[str]:
    ordered = sorted(lines, key=lambda item: hashlib.sha1(item[1].encode()).hexdigest())
    width = len(str(-(-len(ordered) // turns)))
    out = []
    for index, (where, line) in enumerate(ordered):
        case = json.loads(line)
        case["conversation"] = f"c{index // turns + 1:0{max(width, 3)}d}"
        case["source"] = where
        out.append(json.dumps(case, ensure_ascii=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = []
    for path in args.cases:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                lines.append((f"{path.name}:{number}", line))
    result = conversations(lines, args.turns)
    args.out.write_text("".join(line + "\n" for line in result), encoding="utf-8")
    print(f"{args.out}: {len(result)} turns in {-(-len(result) // args.turns)} conversations")


if __name__ == "__main__":
    main()
