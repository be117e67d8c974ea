"""No import cycle inside ``vllm_dar``: read every module of every package ``pyproject.toml`` installs, collect the
``vllm_dar`` modules it imports (at the top and inside functions alike: a lazy import that points back is still a
cycle, two modules that can be neither read nor loaded one without the other) and look for a cycle."""
from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, pathlib.Path]:
    """Module name -> source file, for the packages listed in pyproject.toml (``kernels/`` and ``patches/``
    install as ``vllm_dar.kernels`` and ``vllm_dar.patches``; the installed finder knows where each lives)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {}
    for package in packages:
        (location,) = importlib.util.find_spec(package).submodule_search_locations
        for path in sorted(pathlib.Path(location).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> dict[str, int]:
    """The modules of ``modules`` that module ``name`` imports -> the line of the first such import."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:  # `import a.b.Name` style paths: their nearest module
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module, else pkg itself
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno)
    return edges


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_each_import():
    """The graph reader itself: relative, absolute and lazy imports, of modules and of names."""
    modules = package_modules()
    plugin = imported("vllm_dar.plugin.model", modules["vllm_dar.plugin.model"], modules)
    assert "vllm_dar.plugin" in plugin  # `from . import CUDA_BACKEND`, inside a function
    assert "vllm_dar.config" in plugin and "vllm_dar.checkpoint" in plugin
    assert {"vllm_dar.plugin", "vllm_dar.patches.dar_backend_selection"} <= set(
        imported("vllm_dar", modules["vllm_dar"], modules))
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_vllm_dar():
    modules = package_modules()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    found = cycles(graph)
    where = [[f"{a} -> {b} ({modules[a].name}:{graph[a][b]})" for a in c for b in graph[a] if b in c]
             for c in found]
    assert not found, where
