"""Remote functions: submit, get, arguments (refs nested too), num_returns, options, output."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import headrace as hr

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
def add(a, b=0):
    return a + b


@hr.remote
def total(values):
    return sum(values)


@hr.remote(num_returns=2)
def pair(x):
    return x, x * 2


@hr.remote
def shout(text):
    print(f"shout: {text}")
    return text.upper()


def test_remote_returns_ref_and_get_returns_value() -> None:
    ref = add.remote(1, 2)
    assert isinstance(ref, hr.ObjectRef)
    assert hr.get(ref, timeout=10) == 3


def test_kwargs_and_closures_and_lambdas_ship() -> None:
    k = 10
    closure = hr.remote(lambda x: x + k)
    assert hr.get(closure.remote(1), timeout=10) == 11
    assert hr.get(add.remote(1, b=5), timeout=10) == 6


def test_top_level_refs_are_resolved_and_nested_ones_arrive_as_refs() -> None:
    """Ray's rule: an argument that is a ref gives its value; a ref inside a list, tuple or
    dict stays a ref, which the task can get (``def reduce(refs): sum(hr.get(refs))``)."""
    a, b = add.remote(1, 1), add.remote(2, 2)
    assert hr.get(add.remote(a, b), timeout=10) == 6
    assert hr.get(add.remote(a, b=b), timeout=10) == 6
    reduce = hr.remote(lambda refs: sum(hr.get(list(refs))))
    assert hr.get(reduce.remote([a, b]), timeout=10) == 6
    assert hr.get(reduce.remote((a, b)), timeout=10) == 6
    kinds = hr.remote(lambda d, x: (isinstance(d["x"][0], hr.ObjectRef),
                                    isinstance(d["y"], hr.ObjectRef), x))
    assert hr.get(kinds.remote({"x": [a], "y": b}, a), timeout=10) == (True, True, 2)


def test_num_returns_gives_one_ref_per_value() -> None:
    r1, r2 = pair.remote(4)
    assert hr.get([r1, r2], timeout=10) == [4, 8]
    r3, r4, r5 = add.options(num_returns=3).remote([1], [2, 3])
    assert hr.get([r3, r4, r5], timeout=10) == [1, 2, 3]


def test_num_returns_mismatch_is_a_task_error() -> None:
    refs = add.options(num_returns=2).remote(1, 2)
    with pytest.raises(ValueError, match="declared with num_returns=2 but returned a int"):
        hr.get(refs, timeout=10)


def test_large_numpy_argument_and_result_round_trip() -> None:
    big = np.arange(1_000_000, dtype=np.int64)
    double = hr.remote(lambda a: a * 2)
    out = hr.get(double.remote(big), timeout=20)
    assert out.shape == big.shape and int(out[-1]) == 2 * 999_999


def test_put_small_and_large() -> None:
    assert hr.get(hr.put({"a": 1}), timeout=5) == {"a": 1}
    arr = np.ones((512, 512), dtype=np.float32)
    got = hr.get(hr.put(arr), timeout=5)
    np.testing.assert_array_equal(got, arr)
    assert not got.flags.writeable           # zero-copy view of shared memory, read-only
    assert hr.get(add.remote(hr.put(5), 1), timeout=10) == 6


def test_many_tasks_in_parallel_from_several_threads() -> None:
    results: list[int] = []

    def submit(base: int) -> None:
        refs = [add.remote(base, i) for i in range(50)]
        results.extend(hr.get(refs, timeout=30))

    threads = [threading.Thread(target=submit, args=(b,)) for b in (0, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([i for i in range(50)] + [1000 + i for i in range(50)])


def test_remote_function_cannot_be_called_directly() -> None:
    with pytest.raises(TypeError, match=r"^remote function 'add' cannot be called directly; "
                                        r"use add.remote\(\.\.\.\) instead$"):
        add(1, 2)


def test_unknown_option_is_rejected_where_written() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'num_gpu' for a remote function"):
        add.options(num_gpu=1)


def test_task_asking_for_more_cpus_than_exist_fails_at_submit() -> None:
    with pytest.raises(ValueError, match=r"^add asks for num_cpus=64 but the runtime has 2 CPUs"):
        add.options(num_cpus=64).remote(1)


def test_worker_print_reaches_driver_stderr_with_prefix(capfd) -> None:
    assert hr.get(shout.remote("hi"), timeout=10) == "HI"
    deadline = __import__("time").monotonic() + 5
    err = ""
    while "shout: hi" not in err and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
        err += capfd.readouterr().err
    assert re.search(r"^\(shout pid=\d+\) shout: hi$", err, re.M), err


def test_worker_logging_reaches_driver_stderr(capfd) -> None:
    def log_it() -> int:
        import logging
        logging.getLogger("user").info("from the worker")
        return 1
    assert hr.get(hr.remote(log_it).remote(), timeout=10) == 1
    import time
    deadline, err = time.monotonic() + 5, ""
    while "from the worker" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    assert re.search(r"^\(log_it pid=\d+\) INFO user: from the worker$", err, re.M), err
