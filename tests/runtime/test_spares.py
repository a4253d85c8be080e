"""Spare actor processes: started ahead with their rings attached, taken by new actors, so an
actor's calls use the fast path from its first call."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

import headrace as hr
from headrace import _config
from headrace.runtime import session
from headrace.runtime.procs.records import ProcState

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Named:
    def pid(self):
        return os.getpid()

    def shout(self, text):
        print(f"shout: {text}")
        return text

    def fail(self):
        raise KeyError("nope")


def _ready_spare(timeout_s: float = 30.0):
    """The runtime's spare once it is started and its lane attached."""
    rt = session.running()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spare = next((p for p in list(rt.spares) if p.state is ProcState.READY
                      and p.lane is not None), None)
        if spare is not None:
            return spare
        time.sleep(0.05)
    raise AssertionError(f"no spare with a lane within {timeout_s} s: {list(rt.spares)}")


def test_a_new_actor_takes_the_spare_and_says_its_own_name(capfd) -> None:
    hr.get(Named.remote().pid.remote(), timeout=30)     # the first actor: spares start
    spare = _ready_spare()
    actor = Named.remote()
    assert hr.get(actor.pid.remote(), timeout=30) == spare.pid
    assert actor._record.proc is spare and spare.lane is not None      # rings from call 1
    with pytest.raises(KeyError, match=r"^Named.fail \(pid \d+\) raised KeyError"):
        hr.get(actor.fail.remote(), timeout=30)
    assert hr.get(actor.shout.remote("hi"), timeout=30) == "hi"
    deadline, err = time.monotonic() + 5, ""
    while "shout: hi" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    assert re.search(rf"^\(Named pid={spare.pid}\) shout: hi$", err, re.M), err
    assert _ready_spare().pid != spare.pid             # another spare replaces it


def test_a_spare_boots_when_calls_pause_not_while_they_are_timed() -> None:
    """Taking the spare schedules the next one; it starts once calls pause (a spare booting
    and loading numba takes about a core for a second), so a fresh actor's first calls are not
    slowed by it."""
    _ready_spare()
    actor = Named.remote()                              # takes the spare
    pid = hr.get(actor.pid.remote(), timeout=30)
    rt = session.running()
    until = time.monotonic() + 2.5                      # past the 1 s refill delay
    while time.monotonic() < until:
        assert hr.get(actor.pid.remote(), timeout=30) == pid
        assert not [p for p in list(rt.spares) if p.state is not ProcState.DEAD], \
            "a spare started while calls kept coming"
    assert _ready_spare(timeout_s=30).pid != pid        # calls paused: it boots now


def test_actors_made_faster_than_spares_boot_get_more_spares() -> None:
    _ready_spare()
    rt = session.running()
    actors = [Named.remote() for _ in range(3)]         # one takes the spare; none is left
    assert len({hr.get(a.pid.remote(), timeout=30) for a in actors}) == 3
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:                  # calls paused: the spares boot
        ready = [p for p in list(rt.spares) if p.state is ProcState.READY and p.lane]
        if len(ready) >= 2:
            break
        time.sleep(0.1)
    assert len(ready) >= 2, list(rt.spares)
    for actor in actors:
        hr.kill(actor)


def test_a_dead_spare_is_skipped_and_none_are_kept_when_turned_off(monkeypatch) -> None:
    hr.get(Named.remote().pid.remote(), timeout=30)
    spare = _ready_spare()
    os.kill(spare.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while spare.state is not ProcState.DEAD and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setattr(_config, "SPARE_ACTORS", 0)
    actor = Named.remote()
    assert hr.get(actor.pid.remote(), timeout=30) not in (spare.pid, os.getpid())
    time.sleep(1.5)                                     # past the refill delay
    assert [p for p in session.running().spares if p.state is not ProcState.DEAD] == []
