"""The layout's rules, checked on the source: arrows point from the front ends to the core.

* no import cycle between the package's modules, counting imports under TYPE_CHECKING and
  inside functions (a loop there still ties the modules together);
* the core (everything outside ``cli/``, ``serving/``, ``bench/``, ``testing/`` and
  ``default_plugins/``) never imports a front end or a default plugin, compares a backend's
  name, or catches ``SystemExit``;
* backend-only code (the GGUF reader, the llama-server installer, the whisper bundle...)
  lives in ``default_plugins/``: the core neither defines it nor names its modules;
* nothing outside ``cli/`` exits the process.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sarai_router"
FRONT_ENDS = ("cli", "serving", "bench", "testing")  # testing: the kit drives the CLI
PLUGINS = ("default_plugins",)


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def imports_of(name: str, file: Path, known: dict[str, Path], *,
               type_checking: bool = False) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skipped = set() if type_checking else _type_checking_nodes(tree)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names]
            targets.update(c if c in known else module for c in candidates)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, file, known, type_checking=type_checking)
            for name, file in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere():
    assert cycles(import_graph(type_checking=True)) == []


def _layer(module: str) -> str:
    if module == "sarai_router.__main__":  # `python -m sarai_router`: the CLI's door
        return "front"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FRONT_ENDS:
        return "front"
    if len(parts) > 1 and parts[1] in PLUGINS:
        return "plugin"
    return "core"


def test_core_imports_no_front_end_and_no_default_plugin():
    for module, targets in import_graph().items():
        if _layer(module) != "core":
            continue
        wrong = sorted(t for t in targets if _layer(t) != "core")
        assert not wrong, f"{module} (core) imports {wrong}"


def _script_guards(tree: ast.AST) -> set[int]:
    """Nodes under ``if __name__ == "__main__":``: a module's own command-line door."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            inside.update(id(child) for child in ast.walk(node))
    return inside


def test_core_never_compares_a_backend_name_nor_handles_exit():
    for module, file in modules().items():
        if _layer(module) != "core":
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        script = _script_guards(tree)
        for node in ast.walk(tree):
            if id(node) in script:
                continue
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                assert "backend" not in text or not any(
                    isinstance(c, ast.Constant) and isinstance(c.value, str)
                    for c in node.comparators), f"{module}: {text}"
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                raise AssertionError(f"{module} mentions SystemExit at line {node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "exit" and \
                    ast.unparse(node.value) == "sys":
                raise AssertionError(f"{module} calls sys.exit at line {node.lineno}")


def test_only_the_cli_exits_the_process():
    for module, file in modules().items():
        if module.startswith("sarai_router.cli") or module == "sarai_router.__main__":
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        script = _script_guards(tree)
        for node in ast.walk(tree):
            if id(node) in script:
                continue
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Name)) else ""
            assert not text.startswith("sys.exit(") and text != "SystemExit", (
                f"{module}:{getattr(node, 'lineno', '?')}: {text}")


#: Backend-only code: it lives in ``default_plugins/``, beside the backend that needs it.
BACKEND_ONLY_NAMES = ("gguf_problems", "whisper_vocabulary", "BUNDLES", "read_info",
                      "estimate_ram", "find_llama_server", "build_llama_server",
                      "repack_weights", "cpu_has_amx")
#: Backend-only modules: the GGUF reader, the llama-server installer, the GGUF backends' base.
BACKEND_ONLY_MODULES = ("gguf_info", "llama_server_install", "gguf_backend")


def _names_a_backend_only_module(tree: ast.AST) -> list[str]:
    """Where ``tree`` names a backend-only module: an import of it, or a string that is
    its name or dotted path (``importlib.import_module("...gguf_info")``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            texts = [node.module or ""] + [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            texts = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts = [node.value] if " " not in node.value else []
        else:
            continue
        found += [f"line {node.lineno}: {text}" for text in texts
                  if set(text.split(".")) & set(BACKEND_ONLY_MODULES)]
    return found


def test_backend_only_modules_are_not_in_the_core_nor_named_by_it():
    for module, file in modules().items():
        if _layer(module) != "core":
            continue
        assert module.rpartition(".")[2] not in BACKEND_ONLY_MODULES, (
            f"{module} is backend-only: it belongs in default_plugins/")
        wrong = _names_a_backend_only_module(ast.parse(file.read_text(encoding="utf-8")))
        assert not wrong, f"{module} (core) names a backend-only module: {wrong}"


def test_the_backend_only_module_finder_finds_each_way_of_naming_one():
    tree = ast.parse("from .gguf_info import read_info\n"
                     "import sarai_router.default_plugins.llama_server_install\n"
                     "importlib.import_module('sarai_router.default_plugins.gguf_backend')\n"
                     "from .default_plugins import gguf_info\n"
                     "text = 'gguf_info is a word in a sentence'\n")
    assert sorted(hit.split(":")[0] for hit in _names_a_backend_only_module(tree)) == [
        "line 1", "line 2", "line 3", "line 4"]


def test_backend_only_code_is_not_in_the_core():
    for module, file in modules().items():
        if _layer(module) != "core":
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        defined = {node.name for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {target.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(target, ast.Name)}
        wrong = sorted(defined & set(BACKEND_ONLY_NAMES))
        assert not wrong, f"{module} (core) defines backend-only {wrong}"
