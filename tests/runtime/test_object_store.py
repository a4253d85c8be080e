"""The object store: large values in shm, reused once no process views them, never early."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import headrace as hr
from headrace.channels.segments import owned_segments

pytestmark = pytest.mark.usefixtures("runtime")

N = 2_000_000           # 16 MB of int64: well above the inline limit


def ours() -> set[str]:
    return set(owned_segments(os.getpid()))


@hr.remote
class Keeper:
    def __init__(self) -> None:
        self.kept = None

    def keep(self, arr):
        self.kept = arr            # a zero-copy view of the caller's segment, held on purpose
        return int(arr[-1])

    def check(self):
        return int(self.kept.sum()), bool(self.kept.flags.writeable)

    def echo(self, arr):
        return arr


def segment_of(arr: np.ndarray) -> str:
    """The /dev/shm segment this process maps ``arr``'s memory from (read from /proc/self/maps)."""
    addr = arr.ctypes.data
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= addr < end and rest[-1].startswith("/dev/shm/"):
                return rest[-1].rsplit("/", 1)[1]
    raise AssertionError(f"{addr:#x} lies in no /dev/shm mapping")


def test_a_freed_segment_is_reused_for_the_next_put() -> None:
    ref = hr.put(np.full(N, 1))
    arr = hr.get(ref, timeout=10)
    assert int(arr[0]) == 1
    first = segment_of(arr)
    del ref, arr
    gc.collect()
    assert first in ours()                   # kept mapped in the pool, not unlinked
    ref = hr.put(np.full(N, 2))
    arr = hr.get(ref, timeout=10)
    assert segment_of(arr) == first          # the same segment, refilled
    assert (arr == 2).all()


def test_a_segment_viewed_by_an_actor_is_never_refilled() -> None:
    keeper = Keeper.remote()
    ref = hr.put(np.arange(N))
    assert hr.get(keeper.keep.remote(ref), timeout=10) == N - 1
    viewed = ours()
    del ref
    gc.collect()
    for _ in range(3):                       # new puts must not land in the viewed segment
        other = hr.put(np.full(N, -7))
        assert int(hr.get(other, timeout=10)[0]) == -7
        del other
        gc.collect()
    assert hr.get(keeper.check.remote(), timeout=10) == (N * (N - 1) // 2, False)
    assert viewed                            # (the segment name may be gone; its pages are not)
    hr.kill(keeper)


def test_a_view_held_by_the_driver_is_never_refilled() -> None:
    view = hr.get(hr.put(np.arange(N)), timeout=10)
    gc.collect()
    for _ in range(3):
        assert int(hr.get(hr.put(np.zeros(N, np.int64)), timeout=10)[0]) == 0
        gc.collect()
    assert int(view.sum()) == N * (N - 1) // 2
    assert not view.flags.writeable


def test_an_echoed_array_comes_back_zero_copy_and_intact() -> None:
    keeper = Keeper.remote()
    arr = np.random.default_rng(1).random(N)
    out = hr.get(keeper.echo.remote(hr.put(arr)), timeout=10)
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.owndata
    hr.kill(keeper)
