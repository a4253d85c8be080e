"""Imports go one way: runtime -> compiler -> dag, runtime -> channels (nested imports count);
no module imports itself through others (no cycles), and none reaches ours through importlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"dag": set(), "compiler": {"dag"}, "channels": set(),
           "runtime": {"dag", "compiler", "channels"}}
LAYERS = set(ALLOWED)


def imported_layers(path: Path) -> set[str]:
    """The top-level packages of headrace that ``path`` imports (relative or absolute)."""
    layer = path.relative_to(ROOT).parts[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "headrace" and len(parts) > 1:
                    found.add(parts[1])
            else:
                depth = len(path.relative_to(ROOT).parts) - node.level
                base = list(path.relative_to(ROOT).parts[:depth])
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    found.add(target[0])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "headrace" and len(parts) > 1:
                    found.add(parts[1])
    return {f for f in found if f in LAYERS or f in ("exceptions", "_config")} - {layer}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_one_way(layer: str) -> None:
    for path in (ROOT / layer).rglob("*.py"):
        used = imported_layers(path) - {"exceptions", "_config"}
        assert used <= ALLOWED[layer], f"{path.relative_to(ROOT)} imports {sorted(used)}"


def test_the_checker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    bad = ROOT / "channels" / "_layering_probe.py"
    bad.write_text("def f():\n    from ..runtime import api\n    import headrace.dag\n")
    try:
        assert imported_layers(bad) == {"runtime", "dag"}
    finally:
        bad.unlink()


def test_import_headrace_loads_no_heavy_module() -> None:
    code = ("import sys, headrace; heavy = [m for m in ('numpy', 'zmq', 'numba', 'pyarrow', "
            "'networkx', 'cloudpickle') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (``headrace.runtime.api``)."""
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", "bench", "build", "_build") or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(["headrace", *parts])] = path
    return found


def import_graph(modules: dict[str, Path]) -> nx.DiGraph:
    """Module -> the modules of ours it imports (nested imports count; ``from .. import x`` of a
    module ``x`` imports ``x``, not the package)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
                targets = subs + ([module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


#: runtime/'s parts, each one job, lowest first; a part imports only parts before it. "api" is
#: the modules at runtime/'s top (session, remote, api): the session and the remote API.
RUNTIME_PARTS = ["wire", "refs", "loops", "hosts", "procs", "api", "compiled"]


def _runtime_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["headrace", "runtime"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in RUNTIME_PARTS else "api"


def test_runtime_parts_import_one_way() -> None:
    graph = import_graph(_modules())
    wrong = []
    for a, b in graph.edges:
        pa, pb = _runtime_part(a), _runtime_part(b)
        if pa and pb and RUNTIME_PARTS.index(pb) > RUNTIME_PARTS.index(pa):
            wrong.append(f"{a} ({pa}) imports {b} ({pb})")
    assert wrong == []
    assert {p.name for p in (ROOT / "runtime").iterdir() if p.is_dir() and
            (p / "__init__.py").exists()} == set(RUNTIME_PARTS) - {"api"}


def _private_imports(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """``from <our module> import _name`` in ``path`` (modules of ours named ``_x`` are fine)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if not module.startswith("headrace"):
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name} from {module}"
                      for a in node.names if a.name.startswith("_") and
                      f"{module}.{a.name}" not in modules]
    return found


def test_runtime_imports_no_private_name_of_another_module() -> None:
    modules = _modules()
    found = [hit for name, path in modules.items() if name.startswith("headrace.runtime")
             for hit in _private_imports(name, path, modules)]
    assert found == []
    probe = ROOT / "runtime" / "_private_probe.py"
    probe.write_text("from .refs.ref import _CAPTURE\nfrom .. import _config\n")
    try:
        assert _private_imports("headrace.runtime._private_probe", probe, modules) == [
            "runtime/_private_probe.py:1 _CAPTURE from headrace.runtime.refs.ref"]
    finally:
        probe.unlink()


def test_no_module_imports_itself_through_others() -> None:
    cycles = sorted(" -> ".join(c) for c in nx.simple_cycles(import_graph(_modules())))
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_checker_sees_nested_and_relative_cycles(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from .a import f\n")
    cycles = list(nx.simple_cycles(import_graph(_modules(tmp_path))))
    assert sorted(map(sorted, cycles)) == [["headrace.pkg.a", "headrace.pkg.b"]]


def _importlib_of_ours(path: Path) -> list[str]:
    """``importlib.import_module("headrace...")`` / ``__import__`` calls naming our modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            target = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(target, str) and (
                    target.startswith(("headrace", "."))):
                found.append(f"{path.name}:{node.lineno} {target}")
    return found


def test_no_module_reaches_ours_through_importlib(tmp_path: Path) -> None:
    found = [hit for path in _modules().values() for hit in _importlib_of_ours(path)]
    assert found == []
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n"
                     "importlib.import_module('headrace.runtime.compiled.driver')\n")
    assert _importlib_of_ours(probe) == ["probe.py:2 headrace.runtime.compiled.driver"]
