"""The shm ring: zero-copy reads never see their bytes overwritten; spills; sync modes."""

from __future__ import annotations

import gc
import os
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.channels import abi as nat
from headrace.channels import shm as shm_module
from headrace.channels.segments import owned_segments
from headrace.channels.shm import COPY_MAX, ShmChannel
from headrace.exceptions import ChannelClosedError, ChannelTimeoutError


def ours() -> list[str]:
    return owned_segments(os.getpid())


@pytest.fixture
def ring() -> ShmChannel:
    ch = ShmChannel(n_readers=1, capacity=2, slot_bytes=1 << 20)
    yield ch
    ch.close()


def test_large_payloads_are_zero_copy_and_read_only(ring: ShmChannel) -> None:
    w, r = ring.writer(), ring.reader(0)
    w.write(np.arange(COPY_MAX, dtype=np.uint8), timeout_s=1)
    view = r.read(timeout_s=1)
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1
    small = np.arange(10)
    w.write(small, timeout_s=1)
    copied = r.read(timeout_s=1)
    assert copied.flags.writeable                   # small values are copied out
    np.testing.assert_array_equal(copied, small)


def test_read_if_any_returns_the_default_when_empty_and_raises_once_closed_and_drained(
        ring: ShmChannel) -> None:
    w, r = ring.writer(), ring.reader(0)
    missing = object()
    assert r.read_if_any(missing) is missing
    w.write(b"a", timeout_s=1)
    w.write(7, timeout_s=1)
    assert r.read_if_any(missing) == b"a"
    w.close()
    assert r.read_if_any(missing) == 7            # written before the close: still read
    with pytest.raises(ChannelClosedError):
        r.read_if_any(missing)


def test_held_views_are_never_overwritten_while_the_writer_laps_the_ring(ring: ShmChannel) -> None:
    w, r = ring.writer(), ring.reader(0)
    held = []
    for k in range(6):                               # three laps of a two-slot ring
        w.write(np.full(100_000, k, dtype=np.int64), timeout_s=1)     # 800 kB: in a slot
        held.append(r.read(timeout_s=1))
    for lap in range(20):                            # keep writing while the views are held
        w.write(np.full(100_000, 100 + lap, dtype=np.int64), timeout_s=1)
        assert r.read(timeout_s=1)[0] == 100 + lap
    for k, view in enumerate(held):
        assert (view == k).all(), f"view {k} was overwritten"
    stats = w.statistics()
    assert stats["spills"] > 0                       # the writer spilled instead of overwriting
    del held, view
    gc.collect()
    spills = w.statistics()["spills"]
    for k in range(4):                               # views gone: slots are used again
        w.write(np.full(100_000, k, dtype=np.int64), timeout_s=1)
        assert r.read(timeout_s=1)[0] == k
    assert w.statistics()["spills"] == spills


def test_a_view_counts_until_its_last_derived_array_dies(ring: ShmChannel) -> None:
    w, r = ring.writer(), ring.reader(0)
    w.write(np.arange(50_000, dtype=np.float64).reshape(100, 500), timeout_s=1)
    slot_views = nat.SLOTS + nat.VIEWS
    arr = r.read(timeout_s=1)
    column = arr[:, 3]                               # a derived view keeps the slot pinned
    del arr
    gc.collect()
    assert ring._h[slot_views] == 1
    assert column[2] == 1003.0
    del column
    gc.collect()
    assert ring._h[slot_views] == 0


def test_a_request_response_loop_keeps_reusing_one_payload_area() -> None:
    ch = ShmChannel(capacity=8, slot_bytes=1 << 20)
    try:
        w, r = ch.writer(), ch.reader(0)
        addresses = set()
        for k in range(20):                 # read and dropped before the next write
            w.write(np.full(100_000, k), timeout_s=1)
            got = r.read(timeout_s=1)
            assert got[0] == k
            addresses.add(got.__array_interface__["data"][0])
            del got
        assert len(addresses) == 1          # the cache-hot area, not 8 in turn
        w.write(np.full(100_000, -1), timeout_s=1)
        held = r.read(timeout_s=1)          # its area stays pinned: the next value goes elsewhere
        w.write(np.full(100_000, -2), timeout_s=1)
        other = r.read(timeout_s=1)
        assert other.__array_interface__["data"][0] != held.__array_interface__["data"][0]
        assert (held == -1).all() and (other == -2).all()
        assert w.statistics()["spills"] == 0    # a free area is used, no spill
    finally:
        ch.close()


