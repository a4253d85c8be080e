"""The JIT fallback's one-off numba compile: one process at a time, in the background.

(An install compiles the ops ahead of time and never needs it: ``test_native.py``.)"""

from __future__ import annotations

import subprocess
import sys
import shutil
import time
from pathlib import Path

import pytest

from headrace._config import cache_dir
from headrace.channels import warmup


@pytest.fixture
def fresh_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ready stamp yet: the cache directory is the test's own (children's too), holding a copy
    of numba's compiled ops where there are some already (loading them is quicker)."""
    cached = Path(cache_dir()) / "numba"
    if cached.is_dir():
        shutil.copytree(cached, tmp_path / "numba", ignore=shutil.ignore_patterns("ready-*"))
    monkeypatch.setenv("HEADRACE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HEADRACE_NATIVE", "jit")     # the children use numba's JIT
    return tmp_path


def test_start_compiles_in_the_background_once_then_does_nothing(fresh_install: Path) -> None:
    package = Path(warmup.__file__).parent
    started = time.time()
    assert not warmup.is_ready()
    proc = warmup.start()
    assert proc is not None
    assert proc.wait(120) == 0
    assert warmup.is_ready()
    assert warmup.start() is None
    assert list(fresh_install.rglob("*.nbi")), "numba's cache is not in the cache directory"
    inside = [p for p in package.rglob("*.nb[ic]") if p.stat().st_mtime >= started - 1]
    assert inside == [], f"numba wrote its cache inside the installed package: {inside}"


def test_a_second_process_waits_for_the_compile_lock(fresh_install: Path) -> None:
    held, released = fresh_install / "held", fresh_install / "released"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from headrace.channels import warmup\n"
        "with warmup.compile_lock():\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    time.sleep(0.5)\n"
        "    open(sys.argv[2], 'w').close()\n"), str(held), str(released)])
    try:
        deadline = time.monotonic() + 30
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held.exists()
        with warmup.compile_lock():
            assert released.exists()        # the lock came only after the child let it go
        assert warmup.is_ready()
    finally:
        child.wait(30)
