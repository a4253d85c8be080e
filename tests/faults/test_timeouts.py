"""Odd timeouts never shift a value: whatever ``timeout`` a get is given (None, 0, tiny, huge, inf,
nan, negative, bool, numpy numbers), it returns the right value, raises a typed error, or times
out, and the ref and every later execution still give the right values. ``inf`` (and anything
decades long) means "no deadline", for every ref kind and every waiting call.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headrace as hr
from headrace.dag import InputNode

pytestmark = [pytest.mark.usefixtures("runtime"), pytest.mark.deadline_s(120)]

HUGE = [math.inf, 1e300, 1e12, 10 ** 400, np.float64(np.inf), np.float32(1e30)]


@hr.remote
class Inc:
    def inc(self, x: int) -> int:
        if x < 0:
            time.sleep(0.5)
        return x + 1

    def interrupting(self, x: int) -> Any:
        return _InterruptsOnLoad() if x < 0 else x + 1


@pytest.fixture(scope="module")
def actor() -> Any:
    return Inc.remote()


@pytest.fixture(scope="module")
def compiled(actor: Any) -> Iterator[Any]:
    with InputNode() as inp:
        dag = actor.inc.bind(inp)
    with dag.experimental_compile() as c:
        yield c


def _submitters(actor: Any, compiled: Any) -> dict[str, Any]:
    return {"compiled": compiled.execute, "actor call": actor.inc.remote}


@pytest.mark.parametrize("timeout", HUGE, ids=repr)
def test_huge_timeouts_mean_no_deadline_and_nothing_shifts(actor, compiled, timeout) -> None:
    for name, submit in _submitters(actor, compiled).items():
        assert hr.get(submit(1), timeout=timeout) == 2, name
        assert hr.get(submit(10)) == 11 and hr.get(submit(20)) == 21, name
        assert submit(3).result(timeout=timeout) == 4, name
        ready, _ = hr.wait([submit(4)], timeout=timeout)
        assert hr.get(ready) == [5], name
        assert hr.gather({"v": [submit(5)]}, timeout=timeout) == {"v": [6]}, name


_TIMEOUTS = st.one_of(
    st.none(), st.just(0), st.just(0.0), st.floats(min_value=0, max_value=1e-3),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
    st.integers(10 ** 9, 10 ** 500), st.booleans(), st.just(-0.0),
    st.sampled_from([np.float64(0.001), np.float32(0.5), np.float64(np.nan), np.float32(-1),
                     np.float64(np.inf), np.int64(2), np.float16(0)]))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(timeout=_TIMEOUTS, kind=st.sampled_from(["compiled", "actor call"]),
       x=st.integers(0, 1_000_000))
def test_any_timeout_leaves_every_value_right(actor, compiled, timeout, kind, x) -> None:
    submit = _submitters(actor, compiled)[kind]
    ref = submit(x)
    try:
        value = hr.get(ref, timeout=timeout)
    except hr.GetTimeoutError:
        value = None                         # too short: the ref stays pending, a retry works
    except (TypeError, ValueError) as exc:   # refused before waiting: bool, nan, negative
        assert "timeout must be None or" in str(exc)
        value = None
    assert value in (None, x + 1)
    assert hr.get(ref, timeout=30) == x + 1
    assert hr.get(submit(x + 7), timeout=30) == x + 8


class _Interrupted(Exception):
    pass


class _InterruptedOnLoad(BaseException):
    pass


def _interrupt_on_load() -> None:
    raise _InterruptedOnLoad


class _InterruptsOnLoad:
    """A value whose rebuilding on the driver raises a BaseException, as Ctrl-C would there."""

    def __reduce__(self) -> Any:
        return _interrupt_on_load, ()


def _interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted


@pytest.mark.parametrize("kind", ["compiled", "actor call"])
def test_an_exception_while_get_waits_takes_no_value_and_shifts_nothing(
        actor, compiled, kind) -> None:
    """E.g. a SIGALRM-based timeout of a test framework fires inside hr.get (before any value
    is taken off a channel): the ref still gets its own value, and so do later executions."""
    submit = _submitters(actor, compiled)[kind]
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        ref = submit(-10)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(_Interrupted):
            hr.get(ref)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert hr.get(ref, timeout=30) == -9
    assert [hr.get(submit(i), timeout=30) for i in (10, 20)] == [11, 21]


def test_an_interrupt_while_a_taken_value_is_rebuilt_loses_only_that_value(actor) -> None:
    """The value left the channel, then Ctrl-C: that output is an error, later ones are right."""
    with InputNode() as inp:
        dag = actor.interrupting.bind(inp)
    with dag.experimental_compile() as compiled:
        gone = {compiled.execute: (hr.TaskError, ("could not be deserialized on the driver: "
                                                   "_InterruptedOnLoad")),
                actor.interrupting.remote: (_InterruptedOnLoad, None)}
        for submit, (error, message) in gone.items():
            first, second = submit(-1), submit(10)
            with pytest.raises(_InterruptedOnLoad):
                hr.get(first, timeout=30)
            with pytest.raises(error, match=message):        # its value is gone, and says so
                hr.get(first, timeout=30)
            assert hr.get(second, timeout=30) == 11
            assert [hr.get(submit(i), timeout=30) for i in (20, 30)] == [21, 31]
