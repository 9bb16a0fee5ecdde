"""No import cycle in the project's packages (model, pretrain, launch).

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
statement, at module level and inside functions, relative ones resolved, restricted to modules of these
packages. ``from pkg import name`` where ``pkg.name`` is a module is an edge to that module, otherwise to
``pkg``. Importing ``a.b.c`` is an edge to ``a.b.c`` only: that Python runs ``a/__init__.py`` first is not
an edge (a package's ``__init__`` importing its own submodules would otherwise always look like a cycle).
Imports under ``if TYPE_CHECKING:`` never run and are left out; ``importlib.import_module`` calls are not
seen (pretrain/data/make_sample.py uses it on a fixed list of modules).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO

PACKAGES = ("model", "pretrain", "launch")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    lazy: bool  # inside a function (runs when called, not when the module is imported)

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({self.src.replace('.', '/')}:{self.line}, {'in a function' if self.lazy else 'top level'})"


def modules(root: Path = REPO, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the packages (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, lazy) for every import statement, skipping ``if TYPE_CHECKING:`` bodies."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk_one(sub, lazy)
                continue
            yield from walk_one(child, lazy)

    def walk_one(node, lazy):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        yield from walk(node, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


def import_edges(mods: dict[str, Path]) -> list[Edge]:
    edges = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, lazy in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    up = node.level - 1
                    assert up <= len(base) - 1, f"{path}:{node.lineno}: relative import beyond the top package"
                    base = base[:len(base) - up]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in dict.fromkeys(targets):
                # `import a.b.c` where a.b.c is ours; a name in one of our packages that is no module
                # (a typo, a removed module) is a failure of its own below
                if t.split(".")[0] in PACKAGES:
                    edges.append(Edge(name, t, node.lineno, lazy))
    return edges


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None (iterative DFS, deterministic order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(set(graph[start]))))]
        path = [start]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
                continue
            if color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            if color.get(nxt) == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append((nxt, iter(sorted(set(graph[nxt])))))
    return None


def test_cycle_finder_finds_and_clears():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "pretrain" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "pretrain" / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "config.py").write_text("X = 1\n")
    (pkg / "__init__.py").write_text("from .a import f\nfrom . import b\n")
    (pkg / "a.py").write_text("from ..config import X\nfrom .. import config\nfrom . import b\n"
                              "def f():\n    from pretrain.sub.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pretrain.sub.a import f\n"
                              "import pretrain.config, numpy\n")
    mods = modules(tmp_path, ("pretrain",))
    assert set(mods) == {"pretrain", "pretrain.config", "pretrain.sub", "pretrain.sub.a", "pretrain.sub.b"}
    got = {(e.src, e.dst, e.lazy) for e in import_edges(mods)}
    assert got == {("pretrain.sub", "pretrain.sub.a", False), ("pretrain.sub", "pretrain.sub.b", False),
                   ("pretrain.sub.a", "pretrain.config", False), ("pretrain.sub.a", "pretrain.sub.b", False),
                   ("pretrain.sub.a", "pretrain.sub.b", True), ("pretrain.sub.b", "pretrain.config", False)}


def test_no_import_cycle_in_model_pretrain_launch():
    mods = modules()
    edges = import_edges(mods)
    # the walk sees the project: known edges at both levels (a broken walk would find no cycle either)
    seen = {(e.src, e.dst, e.lazy) for e in edges}
    assert ("pretrain.trainer.setup", "pretrain.trainer.checkpoint", False) in seen
    assert ("pretrain.trainer.faults", "pretrain.config", True) in seen
    assert ("pretrain.tokenizer.tokenizer", "pretrain.tokenizer.hf", True) in seen
    assert len(mods) >= 40 and len(edges) >= 80

    unknown = sorted({str(e) for e in edges if e.dst not in mods})
    assert not unknown, "imports of modules that do not exist:\n" + "\n".join(unknown)

    graph = {m: [] for m in mods}
    for e in edges:
        graph[e.src].append(e.dst)
    cycle = find_cycle(graph)
    if cycle:
        by_pair = {}
        for e in edges:
            by_pair.setdefault((e.src, e.dst), []).append(str(e))
        links = ["; ".join(by_pair[(a, b)]) for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(links))
