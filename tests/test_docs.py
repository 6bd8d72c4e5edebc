"""The console examples in README.md and docs/*.md, run as written, compared with their output.

Every fenced ```console block is a transcript: each ``$ `` line is a command, run by bash,
and the lines after it, up to the next ``$ `` line, are what it prints (stdout and stderr
together, as in a terminal). Examples that need a loaded model, a server or a clock are
written as ```sh or ```text blocks instead, and are not run here.

Each document's blocks run in order in one fresh folder (the example folder), with the
built-in config unless a command names another, no plugin or config from the environment,
and ``sarai-router`` and ``python`` from the test's interpreter. In the documents:

* ``/tmp/docs-demo`` stands for the example folder (in commands and output);
* ``/path/to/sarai-router`` stands for the repository (in output);
* ``...`` in an output line matches any text, and a line that is only ``...`` any lines;
* ``<!-- file: PATH -->`` just before a fenced block writes that block to PATH in the
  example folder; ``<!-- file: PATH`` with the content on the following lines up to ``-->``
  writes a file the reader already has (their own config) without showing it;
* ``<!-- cwd: repo -->`` just before a console block runs it from the repository root;
* ``$ cat PATH`` of a file not written yet writes the output shown, then runs as usual.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix()
                                  for p in (REPO / "docs").glob("*.md"))]
EXAMPLE_DIR = "/tmp/docs-demo"
REPO_PLACEHOLDER = "/path/to/sarai-router"


@attrs.frozen
class Command:
    line: int  # where the command is in the document, for messages
    text: str
    expected: tuple[str, ...]


@attrs.frozen
class Block:
    line: int
    cwd_repo: bool
    commands: tuple[Command, ...]


@attrs.frozen
class Document:
    name: str
    files: tuple[tuple[int, str, str], ...]  # (line, path, content), in document order
    blocks: tuple[Block, ...]


def parse(name: str) -> Document:
    lines = (REPO / name).read_text(encoding="utf-8").splitlines()
    files: list[tuple[int, str, str]] = []
    blocks: list[Block] = []
    pending_file: str | None = None
    cwd_repo = False
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = re.fullmatch(r"<!-- (file|cwd): (\S+)( -->)?", line.strip())
        if directive:
            kind, value, closed = directive.groups()
            if kind == "cwd":
                assert value == "repo" and closed, f"{name}:{i + 1}: unknown directive"
                cwd_repo = True
            elif closed:
                pending_file = value
            else:  # hidden file content, up to the closing -->
                end = lines.index("-->", i + 1)
                files.append((i + 1, value, "\n".join(lines[i + 1:end]) + "\n"))
                i = end
            i += 1
            continue
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = lines.index("```", i + 1)
            body = lines[i + 1:end]
            if pending_file is not None:
                files.append((i + 1, pending_file, "\n".join(body) + "\n"))
            elif fence.group(1) == "console":
                blocks.append(Block(i + 1, cwd_repo, tuple(_commands(body, i + 2))))
            pending_file, cwd_repo = None, False
            i = end + 1
            continue
        if line.strip():
            assert pending_file is None, f"{name}:{i + 1}: a file directive not before a block"
            assert not cwd_repo, f"{name}:{i + 1}: a cwd directive not before a console block"
        i += 1
    return Document(name, tuple(files), tuple(blocks))


def _commands(body: list[str], first_line: int) -> list[Command]:
    commands: list[Command] = []
    for offset, text in enumerate(body):
        if text.startswith("$ "):
            commands.append(Command(first_line + offset, text[2:], ()))
        else:
            assert commands, f"line {first_line + offset}: output before any command"
            last = commands[-1]
            commands[-1] = attrs.evolve(last, expected=last.expected + (text,))
    return commands


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """``expected`` (with ``...`` placeholders) against ``actual``, line by line."""
    pattern = []
    for line in expected:
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(".*?".join(map(re.escape, line.rstrip().split("..."))) + r"\n")
    return re.fullmatch("".join(pattern), "".join(a.rstrip() + "\n" for a in actual)) is not None


def clean_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def shell_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARAI_ROUTER_")}
    # The models dir stays where the real models are; nothing here loads them.
    env["SARAI_ROUTER_MODELS_DIR"] = os.environ.get("SARAI_ROUTER_MODELS_DIR", "") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sarai-router" / "models")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr interleaved as in a terminal
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    return env


@pytest.mark.parametrize("name", DOCUMENTS)
def test_console_examples_print_what_the_docs_show(name, tmp_path):
    document = parse(name)
    folder = tmp_path / "docs-demo"
    folder.mkdir()
    env = shell_env(tmp_path)
    files = list(document.files)
    failures = []
    for block in document.blocks:
        # Files shown before this block exist when it runs.
        while files and files[0][0] < block.line:
            _, path, content = files.pop(0)
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        cwd = REPO if block.cwd_repo else folder
        for command in block.commands:
            text = command.text.replace(EXAMPLE_DIR, str(folder))
            shown = re.fullmatch(r"(?:cd \S+ && )?cat (\S+)", command.text)
            if shown and not (folder / shown.group(1)).exists():
                (folder / shown.group(1)).parent.mkdir(parents=True, exist_ok=True)
                (folder / shown.group(1)).write_text("\n".join(command.expected) + "\n",
                                                     encoding="utf-8")
            result = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, timeout=120,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            output = (result.stdout.replace(str(folder), EXAMPLE_DIR)
                      .replace(str(REPO), REPO_PLACEHOLDER))
            actual = clean_lines(output)
            expected = tuple(clean_lines("\n".join(command.expected)))
            if not matches(expected, actual):
                failures.append(f"{name}:{command.line}: $ {command.text}\n--- the docs show:\n"
                                + "\n".join(expected) + "\n--- it prints:\n" + "\n".join(actual))
    assert not failures, "\n\n".join(failures)


def test_every_transcript_says_whether_it_is_run():
    """A ``$ `` transcript in an untagged block is neither run nor marked as not runnable:
    it is a ```console block (run here) or a ```text / ```sh one (a model, server or clock)."""
    untagged = []
    for name in DOCUMENTS:
        fence = None
        for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1):
            opened = re.match(r"^```(\w*)\s*$", line)
            if opened:
                fence = None if fence is not None else opened.group(1)
            elif fence == "" and line.startswith("$ "):
                untagged.append(f"{name}:{number}: {line}")
    assert untagged == [], "\n".join(untagged)


def test_the_examples_are_found():
    blocks = {name: parse(name).blocks for name in DOCUMENTS}
    commands = [c.text for bs in blocks.values() for b in bs for c in b.commands]
    assert len(blocks["README.md"]) >= 1 and len(blocks["docs/plugins.md"]) >= 4
    assert len(blocks["docs/configuration.md"]) >= 3
    assert any("config show" in c for c in commands)
    assert any(c.startswith("sarai-router --config echo.toml query") for c in commands)
    assert any(re.search(r"\bplugins$", c) for c in commands)
