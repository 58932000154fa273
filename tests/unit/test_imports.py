"""Imports run one way: no circle among trainer's modules (function-local imports included), and the light modules
load without torch or the data package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import trainer

ROOT = Path(trainer.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module under trainer/, by dotted name (a package by its __init__)."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` a module imports, at module level and inside functions; `if TYPE_CHECKING:` blocks
    never run.

    `import A.b` and `from A import b` import the module A.b when there is one; else (b is a name in A) A."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(resolve(f"{base}.{alias.name}") for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found - {""}  # "": no module of `known` (a third-party one)


def import_graph() -> dict[str, set[str]]:
    """module -> the trainer modules it imports (third-party modules are no nodes: their imports cannot circle)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = imported_modules(tree, name, path.name == "__init__.py", set(known))
        graph[name] = {m for m in imported if m.split(".")[0] == "trainer" and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that import one another in a circle (Tarjan's strongly connected components), with one
    circle through it: (the group's modules, a path from the first of them back to itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(group, _circle(graph, group)) for group in groups]


def _circle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start, members = group[0], set(group)
    paths = {w: [start, w] for w in sorted(graph[start] & members)}
    queue = list(paths)
    while start not in paths:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return paths[start]


def _show(found: list[tuple[list[str], list[str]]]) -> str:
    return "\n".join(f"{', '.join(group)}: e.g. {' -> '.join(circle)}" for group, circle in found)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "trainer.data" in graph["trainer.train.engine"]  # from trainer import data
    assert "trainer" not in graph["trainer.train.engine"]  # ... is the module trainer.data, not the package trainer
    assert "trainer" in graph["trainer.cli"]  # from trainer import __version__: a name in the package
    assert "trainer.data.dali" in graph["trainer.data.backends"]  # from trainer.data import dali
    assert "trainer.data" not in graph["trainer.data.backends"]
    assert "trainer.run.checkpointer" in graph["trainer.train.engine"]  # from trainer.run.checkpointer import ...
    assert "trainer.train.engine" in graph["trainer.cli"]  # a function-local import
    assert "trainer.data.convert" in graph["trainer.cli"]  # from trainer.data.convert import ... (local)
    assert "trainer.data" not in graph["trainer.run.weights"]  # only under `if TYPE_CHECKING:`
    assert {"trainer.data.loaders", "trainer.data.splits"} <= graph["trainer.data"]  # a package's __init__


def test_relative_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import dali\n"
        "from .decode import x\n"
        "from ..train import model\n"
        "if TYPE_CHECKING:\n"
        "    from trainer.train import engine\n"
        "def f():\n"
        "    import trainer.train.optim\n"
    )
    known = {"trainer", "trainer.data", "trainer.data.dali", "trainer.data.decode", "trainer.train"}
    known |= {"trainer.train.model", "trainer.train.optim"}
    found = imported_modules(ast.parse(source), "trainer.data.loaders", False, known | {"trainer.train.engine"})
    assert found == {"trainer.data.dali", "trainer.data.decode", "trainer.train.model", "trainer.train.optim"}


def test_cycles_are_found_and_shown():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [(["a", "b", "c"], ["a", "b", "a"])]
    assert _show(cycles(graph)) == "a, b, c: e.g. a -> b -> a"


def test_no_import_circle():
    """No circle anywhere in trainer/, function-local imports included (a lazy import that closes one counts)."""
    found = cycles(import_graph())
    assert not found, "import circles:\n" + _show(found)


def test_light_modules_load_without_torch_or_the_data_package():
    """The CLI resolves and checks a run's config (and its resume) before torch loads: seconds saved per launch."""
    code = (
        "import sys\n"
        "import trainer.config, trainer.run.layout, trainer.run.resume, trainer.run.rundirs\n"
        "heavy = [m for m in ('torch', 'trainer.data') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_test_module_has_its_own_basename():
    """pytest imports test modules by basename (rootdir/prepend mode, no __init__.py): two test_x.py under tests/
    break the whole suite's collection, which running one folder at a time does not show."""
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT.parent / "tests").rglob("*.py")):
        if path.name != "conftest.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT.parent)))
    assert not {name: paths for name, paths in seen.items() if len(paths) > 1}
