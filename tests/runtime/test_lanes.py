"""Actor lanes: once its process is up, an actor's calls and results move to shm rings; nothing
changes for the user (order, errors, callbacks, deaths), only the latency."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

import headrace as hr
from headrace.exceptions import ActorDiedError, TaskCancelledError
from headrace.runtime.procs import lane as lane_mod

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Stage:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, k=1):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def echo(self, x):
        return x

    def fail(self):
        raise KeyError("missing")

    def sleep(self, s):
        time.sleep(s)
        return threading.get_ident()


def on_lane(handle: hr.ActorHandle, timeout_s: float = 20.0) -> None:
    """Call until the actor's rings are attached."""
    deadline = time.monotonic() + timeout_s
    while handle._record.proc is None or handle._record.proc.lane is None:
        assert time.monotonic() < deadline, "the actor never switched to its lane"
        hr.get(handle.pid.remote(), timeout=10)
        time.sleep(0.01)


def test_calls_keep_their_order_and_values_across_the_switch() -> None:
    s = Stage.remote()
    refs = [s.inc.remote() for _ in range(50)]      # the switch happens while these run
    assert hr.get(refs, timeout=30) == list(range(1, 51))
    on_lane(s)
    refs = [s.inc.remote() for _ in range(3 * lane_mod.CAPACITY)]   # more than the ring holds
    assert hr.get(refs, timeout=30) == list(range(51, 51 + 3 * lane_mod.CAPACITY))


def test_plain_and_other_arguments_keep_their_order_while_the_ring_is_full() -> None:
    """Plain arguments go straight into the call ring, others through the queue (encoded, or
    waiting for a ref): a full ring or a queued call ahead must send them all in order."""
    s = Stage.remote()
    on_lane(s)
    one = hr.put(1)
    kinds = [1, np.int64(1), one]                   # plain, encoded, a ref's value
    blocker = s.sleep.remote(0.3)                   # the ring fills behind it
    refs = [s.inc.remote(kinds[i % 3]) for i in range(4 * lane_mod.CAPACITY)]
    hr.get(blocker, timeout=30)
    assert hr.get(refs, timeout=30) == list(range(1, 4 * lane_mod.CAPACITY + 1))
    n = 4 * lane_mod.CAPACITY
    waiting = s.inc.remote(_later.remote(1, 0.3))   # queued until its argument is there...
    after = s.inc.remote(1)                         # ...and the ring has room: still behind it
    assert hr.get([waiting, after], timeout=30) == [n + 1, n + 2]


@hr.remote
def _later(x, s):
    time.sleep(s)
    return x


def test_rings_the_driver_closed_before_the_actor_attached_them_are_refused_quietly(
        caplog) -> None:
    """A short script's driver ends while a worker attaches its lane: no lane, and no
    traceback in the user's terminal (it printed "could not attach the shm lane")."""
    lane = lane_mod.DriverLane(lambda header, frames: None)
    blob = pickle.dumps(lane.worker_ends())
    lane.close()
    with caplog.at_level(logging.DEBUG, logger=lane_mod.__name__):
        assert lane_mod.attach(blob, lambda: None) is None
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_errors_large_values_and_callbacks_on_a_lane() -> None:
    s = Stage.remote()
    on_lane(s)
    with pytest.raises(KeyError, match="missing"):
        hr.get(s.fail.remote(), timeout=10)
    big = np.arange(1_000_000)
    np.testing.assert_array_equal(hr.get(s.echo.remote(big), timeout=10), big)
    fired = threading.Event()
    ref = s.inc.remote(10)
    ref.add_done_callback(lambda r: fired.set())
    assert fired.wait(5)                     # nobody waited in get(): the doorbell did it
    assert ref.future().result(timeout=5) == hr.get(ref, timeout=1)


def test_two_threads_waiting_on_one_actor_both_get_their_results() -> None:
    s = Stage.options(max_concurrency=4).remote()
    on_lane(s)
    out: dict[int, int] = {}

    def call(i: int) -> None:
        out[i] = hr.get(s.echo.remote(i), timeout=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert out == {0: 0, 1: 1, 2: 2, 3: 3}
    idents = hr.get([s.sleep.remote(0.3) for _ in range(4)], timeout=10)
    assert len(set(idents)) == 4             # max_concurrency still runs them at once


def test_sigkill_of_a_laned_actor_fails_its_calls_within_one_second() -> None:
    s = Stage.remote()
    on_lane(s)
    pid = hr.get(s.pid.remote(), timeout=10)
    pending = s.sleep.remote(30)
    time.sleep(0.2)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError, match=r"died: .*SIGKILL"):
        hr.get(pending, timeout=10)
    assert time.monotonic() - killed < 1.0
    with pytest.raises(ActorDiedError):
        hr.get(s.inc.remote(), timeout=10)


def test_cancel_a_queued_call_on_a_lane() -> None:
    s = Stage.remote()
    on_lane(s)
    running = s.sleep.remote(0.5)
    queued = s.inc.remote()
    hr.cancel(queued)
    with pytest.raises(TaskCancelledError):
        hr.get(queued, timeout=10)
    hr.get(running, timeout=10)
    assert hr.get(s.inc.remote(), timeout=10) == 1     # the cancelled call never ran


def test_restart_after_a_crash_gets_a_fresh_process_and_lane() -> None:
    s = Stage.options(max_restarts=1).remote()
    on_lane(s)
    first = hr.get(s.pid.remote(), timeout=10)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            second = hr.get(s.pid.remote(), timeout=10)
            break
        except ActorDiedError:
            assert time.monotonic() < deadline
    assert second != first
    on_lane(s)
    assert hr.get(s.inc.remote(5), timeout=10) == 5
