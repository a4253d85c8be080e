"""A driver killed with SIGKILL leaves nothing: its children see it die, remove every segment of
the session (the driver's puts, channels and spills included) and exit, within 2 s, checked from
outside. The sweep at the next ``hr.init()`` is the backstop: it treats zombies and reused pids as
dead owners.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from headrace._config import SHM_PREFIX
from headrace.channels.segments import SHM_DIR, is_alive, start_ticks, sweep_dead_owners

pytestmark = pytest.mark.deadline_s(90)

#: The victim: ordinary calls and a compiled 3-actor chain, each with a get(timeout=None)
#: pending, puts, and a spilled 20 MB input; it prints its children's pids, then waits.
_DRIVER = r"""
import os, sys, threading, time
import numpy as np
import headrace as hr
from headrace.dag import InputNode

@hr.remote
class Stage:
    def run(self, x):
        if isinstance(x, str):
            time.sleep(60)
        return x
hr.init(num_cpus=2)
stages = [Stage.remote() for _ in range(4)]
puts = [hr.put(np.ones(1 << 20)) for _ in range(3)]
with InputNode() as inp:
    dag = stages[2].run.bind(stages[1].run.bind(stages[0].run.bind(inp)))
compiled = dag.experimental_compile()
assert hr.get(compiled.execute(np.ones(20 << 20, np.uint8))).nbytes == 20 << 20
pending = [compiled.execute("stuck"), stages[3].run.remote("stuck")]
for ref in pending:
    threading.Thread(target=hr.get, args=(ref,), daemon=True).start()
time.sleep(0.3)
with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
    print(" ".join(f.read().split()), flush=True)
time.sleep(120)
"""


def _segments_of(pids: list[int]) -> list[str]:
    prefixes = tuple(f"{SHM_PREFIX}-{pid}-" for pid in pids)
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefixes))


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if is_alive(pid)]


def test_driver_sigkill_leaves_no_process_and_no_segment_after_two_seconds() -> None:
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        children = [int(p) for p in line.split()]
        assert len(children) >= 6, f"the driver did not start its children: {line!r}"
        session = [driver.pid, *children]
        assert _segments_of(session), "the driver made no segments: the test tests nothing"
        os.kill(driver.pid, signal.SIGKILL)    # not reaped yet: a zombie, as after a crash
        killed = time.monotonic()
        while (_alive(children) or _segments_of(session)) and time.monotonic() - killed < 2.0:
            time.sleep(0.02)
        assert _alive(children) == [], "children outlived the driver by 2 s"
        assert _segments_of(session) == [], "segments outlived the driver by 2 s"
    finally:
        driver.kill()
        driver.wait()


def _zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped: its pid still exists. (Not os.fork():
    forking a process with threads is deprecated.)"""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while is_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return child


def _fake_segment(owner: int, ticks: int | None = None) -> str:
    stamp = "" if ticks is None else f"t{ticks}-"
    name = f"{SHM_PREFIX}-{owner}-{stamp}{os.urandom(8).hex()}"
    with open(os.path.join(SHM_DIR, name), "wb") as f:
        f.write(b"x")
    return name


def test_sweep_treats_zombie_owners_as_dead() -> None:
    child = _zombie()
    try:
        assert os.path.exists(f"/proc/{child.pid}")     # the pid exists, as a zombie
        name = _fake_segment(child.pid)
        assert name in sweep_dead_owners()
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        child.wait()


def test_a_segment_whose_owner_pid_was_reused_is_swept_and_a_live_owners_is_kept() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        ticks = start_ticks(sleeper.pid)
        assert ticks is not None and is_alive(sleeper.pid, started=ticks)
        assert not is_alive(sleeper.pid, started=ticks - 1)   # another process had that pid
        reused = _fake_segment(sleeper.pid, ticks - 1)
        live = [_fake_segment(sleeper.pid, ticks), _fake_segment(sleeper.pid)]
        try:
            swept = sweep_dead_owners()
            assert reused in swept and not os.path.exists(os.path.join(SHM_DIR, reused))
            assert not set(live) & set(swept)
        finally:
            for name in live:
                os.unlink(os.path.join(SHM_DIR, name))
    finally:
        sleeper.kill()
        sleeper.wait()
