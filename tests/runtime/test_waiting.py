"""One waiter per blocking call (runtime.refs.waiting): woken by whichever producer moves first.

The native ``wait_any`` is checked on plain words; the rest through the public API, with refs of
several producers at once (the runtime's zmq inbox, actor lanes, compiled DAGs) and with several
threads waiting on one producer.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import headrace as hr
from headrace import InputNode
from headrace.channels import abi, native
from headrace.exceptions import TaskCancelledError, TaskError
from headrace.runtime.refs.waiting import ReadRole

pytestmark = pytest.mark.usefixtures("runtime")

SLOW_S = 3.0
FAST_S = 1.5            # far below SLOW_S: nothing waited for the slow producer


def _words(n: int) -> tuple[list[np.ndarray], np.ndarray]:
    arrays = [np.zeros(abi.BELL_WORDS, np.uint32) for _ in range(n)]
    return arrays, np.array([a.ctypes.data + 4 * abi.RD_NOTIFY for a in arrays], np.int64)


@pytest.mark.parametrize("waitv", [True, False], ids=["futex_waitv", "sliced-fallback"])
def test_wait_any_wakes_on_whichever_word_moves_and_counts_itself_out(waitv) -> None:
    ops = native.ops()
    if waitv and not native.has_waitv():
        pytest.skip("this kernel has no futex_waitv (Linux < 5.16): the fallback is tested")
    arrays, addrs = _words(3)
    seen = np.zeros(3, np.uint32)
    start = time.monotonic()
    assert ops["wait_any"](addrs, seen, 0, 200_000_000, waitv) == -1
    assert 0.15 < time.monotonic() - start < 2.0
    for k in (2, 0):
        ops["snapshot"](addrs, seen)
        waker = threading.Timer(0.1, ops["ring"], (arrays[k],))
        waker.start()
        assert ops["wait_any"](addrs, seen, 0, 5_000_000_000, waitv) == k
        waker.join()
    assert [int(a[abi.RD_WAITERS]) for a in arrays] == [0, 0, 0]


def test_a_read_role_found_taken_rings_when_its_holder_lets_go() -> None:
    rings = []
    role = ReadRole(lambda: rings.append(1))
    assert role.take()
    assert not threading.Thread(target=lambda: rings.append(role.take())).start()
    time.sleep(0.1)
    assert rings == [False]
    role.give()
    assert rings == [False, 1] and role.take()
    role.give()
    assert rings == [False, 1]          # nobody missed it this time: no ring


@hr.remote
class Stage:
    def nap(self, x, delay_s=SLOW_S):
        time.sleep(delay_s)
        return x

    def echo(self, x):
        return x

    def boom(self, x):
        raise ValueError(f"boom {x}")


@hr.remote
def add_one(x):
    return x + 1


@pytest.fixture(scope="module")
def stages():
    a, b, c = Stage.remote(), Stage.remote(), Stage.remote()
    with InputNode() as inp:
        slow_dag = a.nap.bind(inp)
    with InputNode() as inp:
        fast_dag = b.echo.bind(inp)
    with slow_dag.experimental_compile() as slow, fast_dag.experimental_compile() as fast:
        yield slow, fast, c


def test_first_error_of_any_producer_is_raised_at_once(stages) -> None:
    slow, fast, actor = stages
    refs = [slow.execute(1), fast.execute(2), actor.boom.remote(3), add_one.remote(4)]
    start = time.monotonic()
    with pytest.raises(TaskError, match="boom 3"):
        hr.get(refs, timeout=30)
    assert time.monotonic() - start < FAST_S
    assert hr.get(refs[:2] + refs[3:], timeout=30) == [1, 2, 5]


def test_wait_returns_as_the_first_of_several_producers_finishes(stages) -> None:
    slow, fast, actor = stages
    slow_ref = slow.execute(1)
    for first in (fast.execute(7), actor.echo.remote(7), add_one.remote(6)):
        start = time.monotonic()
        ready, not_ready = hr.wait([slow_ref, first], num_returns=1, timeout=30)
        assert ready == [first] and not_ready == [slow_ref]
        assert time.monotonic() - start < FAST_S and hr.get(first) == 7
    assert hr.get(slow_ref, timeout=30) == 1


def test_mixed_gets_in_a_loop_keep_every_value_in_place(stages) -> None:
    _, fast, actor = stages
    for i in range(300):
        refs = [fast.execute(i), actor.echo.remote(-i), add_one.remote(i), hr.put(i)]
        assert hr.get(refs, timeout=30) == [i, -i, i + 1, i]


def test_threads_waiting_on_one_producer_each_get_theirs(stages) -> None:
    """Whoever reads an actor's ring or a DAG's outputs finishes the others' refs too; the others
    wake on their refs' callbacks (or on the role handed back), never on a slice."""
    _, fast, actor = stages
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for i in range(200):
                assert hr.get(actor.echo.remote((k, i)), timeout=30) == (k, i)
                assert hr.get(fast.execute((k, i)), timeout=30) == (k, i)
        except BaseException as exc:        # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


@hr.remote
def nap(x, delay_s):
    time.sleep(delay_s)
    return x


def test_a_thread_waiting_on_a_ref_another_thread_cancels_wakes_at_once() -> None:
    busy = [nap.remote(i, 2.0) for i in range(2)]       # both task workers
    queued = nap.remote(9, 0.0)                         # queued on the driver behind them
    got: list[BaseException] = []

    def waiter() -> None:
        try:
            hr.get(queued, timeout=30)
        except BaseException as exc:           # noqa: BLE001 - checked below
            got.append(exc)
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    hr.cancel(queued)
    t.join(10)
    assert isinstance(got[0], TaskCancelledError) and time.monotonic() - start < 1.0
    assert hr.get(busy, timeout=30) == [0, 1]
