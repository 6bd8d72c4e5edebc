"""Rewrite the output of the docs' ```console examples with what the commands print now.

tests/test_docs.py runs every console example and fails when its output changed. After a
change that alters output on purpose (a new default plugin in `plugins`, a new wording),
run this, then read `git diff docs/ README.md` before committing: it only rewrites
examples whose shown output has no ``...`` placeholder, and never touches commands.

    python scripts/update_doc_examples.py [DOCUMENT...]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import test_docs  # noqa: E402  (the parser and the environment the test uses)


def update(name: str) -> int:
    document = test_docs.parse(name)
    lines = (REPO / name).read_text(encoding="utf-8").splitlines()
    replacements: list[tuple[int, int, list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs-demo"
        folder.mkdir()
        env = test_docs.shell_env(Path(tmp))
        files = list(document.files)
        for block in document.blocks:
            while files and files[0][0] < block.line:
                _, path, content = files.pop(0)
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_text(content, encoding="utf-8")
            cwd = REPO if block.cwd_repo else folder
            for command in block.commands:
                text = command.text.replace(test_docs.EXAMPLE_DIR, str(folder))
                shown = re.fullmatch(r"(?:cd \S+ && )?cat (\S+)", command.text)
                if shown and not (folder / shown.group(1)).exists():
                    # As the test does: the file shown is the file the reader has.
                    (folder / shown.group(1)).parent.mkdir(parents=True, exist_ok=True)
                    (folder / shown.group(1)).write_text("\n".join(command.expected) + "\n",
                                                         encoding="utf-8")
                result = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, timeout=120,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                output = (result.stdout.replace(str(folder), test_docs.EXAMPLE_DIR)
                          .replace(str(REPO), test_docs.REPO_PLACEHOLDER))
                actual = test_docs.clean_lines(output)
                expected = tuple(test_docs.clean_lines("\n".join(command.expected)))
                if test_docs.matches(expected, actual) or any("..." in e for e in expected):
                    continue
                start = command.line  # 1-based line of the command: output follows it
                replacements.append((start, start + len(command.expected), actual))
    for start, end, actual in sorted(replacements, reverse=True):
        lines[start:end] = actual
    if replacements:
        (REPO / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(replacements)


def main() -> None:
    for name in sys.argv[1:] or test_docs.DOCUMENTS:
        count = update(name)
        if count:
            print(f"{name}: {count} example(s) rewritten")


if __name__ == "__main__":
    main()
