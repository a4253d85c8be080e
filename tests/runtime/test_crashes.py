"""Crash catalogue: every failure ends in a typed error within bounds; the runtime keeps working."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import headrace as hr

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
def echo(x):
    return x


@hr.remote
def exit_hard():
    os._exit(3)


@hr.remote
class Victim:
    def pid(self):
        return os.getpid()

    def sleep(self, s):
        time.sleep(s)
        return s


def test_os_exit_in_task_is_worker_crashed_error_and_worker_is_replaced() -> None:
    with pytest.raises(hr.WorkerCrashedError, match=r"^the worker process \(pid \d+\) running "
                                                    r"exit_hard died: exited with code 3") as info:
        hr.get(exit_hard.remote(), timeout=10)
    assert info.value.exit_code == 3
    assert hr.get([echo.remote(i) for i in range(10)], timeout=10) == list(range(10))


def test_sigkill_of_actor_mid_call_fails_pending_and_future_calls_within_one_second() -> None:
    v = Victim.remote()
    pid = hr.get(v.pid.remote(), timeout=10)
    pending = [v.sleep.remote(30), v.sleep.remote(1)]
    time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for ref in pending:
        with pytest.raises(hr.ActorDiedError, match=rf"^actor 'Victim' \(pid {pid}\) died: killed "
                                                    r"by signal SIGKILL \(9\)") as info:
            hr.get(ref, timeout=10)
        assert info.value.signal == 9 and info.value.pid == pid
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(hr.ActorDiedError):
        hr.get(v.pid.remote(), timeout=5)
    assert hr.get(echo.remote(1), timeout=10) == 1


def test_death_wakes_a_get_without_timeout() -> None:
    v = Victim.remote()
    pid = hr.get(v.pid.remote(), timeout=10)
    ref = v.sleep.remote(60)
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(hr.ActorDiedError):
        hr.get(ref)                            # no timeout: the death must wake it


def test_unpicklable_argument_is_type_error_naming_argument_and_call() -> None:
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"^argument 'x' \(position 0\) of echo.remote\(\) cannot "
                                        r"be serialized: lock"):
        echo.remote(lock)
    v = Victim.remote()
    with pytest.raises(TypeError, match=r"^argument 's' \(position 0\) of Victim.sleep.remote\(\)"):
        v.sleep.remote(lock)
    with pytest.raises(TypeError, match=r"^keyword argument 'x' of echo.remote\(\)"):
        echo.remote(x=lock)
    assert hr.get(echo.remote(2), timeout=10) == 2       # nothing harmed


def test_unpicklable_result_is_a_task_error_that_is_a_type_error() -> None:
    make_lock = hr.remote(lambda: threading.Lock())
    with pytest.raises(TypeError, match=r"could not serialize the return value of <lambda>"):
        hr.get(make_lock.remote(), timeout=10)
    assert hr.get(echo.remote(3), timeout=10) == 3


def test_upstream_error_fails_downstream_call_with_that_error() -> None:
    @hr.remote
    def bad():
        raise ArithmeticError("upstream")
    down = echo.remote(bad.remote())
    with pytest.raises(ArithmeticError, match="upstream"):
        hr.get(down, timeout=10)
    inside = hr.get(echo.remote([bad.remote()]), timeout=10)   # nested: it stays a ref
    with pytest.raises(ArithmeticError, match="upstream"):
        hr.get(inside[0], timeout=10)


def test_user_exception_class_from_driver_script_is_caught_by_its_class() -> None:
    class Custom(Exception):
        pass

    def raise_custom():
        raise Custom("mine")
    with pytest.raises(Custom, match="mine"):
        hr.get(hr.remote(raise_custom).remote(), timeout=10)


def test_exception_with_unusual_init_still_reaches_the_driver() -> None:
    class NeedsTwo(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    def raise_it():
        raise NeedsTwo(1, 2)
    with pytest.raises(NeedsTwo, match="1/2"):
        hr.get(hr.remote(raise_it).remote(), timeout=10)


def test_get_after_shutdown_raises_and_init_works_again() -> None:
    ref = hr.remote(lambda: time.sleep(30)).remote()
    time.sleep(0.2)
    t0 = time.monotonic()
    hr.shutdown()
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(hr.ObjectLostError, match="shut down"):
        hr.get(ref, timeout=5)
    hr.shutdown()                                   # idempotent
    hr.init(num_cpus=2)
    assert hr.get(echo.remote(4), timeout=10) == 4
