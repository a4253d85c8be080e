"""init / shutdown / auto-init / leftovers of dead sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import headrace as hr
from headrace.channels.segments import owned_segments


def test_first_api_use_initialises_and_reinit_is_an_error() -> None:
    hr.shutdown()
    assert not hr.is_initialized()
    assert hr.get(hr.put(1), timeout=5) == 1
    assert hr.is_initialized()
    with pytest.raises(RuntimeError, match="already initialised"):
        hr.init()
    assert hr.init(ignore_reinit_error=True)["driver_pid"] == os.getpid()
    hr.shutdown()


def test_init_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^num_cpus must be an int >= 1, got 0$"):
        hr.init(num_cpus=0)
    with pytest.raises(ValueError, match="pass a Dask scheduler address"):
        hr.init(address="elsewhere:8786")
    assert not hr.is_initialized()


def test_shutdown_ends_children_and_unlinks_segments() -> None:
    import numpy as np
    hr.init(num_cpus=2)
    big = hr.put(np.zeros(1_000_000))
    assert owned_segments(os.getpid())
    hr.shutdown()
    assert owned_segments(os.getpid()) == []
    assert hr.get(big, timeout=1).shape == (1_000_000,)   # values already mapped stay readable


def test_next_init_removes_segments_left_by_a_killed_session(tmp_path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import os, signal, numpy as np, headrace as hr
        hr.init(num_cpus=1, log_to_driver=False)
        ref = hr.put(np.zeros(1_000_000))
        print(os.getpid(), flush=True)
        os.killpg(0, signal.SIGKILL)    # the whole session at once: nobody is left to clean up
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, start_new_session=True)
    dead_pid = int(out.stdout.split()[0])
    assert owned_segments(dead_pid)                       # it leaked, being SIGKILLed
    hr.init(num_cpus=1)
    assert owned_segments(dead_pid) == []
    hr.shutdown()


def test_atexit_cleans_up_a_script_that_forgot_shutdown(tmp_path) -> None:
    script = tmp_path / "forgot.py"
    script.write_text(textwrap.dedent("""
        import os, numpy as np, headrace as hr
        @hr.remote
        class A:
            def f(self): return 1
        a = A.remote()
        assert hr.get(a.f.remote(), timeout=20) == 1
        ref = hr.put(np.zeros(1_000_000))
        print(os.getpid(), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert owned_segments(int(out.stdout.split()[0])) == []


def _in_group(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                pids.append(int(name))
    return pids


def test_workers_of_a_driver_that_exits_at_once_end_too(tmp_path) -> None:
    """The driver exits right after hr.init(): its workers, some not even started yet (their
    driver is gone before they can watch it), end within seconds; none is left running."""
    script = tmp_path / "gone.py"
    script.write_text(textwrap.dedent("""
        import os, headrace as hr
        hr.init(num_cpus=2, log_to_driver=False)
        print(os.getpid(), flush=True)
        os._exit(0)
    """))
    out = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, timeout=60,
                         start_new_session=True)
    group = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _in_group(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _in_group(group)
    for pid in left:                                 # do not leak them into later tests
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes of a dead driver still running: {left}"
