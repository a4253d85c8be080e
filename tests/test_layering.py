"""Imports go one way: runtime -> compiler -> dag, runtime -> channels (nested imports count)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
