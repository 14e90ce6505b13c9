"""The floor plan of docs/architecture.md, checked on the source tree: imports run one way (no
module imports one that imports it back), folders keep their layer, modules and functions stay a
size a reader can hold, and the scan spec is read through its type only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "stemstream"

# Lower layers never import higher ones (docs/architecture.md, "Layers").
LAYERS = {
    "core": 0,
    "transport": 1,
    "formats": 2,
    "counting": 3,
    "analysis": 3,
    "sources": 3,
    "pipeline": 4,
    "deploy": 5,
    "web": 5,
    "cli": 6,
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The stemstream modules ``path`` imports, anywhere in the file (function-level included)."""
    tree = ast.parse(path.read_text())
    names = set()
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n in modules and n.startswith("stemstream")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_folder_imports_a_higher_layer():
    wrong = []
    for module, imported in _graph().items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    # Tarjan's strongly connected components: any component of 2+ modules is a cycle.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            # a package's __init__ that re-exports its own modules is not a loop back
            if v.startswith(w + ".") or w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_and_functions_stay_readable():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                compiled = any("njit" in ast.unparse(d) or "jit" in ast.unparse(d) for d in node.decorator_list)
                if length > MAX_FUNCTION_LINES and not compiled:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "over the size limits:\n" + "\n".join(too_long)


def test_scan_specs_are_read_through_their_type():
    pattern = re.compile(r"\bspec\[|\bspec\.get\(")
    found = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py") if path.name != "scan_spec.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "untyped scan-spec reads: " + ", ".join(found)


def _code_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings]


def test_detector_facts_are_written_once():
    """The frame size (576), the module count where it means modules (the data path's folders)
    and the silence limit live in core (detector, config), nowhere else in code."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        if relative in ("core/detector.py", "core/config.py"):
            continue
        text = path.read_text()
        tree = ast.parse(text)
        found += [f"{relative}:{c.lineno}: 576" for c in _code_constants(tree) if c.value == 576]
        if relative.split("/")[0] in ("pipeline", "deploy", "web", "cli", "formats", "transport"):
            found += [f"{relative}:{n.lineno}: range(4)" for n in ast.walk(tree)
                      if isinstance(n, ast.Call) and ast.unparse(n) == "range(4)"]
        found += [f"{relative}: max(10 * heartbeat_s, 5.0)" for _ in re.finditer(r"max\(10 \* [\w.]*heartbeat_s, 5\.0\)", text)]
    assert not found, "\n".join(found)


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md is how a reader finds their room: a module missing from it is lost."""
    page = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", page, flags=re.MULTILINE))
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert modules - listed == set(), "not in docs/architecture.md"
    assert listed - modules == set(), "in docs/architecture.md but gone"
