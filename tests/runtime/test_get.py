"""get / wait / gather: the ordering and timeout rules of DESIGN 2.2, exactly."""

from __future__ import annotations

import asyncio
import queue
import time
import warnings
from collections import namedtuple

import pytest

import headrace as hr
from headrace.exceptions import RefsTypeError

from .remotes import slow

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
def boom(msg="boom"):
    raise ValueError(msg)


def test_list_keeps_order_whatever_order_values_arrive_in() -> None:
    refs = [slow.remote(i, delay_s=0.3 - i * 0.1) for i in range(3)]
    assert hr.get(refs, timeout=10) == [0, 1, 2]


def test_duplicates_are_allowed() -> None:
    ref = slow.remote(7)
    assert hr.get([ref, ref, slow.remote(8), ref], timeout=10) == [7, 7, 8, 7]


@pytest.mark.parametrize("bad", [lambda r: (r,), lambda r: (x for x in [r]), lambda r: {r}])
def test_tuple_generator_set_raise_error_that_is_type_and_value_error(bad) -> None:
    ref = slow.remote(1)
    with pytest.raises(RefsTypeError, match=r"^get\(\) expects a ref or a list of refs, got "):
        hr.get(bad(ref), timeout=5)
    with pytest.raises(TypeError):
        hr.get(bad(ref), timeout=5)
    with pytest.raises(ValueError):
        hr.get(bad(ref), timeout=5)


def test_non_ref_element_is_type_error_naming_index_and_type() -> None:
    with pytest.raises(TypeError, match=r"^get\(\) expects a list of refs, but element 1 is int"):
        hr.get([slow.remote(1), 5], timeout=5)


def test_get_of_a_non_ref_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"^get\(\) expects a ref or a list of refs, got int$"):
        hr.get(3)


def test_negative_timeout_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"^timeout must be None or >= 0, got -1$"):
        hr.get(slow.remote(1), timeout=-1)


def test_timeout_zero_polls() -> None:
    ref = slow.remote(1, delay_s=1.0)
    with pytest.raises(hr.GetTimeoutError, match=r"^get timed out after 0 s: 1 of 1 ref still"):
        hr.get(ref, timeout=0)
    assert hr.get(ref, timeout=10) == 1
    assert hr.get(ref, timeout=0) == 1           # ready now: returns at once


def test_timeout_is_one_deadline_for_the_whole_call_and_names_pending_count() -> None:
    refs = [slow.remote(0), slow.remote(1, delay_s=2.0), slow.remote(2, delay_s=2.0)]
    hr.get(refs[0], timeout=10)
    t0 = time.monotonic()
    with pytest.raises(hr.GetTimeoutError, match=r"^get timed out after 0.3 s: 2 of 3 refs still "
                                                 r"pending$") as info:
        hr.get(refs, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 1.5      # one deadline, not 0.3 s per ref
    assert isinstance(info.value, TimeoutError)
    assert hr.get(refs, timeout=10) == [0, 1, 2]    # the refs stay usable


def test_first_error_is_raised_at_once_without_waiting_for_the_rest() -> None:
    refs = [slow.remote(1, delay_s=3.0), boom.remote("first")]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="first"):
        hr.get(refs, timeout=10)
    assert time.monotonic() - t0 < 2.5


def test_get_inside_running_event_loop_warns_once() -> None:
    import headrace.runtime.api as api
    api._WARNED_LOOP = False

    async def main() -> list[int]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = hr.get(slow.remote(1), timeout=10)
            b = hr.get(slow.remote(2), timeout=10)
        runtime_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime_warnings) == 1
        assert "blocks the loop; use `await ref`" in str(runtime_warnings[0].message)
        return [a, b]

    assert asyncio.run(main()) == [1, 2]


def test_wait_returns_ready_and_not_ready_in_input_order() -> None:
    fast1, fast2 = slow.remote(1), slow.remote(3)
    hr.get([fast1, fast2], timeout=10)
    slow1 = slow.remote(2, delay_s=3)       # made after the others finished: cannot be ready yet
    ready, not_ready = hr.wait([slow1, fast2, fast1], num_returns=2, timeout=5)
    assert ready == [fast2, fast1] and not_ready == [slow1]


def test_wait_timeout_returns_what_is_ready_without_error() -> None:
    a, b = slow.remote(1), slow.remote(2, delay_s=3)
    hr.get(a, timeout=10)
    t0 = time.monotonic()
    ready, not_ready = hr.wait([a, b], num_returns=2, timeout=0.2)
    assert (ready, not_ready) == ([a], [b]) and time.monotonic() - t0 < 1.5
    assert hr.wait([a, b], num_returns=1, timeout=0) == ([a], [b])


def test_wait_counts_failed_refs_as_ready_and_checks_arguments() -> None:
    bad = boom.remote()
    assert hr.wait([bad], timeout=10) == ([bad], [])
    with pytest.raises(ValueError, match=r"^num_returns=3 is more than the 1 refs given$"):
        hr.wait([bad], num_returns=3)
    with pytest.raises(RefsTypeError):
        hr.wait((bad,))


def test_gather_keeps_nested_shape_and_types() -> None:
    Point = namedtuple("Point", "x y")
    a, b, c = slow.remote(1), slow.remote(2), slow.remote(3)
    out = hr.gather({"l": [a, 5], "t": (b, "s"), "s": {c}, "p": Point(a, b)}, timeout=10)
    assert out == {"l": [1, 5], "t": (2, "s"), "s": {3}, "p": Point(1, 2)}
    assert type(out["t"]) is tuple and type(out["p"]) is Point


def test_gather_errors_raise_or_skip() -> None:
    ok, bad = slow.remote(1), boom.remote("x")
    with pytest.raises(ValueError, match="x"):
        hr.gather([ok, bad], timeout=10)
    assert hr.gather([ok, bad, 3], errors="skip", timeout=10) == [1, 3]
    assert hr.gather({"a": ok, "b": bad}, errors="skip", timeout=10) == {"a": 1}


def test_gather_iterator_gives_iterator_and_queue_gives_queue() -> None:
    it = hr.gather(iter([slow.remote(1), slow.remote(2)]), timeout=10)
    assert not isinstance(it, list) and list(it) == [1, 2]
    q: queue.Queue = queue.Queue()
    out = hr.gather(q)
    for i in range(3):
        q.put(slow.remote(i))
    q.put(None)
    got = [out.get(timeout=10) for _ in range(4)]
    assert got == [0, 1, 2, None]


def test_gather_asynchronous_returns_awaitable() -> None:
    async def main():
        return await hr.gather([slow.remote(1), (slow.remote(2),)], asynchronous=True)
    assert asyncio.run(main()) == [1, (2,)]


def test_gather_rejects_bad_errors_mode() -> None:
    with pytest.raises(ValueError, match=r"^errors must be 'raise' or 'skip', got 'ignore'$"):
        hr.gather([], errors="ignore")
