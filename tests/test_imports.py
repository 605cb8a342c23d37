"""The import graph of ``experiments`` and ``smoothness``: no circles, no private names borrowed across modules, and
the library never imports the application (docs/ARCHITECTURE.md).

Every import counts, at module level or inside a function, relative or absolute. ``from pkg import name`` is an import
of the submodule ``pkg.name`` when there is one, else of ``pkg/__init__``."""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

PACKAGES = ("experiments", "smoothness")


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module and package of ``PACKAGES``."""
    found = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        found[pkg] = Path(spec.origin)
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=pkg + "."):
            path = Path(info.module_finder.path) / info.name.rsplit(".", 1)[-1]
            found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


MODULES = _modules()


def _imports(name: str, path: Path):
    """Yield (imported module, imported name or None, line) for each intra-package import in ``name``'s source."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (module, alias.name, node.lineno)


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(name, path) if m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=len, reverse=True)


def test_every_module_is_found():
    assert {"experiments.cli", "experiments.analysis.figures", "smoothness.operator"} <= set(MODULES)


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles (modules that import one another, directly or not): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    borrowed = [f"{name}:{line} imports {imported} from {module}"
                for name, path in MODULES.items() for module, imported, line in _imports(name, path)
                if imported is not None and imported.startswith("_") and module != name]
    assert not borrowed, "private names imported from another module (make them public in their home):\n" + \
        "\n".join(borrowed)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] == "smoothness"))
def test_library_never_imports_the_application(name):
    assert not [m for m, _, _ in _imports(name, MODULES[name]) if m.split(".")[0] == "experiments"]


def test_cycle_finder_reports_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
