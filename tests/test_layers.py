"""The package's layers import only downward, with no cycles and no hidden in-function imports of our own code.

    base (errors, config, logs, metrics, probe) -> data -> model -> train | infer -> tune -> bench -> cli

``train`` and ``infer`` are siblings: neither imports the other. ``data_tools`` (dataset builders) sits
beside ``data`` and may import only the base and ``data``. Third-party packages are free to be imported
lazily (heavy or optional ones); qanchor's own modules are imported at the top of a module, where a
reader sees the dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"errors": 0, "faults": 0, "config": 0.5, "logs": 0.5, "metrics": 0.5, "probe": 0.5, "": 0.5, "data": 1, "model": 2, "train": 3, "infer": 3,
        "tune": 4, "bench": 5, "cli": 6}


def _layer(module: str) -> str:
    """``qanchor.infer.api`` -> ``infer``; ``qanchor`` -> ``""``; ``data_tools.synth`` -> ``data_tools``."""
    parts = module.split(".")
    if parts[0] == "data_tools":
        return "data_tools"
    return parts[1] if len(parts) > 1 else ""


KNOWN: set[str] = set()


def _modules() -> list[tuple[str, Path]]:
    out = []
    for base in ("qanchor", "data_tools"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out.append((name, path))
    return out


def _imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported qanchor / data_tools module, line, at module top level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            # `from pkg import module` depends on that module, not on the package
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in KNOWN else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("qanchor", "data_tools"):
                out.append((t, node.lineno, id(node) in top))
    return out


MODULES = _modules()
KNOWN = {n for n, _ in MODULES}


def test_modules_found():
    names = {n for n, _ in MODULES}
    assert {"qanchor.cli", "qanchor.model.prefix_cache", "qanchor.data.pipeline", "data_tools.synth"} <= names


@pytest.mark.parametrize("name,path", MODULES, ids=[n for n, _ in MODULES])
def test_imports_go_down_only(name, path):
    layer = _layer(name)
    for target, line, at_top in _imports(path, name):
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        assert at_top, f"{where} inside a function: import qanchor's own modules at the top of the module"
        other = _layer(target)
        if layer == "data_tools":
            assert other in ("data_tools", "data") or RANK.get(other, 9) < 1, f"{where}: data_tools may use the base and data only"
            continue
        assert other != "data_tools" or layer == "cli", f"{where}: only the CLI builds datasets with data_tools"
        if other == "data_tools" or other == layer or target == "qanchor":
            continue
        assert RANK[other] < RANK[layer], f"{where}: layer '{layer}' must not import '{other}' (only lower layers)"


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(path, name) if t in KNOWN and t != name} for name, path in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
