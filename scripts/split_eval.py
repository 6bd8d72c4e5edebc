"""Split a pooled labelled set into dev (60 %) and test (40 %), stratified by kind and language.

    python scripts/split_eval.py POOL.jsonl [MORE.jsonl ...] --out eval/

Within each (kind, lang) stratum the cases are ordered by the sha1 of their JSON line and the
first 40 % (rounded) go to test, so re-running on ``cat routing-dev.jsonl routing-test.jsonl``
gives the same split. Cases marked ``"source": "quoted"`` (the examples quoted when the set was asked for)
always go to test, so nothing is tuned on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from pathlib import Path

TEST_SHARE = 0.4


def split(lines: list[str]) -> tuple[list[str], list[str]]:
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    forced: list[str] = []
    for line in lines:
        case = json.loads(line)
        if case.get("source") == "quoted":
            forced.append(line)
        else:
            strata[(case.get("kind", ""), case.get("lang", ""))].append(line)
    dev, test = [], list(forced)
    for key in sorted(strata):
        ordered = sorted(strata[key], key=lambda s: hashlib.sha1(s.encode()).hexdigest())
        n_test = round(len(ordered) * TEST_SHARE)
        test.extend(ordered[:n_test])
        dev.extend(ordered[n_test:])
    order = {line: i for i, line in enumerate(lines)}  # keep the authoring order in each file
    return sorted(dev, key=order.get), sorted(test, key=order.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("eval"))
    args = parser.parse_args()
    lines = [line for path in args.pool for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    dev, test = split(lines)
    for name, part in (("routing-dev.jsonl", dev), ("routing-test.jsonl", test)):
        (args.out / name).write_text("".join(line + "\n" for line in part), encoding="utf-8")
        print(f"{name}: {len(part)} cases")


if __name__ == "__main__":
    main()
