"""Workers forked from the zygote (runtime/procs/zygote.py): each is a worker of its own (random
state, ref ids, output), and a zygote that dies takes down only its workers, which fail like any
dead process; the runtime starts workers as processes of its own from then on."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import headrace as hr
from headrace import ActorDiedError
from headrace.runtime import session

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Probe:
    def facts(self):
        import random
        return (os.getpid(), os.getppid(), float(np.random.random()), random.random(),
                hr.put(0).hex())

    def shout(self, text):
        print(f"zygote child says {text}", flush=True)
        return text

    def sleep(self, s):
        time.sleep(s)
        return s


def _zygote():
    rt = session.running()
    assert rt.zygote is not None, "HEADRACE_ZYGOTE is on by default"
    assert rt.zygote.ready.wait(60), "the zygote did not come up"
    return rt.zygote


def test_workers_forked_from_the_zygote_are_workers_of_their_own(capfd) -> None:
    zygote = _zygote()
    actors = [Probe.remote() for _ in range(3)]         # beyond the spare: forked now
    facts = hr.get([a.facts.remote() for a in actors], timeout=60)
    forked = [f for f in facts if f[1] == zygote.popen.pid]
    assert len(forked) >= 2, facts                       # the spare may be an older process
    assert len({f[0] for f in facts}) == 3
    assert len({f[2] for f in forked}) == len(forked)    # numpy's global generator reseeded
    assert len({f[3] for f in forked}) == len(forked)    # random's too
    assert len({f[4] for f in forked}) == len(forked)    # ref ids of their own
    child = next(a for a, f in zip(actors, facts) if f[1] == zygote.popen.pid)
    assert hr.get(child.shout.remote("hello"), timeout=30) == "hello"
    deadline = time.monotonic() + 10
    seen = ""
    while "zygote child says hello" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capfd.readouterr().err
    assert "zygote child says hello" in seen            # its output reaches the driver, prefixed
    assert "(Probe pid=" in seen
    for a in actors:
        hr.kill(a)


def test_a_runtime_started_on_a_thread_that_ends_keeps_its_zygote_workers(tmp_path) -> None:
    """hr.init() on a thread that then ends: the zygote (and the workers it forks) must not end
    with that thread (PR_SET_PDEATHSIG would: it follows the thread that started the child)."""
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "thread_init.py"
    script.write_text(textwrap.dedent("""
        import threading, headrace as hr
        from headrace.runtime import session
        def start():
            hr.init(num_cpus=1, log_to_driver=False)
            assert session.running().zygote.ready.wait(60)     # up, then this thread ends
        t = threading.Thread(target=start)
        t.start(); t.join()
        import time; time.sleep(0.3)
        @hr.remote
        class A:
            def f(self): return 7
        actors = [A.remote() for _ in range(3)]
        print(hr.get([a.f.remote() for a in actors], timeout=60), flush=True)
        print("zygote gone:", session.running().zygote.gone, flush=True)
        hr.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[7, 7, 7]", "zygote gone: False"], out.stdout


def test_a_forked_worker_sees_the_environment_and_directory_of_its_spawn(tmp_path,
                                                                        monkeypatch) -> None:
    """As a started process would: what the driver set after hr.init() reaches a new worker."""
    zygote = _zygote()

    @hr.remote
    class Env:
        def facts(self):
            return os.getppid(), os.environ.get("HR_ZYGOTE_PROBE"), os.getcwd()
    monkeypatch.setenv("HR_ZYGOTE_PROBE", "set after init")
    monkeypatch.chdir(tmp_path)
    actors = [Env.remote() for _ in range(3)]   # a spare started before has the old ones
    facts = hr.get([a.facts.remote() for a in actors], timeout=60)
    now = [f for f in facts if f[0] == zygote.popen.pid and f[1] == "set after init"]
    assert len(now) >= 2, facts                             # forked after the change
    assert all(f[2] == str(tmp_path) for f in now), facts
    for a in actors:
        hr.kill(a)


def test_a_killed_zygote_takes_only_its_workers_down() -> None:
    """(Last in this module: the zygote stays dead for the rest of the runtime.)"""
    zygote = _zygote()
    actor = Probe.remote()
    pid, ppid = hr.get(actor.facts.remote(), timeout=60)[:2]
    if ppid != zygote.popen.pid:                         # it took the spare: make one more
        actor = Probe.remote()
        pid, ppid = hr.get(actor.facts.remote(), timeout=60)[:2]
    assert ppid == zygote.popen.pid
    running = actor.sleep.remote(30)
    time.sleep(0.2)
    start = time.monotonic()
    os.kill(zygote.popen.pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError):
        hr.get(running, timeout=10)
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    fresh = Probe.remote()                               # a process of its own now
    assert hr.get(fresh.sleep.remote(0), timeout=60) == 0

    @hr.remote
    def one():
        return 1
    assert hr.get([one.remote() for _ in range(4)], timeout=60) == [1, 1, 1, 1]
