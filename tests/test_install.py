"""Installing and testing work wherever the checkout lives and whatever it is called.

- ``pip install .`` compiles the channels' ops ahead of time: running loads them without numba.
  Forcing numba's JIT leaves its cache in the per-user cache directory, not inside the installed
  package. Then ``pip install -e .`` in the same venv imports every module.
- The suite collects in a checkout whose folder is no valid package name (``headrace-main``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.deadline_s(300)


def _checkout_copy(dest: Path) -> Path:
    """The tracked files of this checkout, copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                           timeout=30).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_install_run_then_editable_install_imports_every_module(tmp_path: Path) -> None:
    src = _checkout_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # the dependencies come from this interpreter's site-packages (no download of numba & co.)
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = str(env_dir / "bin" / "python")
    env = {**os.environ, "HEADRACE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "."], src, env)
    out = _run([py, "-c", "import sys; from headrace.channels import native; "
                          "print(native.kind(), 'numba' in sys.modules)"], tmp_path, env)
    assert out.split() == ["aot", "False"], "the install did not build the ops ahead of time"
    _run([py, "-c", "from headrace.channels import native; native.ops()"], tmp_path,
         {**env, "HEADRACE_NATIVE": "jit"})
    leftovers = [p for p in (site / "headrace").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert leftovers == [], "numba wrote its cache inside the installed package"
    assert list((tmp_path / "cache").rglob("*.nbi")), "numba's cache is not in the cache dir"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", "."], src, env)
    out = _run([py, "-c", "import headrace, headrace.channels.segments as s; print(headrace."
                          "__file__, s.__file__)"], tmp_path, env)
    assert out.split() == [str(src / "__init__.py"), str(src / "channels" / "segments.py")]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_the_suite_collects_and_runs_in_a_folder_named_like_an_archive(tmp_path: Path) -> None:
    src = _checkout_copy(tmp_path / "headrace-main.0.1")
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/dag/test_trace.py"], src, {**os.environ})
    assert " passed" in out and "error" not in out
