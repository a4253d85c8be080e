"""The ref contract of DESIGN 2.1 on ObjectRef: futures, callbacks, await, identity, repr."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading

import pytest

import headrace as hr
from headrace.experimental.async_api import as_future

from .remotes import slow

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
def echo(x):
    return x


@hr.remote
def fails():
    raise KeyError("missing")


def test_result_with_timeout_and_timeout_s() -> None:
    ref = slow.remote(5, delay_s=0.5)
    with pytest.raises(hr.GetTimeoutError):
        ref.result(timeout=0.05)
    assert ref.result(timeout_s=10) == 5
    assert ref.result() == 5
    with pytest.raises(TypeError, match="pass timeout or timeout_s, not both"):
        ref.result(timeout=1, timeout_s=1)


def test_status_done_exception_traceback() -> None:
    ref = slow.remote(1, delay_s=0.3)
    assert ref.status == "pending" and not ref.done()
    assert ref.exception(timeout=10) is None and ref.traceback() is None
    assert ref.status == "finished" and ref.done()
    bad = fails.remote()
    err = bad.exception(timeout=10)
    assert isinstance(err, hr.TaskError) and isinstance(err, KeyError)
    assert bad.status == "error"
    tb = bad.traceback()
    assert "Traceback (most recent call last)" in tb and "KeyError: 'missing'" in tb


def test_task_error_carries_name_traceback_and_cause() -> None:
    with pytest.raises(KeyError) as info:
        fails.remote().result(timeout=10)
    err = info.value
    assert isinstance(err, hr.TaskError)
    # the message, then the remote traceback from the user's code, its source line included
    assert re.match(r"^fails \(pid \d+\) raised KeyError: 'missing'\n\nTraceback \(most recent "
                    r"call last\):\n  File \".*test_refs\.py\", line \d+, in fails\n    raise "
                    r"KeyError\(\"missing\"\)\nKeyError: 'missing'$", str(err)), str(err)
    assert err.function_name == "fails" and isinstance(err.cause, KeyError)
    assert "in fails" in str(err.__cause__)          # the remote traceback as __cause__


def test_add_done_callback_runs_once_done_and_at_once_when_already_done() -> None:
    seen: list[tuple[str, int]] = []
    event = threading.Event()
    ref = slow.remote(3, delay_s=0.2)
    ref.add_done_callback(lambda r: (seen.append(("late", r.result())), event.set()))
    assert event.wait(10)
    ref.add_done_callback(lambda r: seen.append(("now", r.result())))
    assert seen == [("late", 3), ("now", 3)]


def test_future_is_concurrent_futures_future() -> None:
    fut = slow.remote(4, delay_s=0.1).future()
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=10) == 4
    with pytest.raises(KeyError):
        fails.remote().future().result(timeout=10)


def test_await_and_as_future_on_running_loop() -> None:
    async def main():
        a = await echo.remote(1)
        fut = echo.remote(2).as_future()
        assert isinstance(fut, asyncio.Future)
        b = await fut
        c = await as_future(echo.remote(3))
        d = await asyncio.gather(echo.remote(4), echo.remote(5))
        with pytest.raises(KeyError):
            await fails.remote()
        return [a, b, c, *d]
    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_key_hex_hash_eq_and_repr() -> None:
    ref = echo.remote(1)
    ref.result(timeout=10)
    assert ref.key == f"echo-{ref.hex()}" and re.fullmatch(r"[0-9a-f]+", ref.hex())
    assert len({ref, ref, echo.remote(2)}) == 2 and ref == ref
    assert repr(ref) == f"<ObjectRef: status: finished, key: {ref.key}>"


def test_many_reads_from_many_threads_see_the_same_value() -> None:
    ref = slow.remote([1, 2], delay_s=0.2)
    out: list[object] = []
    threads = [threading.Thread(target=lambda: out.append(ref.result(timeout=10)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == [[1, 2]] * 4


def test_ref_cannot_be_pickled_on_its_own() -> None:
    import pickle
    with pytest.raises(TypeError, match=r"cannot be pickled on its own"):
        pickle.dumps(echo.remote(1))
