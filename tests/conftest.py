"""Fixtures every test gets: no_hang (a deadline per test), no_leaks (per module), fake_clock."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

os.environ.setdefault("HEADRACE_CHECKS", "1")

import headrace as hr  # noqa: E402  (after HEADRACE_CHECKS is set)
from headrace._config import SHM_PREFIX  # noqa: E402
from headrace.channels.segments import is_alive, owned_segments, owner_of  # noqa: E402
from headrace.runtime.refs.deadline import FakeClock  # noqa: E402


#: Our segments already in /dev/shm before the session (another run's): not this run's leaks.
_BEFORE_SESSION = frozenset(n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}-"))


def child_pids(pid: int | None = None) -> list[int]:
    """Every descendant of ``pid`` (default: this process): children of any of its threads,
    and theirs (workers forked by the zygote are its children, not ours), from /proc."""
    out: list[int] = []
    todo = [pid or os.getpid()]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def signal_children(sig: int, *, then: int | None = None, grace_s: float = 0.5) -> None:
    for pid in child_pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if then is not None:
        time.sleep(grace_s)
        for pid in child_pids():
            try:
                os.kill(pid, then)
            except ProcessLookupError:
                pass


@pytest.fixture(autouse=True)
def no_hang(request: pytest.FixtureRequest) -> Iterator[None]:
    """Turn a stuck test into a failure that explains itself: dump stacks, kill the children.

    Killing children on purpose: a death must wake every blocked get(), so a test still stuck
    after that has found a bug.
    """
    marker = request.node.get_closest_marker("deadline_s")
    limit_s = marker.args[0] if marker else 30.0
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        faulthandler.dump_traceback(all_threads=True)   # children dump theirs on SIGUSR1
        signal_children(signal.SIGUSR1, then=signal.SIGKILL, grace_s=0.5)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    assert not fired.is_set(), f"ran past its {limit_s} s deadline; stacks are dumped above"


@pytest.fixture(autouse=True, scope="module")
def no_leaks() -> Iterator[None]:
    """After each module: shut down, then no child process and no segment of ours is left."""
    yield
    hr.shutdown()
    deadline = time.monotonic() + 5
    while child_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child_pids() == [], f"child processes left behind: {child_pids()}"
    assert owned_segments(os.getpid()) == [], "shared-memory segments left in /dev/shm"
    # NOTE: our children are gone now, so a segment whose owner still runs is another
    # program's (a second test run, a user's script), not a leak of ours
    ours = [n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}-")
            and n not in _BEFORE_SESSION and not _owner_runs(n)]
    assert ours == [], f"segments of exited children left in /dev/shm: {ours}"


def _owner_runs(name: str) -> bool:
    owner = owner_of(name)
    return owner is not None and is_alive(*owner)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def runtime() -> Iterator[None]:
    """A runtime with two task workers for the module (shut down by no_leaks)."""
    if not hr.is_initialized():
        hr.init(num_cpus=2)
    yield
