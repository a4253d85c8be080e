"""An output's error is seen as soon as that output arrives, whatever its siblings do (issue 13).

Every DAG here has a slow output (a 3 s nap) and a fast one that fails on input 3; the driver
reads whichever output channel has a value first, on one doorbell wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time

import pytest

import headrace as hr
from headrace import InputNode, MultiOutputNode
from headrace.exceptions import ActorDiedError, ChannelClosedError, TaskError

NAP_S = 3.0
FAST_S = 1.5        # far below NAP_S: the error did not wait for the slow sibling


@hr.remote
class Stage:
    def nap(self, x, delay_s):
        time.sleep(delay_s)
        return x

    def boom(self, x):
        if x == 3:
            raise ValueError("three")
        return x

    def pid(self):
        return os.getpid()


@pytest.fixture(scope="module")
def compiled():
    slow, fast = Stage.remote(), Stage.remote()
    with InputNode() as inp:
        dag = MultiOutputNode([slow.nap.bind(inp, NAP_S), fast.boom.bind(inp)])
    with dag.experimental_compile() as compiled:
        yield compiled


def _timed(fn):
    start = time.monotonic()
    try:
        return fn(), time.monotonic() - start
    except BaseException as exc:        # noqa: BLE001 - the caller checks what it was
        return exc, time.monotonic() - start


def test_get_of_a_list_raises_the_fast_error_and_the_slow_sibling_still_arrives(compiled):
    refs = compiled.execute(3)
    error, took = _timed(lambda: hr.get(refs, timeout=30))
    assert isinstance(error, TaskError) and "three" in str(error)
    assert took < FAST_S
    assert hr.get(refs[0], timeout=30) == 3
    with pytest.raises(TaskError, match="three"):
        hr.get(refs[1])


def test_result_wait_futures_and_await_see_the_error_first(compiled):
    refs = compiled.execute(3)
    error, took = _timed(lambda: refs[1].result(timeout=30))
    assert isinstance(error, TaskError) and took < FAST_S
    assert refs[0].result(timeout=30) == 3

    refs = compiled.execute(3)
    (ready, not_ready), took = _timed(lambda: hr.wait(refs, num_returns=1, timeout=30))
    assert ready == [refs[1]] and not_ready == [refs[0]] and took < FAST_S
    assert hr.get(refs[0], timeout=30) == 3

    refs = compiled.execute(3)
    futures = [r.future() for r in refs]
    start = time.monotonic()
    first = next(concurrent.futures.as_completed(futures, timeout=30))
    assert first is futures[1] and time.monotonic() - start < FAST_S
    assert isinstance(first.exception(), TaskError)
    assert futures[0].result(timeout=30) == 3

    async def main():
        futs = await compiled.execute_async(3)
        start = time.monotonic()
        with pytest.raises(TaskError, match="three"):
            await futs[1]
        took = time.monotonic() - start
        return took, await futs[0]
    took, slow_value = asyncio.run(asyncio.wait_for(main(), 30))
    assert took < FAST_S and slow_value == 3


def test_a_later_execution_in_flight_fails_before_the_earlier_ones_finish(compiled):
    first = compiled.execute(1)         # fine, but its slow output takes NAP_S
    second = compiled.execute(3)        # its fast output fails at once
    error, took = _timed(lambda: hr.get(second, timeout=30))
    assert isinstance(error, TaskError) and took < FAST_S
    assert not first[0].done()
    assert hr.get(first[1], timeout=30) == 1            # the fast sibling of the first one
    assert hr.get(first, timeout=30) == [1, 1]
    assert hr.get(second[0], timeout=30) == 3
    assert compiled.stats()["in_flight"] == 0


def test_many_executions_of_a_multi_output_dag_keep_every_value_in_place():
    a, b, c = Stage.remote(), Stage.remote(), Stage.remote()
    with InputNode() as inp:
        dag = MultiOutputNode([a.boom.bind(inp), b.nap.bind(inp, 0.0), c.boom.bind(inp)])
    with dag.experimental_compile(max_inflight_executions=4) as compiled:
        refs = [compiled.execute(i) for i in range(200)]
        for i in reversed(range(200)):      # read out of order, from the last one
            if i == 3:
                assert hr.get(refs[i][1]) == 3
                with pytest.raises(TaskError):
                    hr.get(refs[i])
            else:
                assert hr.get(refs[i]) == [i, i, i]


def test_a_death_or_a_teardown_wakes_a_get_waiting_on_several_outputs() -> None:
    slow, fast = Stage.remote(), Stage.remote()
    pid = hr.get(slow.pid.remote(), timeout=30)
    with InputNode() as inp:
        dag = MultiOutputNode([slow.nap.bind(inp, NAP_S), fast.boom.bind(inp)])
    compiled = dag.experimental_compile()
    refs = compiled.execute(1)
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    error, took = _timed(lambda: hr.get(refs, timeout=30))
    assert isinstance(error, ActorDiedError) and took < 0.5 + FAST_S
    compiled.teardown()
    other = Stage.remote()
    with InputNode() as inp:
        dag = MultiOutputNode([other.nap.bind(inp, NAP_S), fast.boom.bind(inp)])
    compiled = dag.experimental_compile()
    refs = compiled.execute(1)
    threading.Timer(0.5, compiled.teardown).start()
    error, took = _timed(lambda: hr.get(refs[0], timeout=30))
    assert isinstance(error, ChannelClosedError) and took < 0.5 + FAST_S
