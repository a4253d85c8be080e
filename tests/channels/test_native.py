"""The channels' hot ops: built ahead of time at install, the same code as numba's JIT build.

- This install loads the build made by ``pip install`` (no numba import in the process).
- Both builds give the same results for the same calls on the same words.
- The ops that wait release the GIL in both builds (pycc's default would hold it).
- A build older than its source is refused: "auto" falls back to the JIT, "aot" is an error.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from headrace import _config
from headrace.channels import abi, aot, native


@pytest.fixture(scope="module")
def builds() -> dict[str, dict]:
    """Both builds' entry points (the JIT's compiled now or loaded from numba's cache)."""
    from headrace.channels import _jit
    return {"aot": vars(native._built()), "jit": _jit.entry_points()}


def test_this_install_runs_the_ahead_of_time_build_without_numba() -> None:
    code = ("import sys; from headrace.channels import native; native.ops(); "
            "print(native.kind(), sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numba', 'llvmlite')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split(maxsplit=1)
    assert out == ["aot", "[]\n"]


def _ring(capacity: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h = np.zeros(abi.header_words(capacity), np.uint32)
    h[abi.N_SLOTS], h[abi.N_READERS] = capacity, 1
    m64 = np.zeros(capacity * 32, np.uint64)
    st = np.zeros(abi.ST_WORDS, np.int64)
    st[abi.ST_SLOT_SIZE] = 128
    return h, m64, st, np.full(capacity, -1, np.int64)


def _script(ops: dict) -> list:
    """A writer and a reader endpoint of one ring, driven through every kind of op."""
    h, m64, st_w, recent = _ring()
    st_r = st_w.copy()
    seen = []
    seen.append(ops["write_scalar"](h, m64, st_w, 4, -7, 0))
    seen.append(ops["write_float_try"](h, m64, st_w, 5, 2.5, 0))
    seen.append(ops["write_wait_try"](h, st_w, 0))            # full: 0
    seen.append(ops["read_wait"](h, m64, st_r, 0, 0))
    ops["read_commit"](h, st_r, 0, False, 0)
    seen.append(ops["read_wait_try"](h, m64, st_r, 0, 0))
    ops["read_commit"](h, st_r, 0, True, 1)                   # keeps a view of area 1
    seen.append(ops["write_wait"](h, st_w, 0))
    seen.append(ops["pick_area"](h, m64, st_w, recent))
    ops["write_commit"](h, m64, st_w, recent, 9, 3, 100, 0, 0)
    seen.append(ops["read_wait"](h, m64, st_r, 0, 0))
    ops["release"](h, h, abi.SLOTS + 16 * 1 + abi.VIEWS)
    seen.append([ops["add"](h, abi.MAGIC, -1), ops["load"](h, abi.MAGIC)])
    ops["store"](h, abi.MAGIC, 5)
    ops["close"](h, 2)
    seen.append(ops["write_wait"](h, st_w, 0))
    bell = np.zeros(abi.BELL_WORDS, np.uint32)
    ops["ring"](bell)
    addrs = np.array([bell.ctypes.data + 4 * abi.RD_NOTIFY], np.int64)
    words = np.zeros(1, np.uint32)
    seen.append([ops["bell_wait"](bell, st_r.copy(), 0, 0), ops["snapshot"](addrs, words),
                 ops["wait_any"](addrs, words, 0, 0, True)])
    return [seen, h.tolist(), m64.tolist(), st_w.tolist(), st_r.tolist(), recent.tolist()]


def test_both_builds_give_the_same_results(builds: dict[str, dict]) -> None:
    assert set(builds["aot"]) >= set(abi.SIGNATURES) and set(builds["jit"]) == set(abi.SIGNATURES)
    assert _script(builds["aot"]) == _script(builds["jit"])


@pytest.mark.parametrize("build", ["aot", "jit"])
def test_a_waiting_op_lets_other_threads_run(builds: dict[str, dict], build: str) -> None:
    ops = builds[build]
    h, m64, st, _ = _ring()
    done: list = []
    waiter = threading.Thread(target=lambda: done.append(
        ops["read_wait"](h, m64, st, 0, 400_000_000)))       # an empty ring: waits 0.4 s
    waiter.start()
    time.sleep(0.05)
    ran = 0
    while not done and ran < 50:        # with the GIL held, this loop cannot run until it ends
        time.sleep(0.001)
        ran += 1
    waiter.join(5)
    assert ran == 50, f"the {build} build's read_wait held the GIL while it waited"
    assert done and done[0][0] == 0     # then it timed out


def test_a_build_older_than_its_source_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    assert native._built() is not None
    monkeypatch.setattr(aot, "source_key", lambda: 12345)
    assert native._built() is None
    assert "older than their source" in caplog.text
    monkeypatch.setattr(native, "_OPS", {})
    monkeypatch.setattr(native, "_KIND", [])
    monkeypatch.setattr(_config, "NATIVE", "aot")
    with pytest.raises(ImportError, match="HEADRACE_NATIVE=aot"):
        native.ops()
