"""The package's import graph: no cycle among medexplain modules, and the library never imports the CLI.

Imports are read from the source with ``ast`` (module-level and function-level alike), so an import
hidden inside a function to dodge a cycle counts as an import.
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "medexplain"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    base = base if is_pkg else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module) if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from . import x` imports x
            for t in targets:
                # the deepest medexplain module the name refers to
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("medexplain") and t != name:
                    graph[name].add(t)
    # importing a.b.c runs a/__init__ and a/b/__init__ first; those edges are implied, not listed
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph):
    """Drop edges into a package's ``__init__`` from its own submodules (``from . import x`` inside
    ``pkg/a.py`` names the package, which Python has already initialised): not a cycle of imports."""
    return {m: {t for t in deps if not (m.startswith(t + "."))} for m, deps in graph.items()}


def test_graph_sees_known_imports():
    g = import_graph()
    assert "medexplain.engine.core" in g["medexplain.engine.explain"]
    assert "medexplain.methods" in g["medexplain.engine.explain"]
    assert any(t.startswith("medexplain.") for t in g["medexplain.cli.explain"])


def test_no_import_cycle():
    cycles = _cycles(_without_package_inits(import_graph()))
    assert cycles == [], f"import cycles among medexplain modules: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_library_never_imports_the_cli():
    offenders = {m: sorted(t for t in deps if t == "medexplain.cli" or t.startswith("medexplain.cli."))
                 for m, deps in import_graph().items()
                 if not m.startswith("medexplain.cli") and m != "medexplain.__main__"}   # python -m medexplain: the CLI
    offenders = {m: d for m, d in offenders.items() if d}
    assert offenders == {}, f"library modules importing the CLI: {offenders}"
