"""hr.cancel: queued tasks never run, running ones are interrupted, force kills the worker."""

from __future__ import annotations

import time

import pytest

import headrace as hr

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
def sleeper(s):
    time.sleep(s)
    return s


@hr.remote
def spin(s):
    end = time.monotonic() + s
    while time.monotonic() < end:
        pass
    return s


@hr.remote
def echo(x):
    return x


@hr.remote
def sleep_after_mark(path, s):
    open(path, "w").close()
    time.sleep(s)
    return s


def _wait_for(path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)


def test_cancel_running_task_interrupts_it(tmp_path) -> None:
    ref = sleep_after_mark.remote(str(tmp_path / "started"), 30)
    _wait_for(tmp_path / "started")
    t0 = time.monotonic()
    hr.cancel(ref)
    with pytest.raises(hr.TaskCancelledError, match="was cancelled while running"):
        hr.get(ref, timeout=5)
    assert time.monotonic() - t0 < 1.0 and ref.cancelled() and ref.status == "cancelled"
    assert hr.get(echo.remote(1), timeout=10) == 1


def test_cancel_queued_task_never_runs() -> None:
    blockers = [sleeper.remote(1.0) for _ in range(2)]     # both workers busy
    queued = echo.remote("never")
    assert queued.cancel() is True
    with pytest.raises(hr.TaskCancelledError, match="was cancelled before it ran"):
        hr.get(queued, timeout=5)
    assert hr.get(blockers, timeout=10) == [1.0, 1.0]


def _force_cancel_a_busy_worker() -> None:
    ref = spin.remote(30)
    time.sleep(0.3)
    hr.cancel(ref, force=True)
    with pytest.raises(hr.TaskCancelledError):
        hr.get(ref, timeout=10)
    assert hr.get([echo.remote(i) for i in range(4)], timeout=10) == [0, 1, 2, 3]


def test_force_cancel_kills_a_busy_worker_and_it_is_replaced() -> None:
    _force_cancel_a_busy_worker()


def test_cancel_propagates_to_dependent_tasks() -> None:
    up = sleeper.remote(30)
    down = echo.remote(up)
    time.sleep(0.2)
    hr.cancel(up)
    with pytest.raises(hr.TaskCancelledError):
        hr.get(down, timeout=5)


def test_cancel_finished_ref_is_a_no_op() -> None:
    ref = echo.remote(1)
    assert hr.get(ref, timeout=10) == 1
    assert ref.cancel() is False
    hr.cancel(ref)
    assert hr.get(ref, timeout=1) == 1


def test_cancel_actor_call_queued_behind_a_running_one() -> None:
    @hr.remote
    class Busy:
        def sleep(self, s):
            time.sleep(s)
            return s
    b = Busy.remote()
    first, second = b.sleep.remote(0.5), b.sleep.remote(0.1)
    time.sleep(0.2)
    hr.cancel(second)
    assert hr.get(first, timeout=10) == 0.5
    with pytest.raises(hr.TaskCancelledError):
        hr.get(second, timeout=10)
    with pytest.raises(ValueError, match="force=True is not supported for actor calls"):
        hr.cancel(b.sleep.remote(0.1), force=True)


def test_a_busy_task_worker_moves_to_shm_rings_and_cancel_still_works() -> None:
    from headrace.runtime import session
    assert hr.get([echo.remote(i) for i in range(40)], timeout=30) == list(range(40))
    workers = [p for p in session.running().procs.values() if p.kind == "task"]
    deadline = time.monotonic() + 30
    while not any(p.lane is not None for p in workers) and time.monotonic() < deadline:
        hr.get(echo.remote(0), timeout=10)
        time.sleep(0.05)
    assert any(p.lane is not None for p in workers), "no task worker attached its rings"
    assert [hr.get(echo.remote(i), timeout=10) for i in range(20)] == list(range(20))
    running = [spin.remote(30) for _ in workers]        # every worker busy, on rings or not
    time.sleep(0.3)
    queued = echo.remote("queued")
    for ref in running:
        hr.cancel(ref)
    for ref in running:
        with pytest.raises(hr.TaskCancelledError):
            hr.get(ref, timeout=10)
    assert hr.get(queued, timeout=10) == "queued"
    _force_cancel_a_busy_worker()
