"""The package's layering, read from its source: no module imports its own
importer (directly or through others, module-level or inside a function),
and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: import name -> folder, as pyproject's package-dir maps them
PACKAGES = {"treesched": "treesched", "treesched.ops": "ops", "treesched.backends": "backends",
            "treesched.cli": "cli"}


def _modules() -> dict:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name, path, modules):
    """``(imported module, imported names, line)`` of every import in ``path``."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                module = ".".join(parts[:len(parts) - node.level + 1])
                if node.module:
                    module += "." + node.module
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if submodules:
                for sub in submodules:
                    yield sub, [], node.lineno
            else:
                yield module, names, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def test_no_module_imports_its_importer():
    modules = _modules()
    assert "treesched.executor" in modules and "treesched.backends.cupy_backend" in modules
    graph = {name: {module for module, _, _ in _imports(name, path, modules)
                    if module in modules and module != name}
             for name, path in modules.items()}
    cycles = []

    def visit(node, trail, state):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt], state)
        state[node] = "done"

    state: dict = {}
    for name in sorted(graph):
        if name not in state:
            visit(name, [name], state)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_cross_modules():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for module, names, line in _imports(name, path, modules):
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}.{imported}")
    assert not offenders, "\n".join(offenders)