@given(st.lists(st.sampled_from(["write", "write", "read_hold", "read_drop", "drop_oldest"]),
                max_size=60))
@settings(max_examples=60, deadline=None)
def test_no_value_is_overwritten_while_unread_or_viewed(ops: list[str]) -> None:
    """Model check of the area choice: any mix of writes, reads, held and dropped views."""
    ch = ShmChannel(capacity=3, slot_bytes=1 << 17)
    try:
        w, r = ch.writer(), ch.reader(0)
        unread: list[int] = []
        held: list[tuple[int, np.ndarray]] = []
        n = 0
        for op in ops:
            if op == "write" and len(unread) < 3:
                w.write(np.full(10_000, n), timeout_s=1)       # 80 kB: zero-copy, in an area
                unread.append(n)
                n += 1
            elif op.startswith("read") and unread:
                got = r.read(timeout_s=1)
                assert (got == unread.pop(0)).all()
                if op == "read_hold":
                    held.append((int(got[0]), got))
            elif op == "drop_oldest" and held:
                held.pop(0)
            for k, view in held:
                assert (view == k).all(), f"the view of value {k} was overwritten"
    finally:
        ch.close()


def test_idle_spills_beyond_the_keep_budget_are_freed_and_readers_map_each_once(
        monkeypatch) -> None:
    monkeypatch.setattr(shm_module, "SPILL_KEEP_BYTES", 0)     # keep only the largest idle one
    ch = ShmChannel(n_readers=1, capacity=4, slot_bytes=4096)
    try:
        w, r = ch.writer(), ch.reader(0)
        before = set(ours())
        big = np.arange(1_000_000)
        for i in range(3):                          # three spills in flight at once
            w.write(big + i, timeout_s=1)
        values = [r.read(timeout_s=1) for _ in range(3)]
        assert [int(v[0]) for v in values] == [0, 1, 2]
        del values
        gc.collect()
        w.write(big + 3, timeout_s=1)               # takes one free spill, frees the others
        assert len(set(ours()) - before) == 1 and w.statistics()["spill_segments"] == 1
        assert int(r.read(timeout_s=1)[0]) == 3
    finally:
        ch.close()
    monkeypatch.undo()                              # the default budget: spills are reused
    ch = ShmChannel(n_readers=1, capacity=4, slot_bytes=4096)
    try:
        w, r = ch.writer(), ch.reader(0)
        opened = []
        real_open = shm_module.Segment.open
        monkeypatch.setattr(shm_module.Segment, "open",
                            lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
        for i in range(20):                         # two in flight, read, again and again
            w.write(big + i, timeout_s=1)
            w.write(big + i, timeout_s=1)
            assert int(r.read(timeout_s=1)[0]) == int(r.read(timeout_s=1)[0]) == i
            gc.collect()
        assert w.statistics()["spills"] == 40 and w.statistics()["spill_segments"] <= 3
        assert len(set(opened)) <= 3 and len(opened) == len(set(opened))  # each mapped once
    finally:
        ch.close()


def test_a_value_larger_than_a_slot_spills_and_the_spill_is_freed() -> None:
    ch = ShmChannel(n_readers=2, capacity=2, slot_bytes=4096)
    try:
        w, r0, r1 = ch.writer(), ch.reader(0), ch.reader(1)
        before = set(ours())
        big = np.arange(1_000_000)
        w.write(big, timeout_s=1)
        assert w.statistics()["spills"] == 1
        spill = set(ours()) - before
        assert len(spill) == 1
        a, b = r0.read(timeout_s=1), r1.read(timeout_s=1)
        np.testing.assert_array_equal(a, big)
        np.testing.assert_array_equal(b, big)
        w.write(big + 1, timeout_s=1)                # readers still hold views: a second spill
        assert len(set(ours()) - before) == 2
        np.testing.assert_array_equal(r0.read(timeout_s=1), big + 1)
        np.testing.assert_array_equal(r1.read(timeout_s=1), big + 1)
        del a, b
        gc.collect()
        w.write(big + 2, timeout_s=1)                # free spills are reused, not remade
        assert len(set(ours()) - before) == 2
        np.testing.assert_array_equal(r0.read(timeout_s=1), big + 2)
        np.testing.assert_array_equal(r1.read(timeout_s=1), big + 2)
        gc.collect()
        w.write("small", timeout_s=1)               # idle spills stay for the next large ones
        assert w.statistics()["spill_segments"] == 2
        assert r0.read(timeout_s=1) == r1.read(timeout_s=1) == "small"
        w.close()                                    # the writer frees its idle spills
        assert set(ours()) - before == set()
    finally:
        ch.close()
    assert ours() == []


def test_an_unread_spill_survives_the_writer_closing() -> None:
    ch = ShmChannel(capacity=2, slot_bytes=1024)
    w, r = ch.writer(), ch.reader(0)
    w.write(b"x" * 100_000, timeout_s=1)
    w.close()
    assert r.read(timeout_s=1) == b"x" * 100_000
    with pytest.raises(ChannelClosedError):
        r.read(timeout_s=1)
    del w, r, ch
    gc.collect()
    assert ours() == []


@pytest.mark.parametrize("sync", ["spin", "block", "auto"])
def test_every_sync_mode_moves_values_and_times_out(sync: str) -> None:
    ch = ShmChannel(capacity=2, sync=sync)
    try:
        w, r = ch.writer(), ch.reader(0)
        for i in range(100):
            w.write(i, timeout_s=1)
            assert r.read(timeout_s=1) == i
        with pytest.raises(ChannelTimeoutError):
            r.read(timeout_s=0.05)
    finally:
        ch.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="sync must be 'auto', 'spin' or 'block', not 'fast'"):
        ShmChannel(sync="fast")
    with pytest.raises(ValueError, match="n_readers must be in 1..64, not 65"):
        ShmChannel(n_readers=65)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ShmChannel(capacity=0)
    assert ours() == []


