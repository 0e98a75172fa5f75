"""The package's shape: its import graph has no cycle, the config engine imports nothing of
mmray, and no two modules share a file name.

The graph is built from the source (ast), not by importing: an edge is every `import mmray...` /
`from mmray... import` in a module, at any depth (a function-local import is still a dependency),
except under `if TYPE_CHECKING:`. Importing `mmray.a.b` from `mmray.a.c` is an edge to `mmray.a.b`
only: Python runs the package `mmray.a` first, but that is the package's own business, not a
dependency of `c`.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmray"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skip.update(id(sub) for sub in ast.walk(node))
    return skip


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the mmray modules it imports."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}

    def resolve(name: str) -> str:  # `from mmray.a import b`: b is a module or a name in mmray.a
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in files else ""

    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names if a.name.startswith("mmray"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, *([base] if base else [])])
                if base.startswith("mmray"):
                    targets.update(resolve(f"{base}.{a.name}") for a in node.names)
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "mmray"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from mmray.sub.a import A\n")
    (pkg / "sub" / "a.py").write_text("from mmray.sub import B\nA = 1\n")  # a -> the package -> a
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from mmray.c import C\n")
    (pkg / "c.py").write_text("def f():\n    from mmray.b import x\n")
    graph = import_graph(pkg)
    assert graph["mmray.sub.a"] == {"mmray.sub"} and graph["mmray.sub"] == {"mmray.sub.a"}
    assert graph["mmray.b"] == set()  # TYPE_CHECKING imports are not edges
    assert graph["mmray.c"] == {"mmray.b"}  # function-local imports are
    assert cycles(graph) == [["mmray.sub", "mmray.sub.a"]]


def test_mmray_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in mmray (modules of each cycle):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_config_engine_imports_nothing_of_mmray():
    assert import_graph()["mmray.config"] == set()


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert not [n for n, k in names.items() if k > 1]
