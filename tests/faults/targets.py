"""What the crash catalogue runs faults against, and how it watches a pending get.

Two targets do the same work: ``call`` is one actor reached by ordinary ``.remote()`` calls;
``chain`` is a compiled DAG of three actors (first -> mid -> last). Every fault is injected into
the ``mid`` stage, through the value it receives (a command tuple) or by a signal to its pid.
An int ``x`` comes back as ``x + stages``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import headrace as hr
from headrace.dag import InputNode
from headrace.runtime import session

from ..channels.peers import in_thread


@hr.remote
class Stage:
    def __init__(self, role: str, fail_init: bool = False) -> None:
        if fail_init:
            raise ValueError(f"the {role} stage cannot start")
        self.role = role

    def pid(self) -> int:
        return os.getpid()

    def run(self, x: Any) -> Any:
        if type(x) is int:
            return x + 1
        if self.role != "mid":
            return x                                    # commands pass through to mid
        command, *args = x
        if command == "raise":
            raise ValueError(f"bad input {args}")
        if command == "exit":
            os._exit(3)
        if command == "sleep":
            time.sleep(args[0])
            return args[1] + 1
        if command == "lock":
            return threading.Lock()
        raise AssertionError(f"unknown command {command!r}")


class Target:
    """One way to run the stages: ``submit`` returns a ref; ``mid`` is the faulty stage."""

    stages: int = 1

    def __init__(self, fail_init: bool = False, **options: Any) -> None:
        self.actors = {"mid": Stage.remote("mid", fail_init)}
        self.mid = self.actors["mid"]
        self.runtime = session.running()

    def submit(self, x: Any) -> Any:
        return self.mid.run.remote(x)

    def expected(self, x: int) -> int:
        return x + self.stages

    def mid_pid(self) -> int:
        return hr.get(self.mid.pid.remote(), timeout=30)

    def survivors_work(self) -> bool:
        """The stages other than mid still answer ordinary calls."""
        others = [a for role, a in self.actors.items() if role != "mid"]
        return hr.get([a.run.remote(1) for a in others], timeout=10) == [2] * len(others)

    def close(self) -> None:
        if session.running() is self.runtime:       # not shut down under us
            for actor in self.actors.values():
                hr.kill(actor)


class Chain(Target):
    stages = 3

    def __init__(self, fail_init: bool = False, **options: Any) -> None:
        self.actors = {role: Stage.remote(role, fail_init and role == "mid")
                       for role in ("first", "mid", "last")}
        self.mid = self.actors["mid"]
        self.runtime = session.running()
        with InputNode() as inp:
            dag = self.actors["last"].run.bind(self.actors["mid"].run.bind(
                self.actors["first"].run.bind(inp)))
        try:
            self.compiled = dag.experimental_compile(**options)
        except BaseException:
            super().close()
            raise

    def submit(self, x: Any) -> Any:
        return self.compiled.execute(x)

    def close(self) -> None:
        self.compiled.teardown()
        super().close()


TARGETS = {"call": Target, "chain": Chain}


class Pending:
    """``hr.get(ref, timeout=None)`` on a thread: what it ended with, and when."""

    def __init__(self, ref: Any) -> None:
        self._thread, self._out = in_thread(lambda: hr.get(ref))

    def result(self, within_s: float) -> tuple[Any, float]:
        """(value or error, monotonic time it came); fails if it did not come in time."""
        self._thread.join(within_s)
        assert not self._thread.is_alive(), f"get(timeout=None) still waiting after {within_s} s"
        return self._out.get("value", self._out.get("error")), self._out["at"]

    def is_waiting(self) -> bool:
        return self._thread.is_alive()


def gone(pid: int) -> bool:
    """The process is no more (reaped, or a zombie about to be)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):     # ESRCH: reaped while we read it
        return True


def wait_gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