def test_a_long_peer_check_travels_with_the_endpoint_and_mark_broken_still_wakes_at_once(
) -> None:
    ch = ShmChannel(check_s=30.0)           # the runtime's channels: it watches the processes
    try:
        reader = pickle.loads(pickle.dumps(ch.reader(0)))
        assert reader.statistics()["check_s"] == 30.0
        breaker = threading.Timer(0.2, ch.writer().mark_broken, ["actor Stage (pid 4242) died"])
        breaker.start()
        # without the wake, this read would time out (5 s) long before its next check (30 s)
        with pytest.raises(ChannelClosedError, match="pid 4242"):
            reader.read(timeout_s=5)
        breaker.join(5)
    finally:
        ch.close()


def test_an_endpoint_of_a_closed_and_unlinked_channel_cannot_attach() -> None:
    ch = ShmChannel()
    blob = pickle.dumps(ch.reader(0))
    ch.close()
    with pytest.raises(ChannelClosedError, match="no longer exists"):
        pickle.loads(blob)


def test_the_owner_unlinks_on_close_and_endpoints_stay_usable_until_then() -> None:
    ch = ShmChannel()
    name = ch.name
    assert name in ours()
    w = pickle.loads(pickle.dumps(ch.writer()))      # an attached (non-owner) endpoint
    r = ch.reader(0)
    w.write("x", timeout_s=1)
    assert r.read(timeout_s=1) == "x"
    w.close()                                        # a non-owner close: flag only
    assert name in ours()
    ch.close()
    assert name not in ours()
