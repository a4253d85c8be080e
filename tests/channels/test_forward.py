"""Forwards: a value read zero-copy from one ring and written unchanged to another is passed on as
a reference to where it lives, not copied; it stays there, unwritten, until every reader of every
ring it went through has dropped it."""

from __future__ import annotations

import gc

import numpy as np
import pyarrow as pa
import pytest

from headrace.channels.shm import ShmChannel
from headrace.exceptions import ChannelClosedError, ChannelTimeoutError


@pytest.fixture
def rings():
    made: list = []

    def make(n_readers: int = 1, capacity: int = 1, slot_bytes: int = 2 << 20):
        ch = ShmChannel(n_readers, capacity=capacity, slot_bytes=slot_bytes)
        ends = [ch.writer(), *(ch.reader(i) for i in range(n_readers))]
        made.append((ch, ends))
        return ends

    yield make
    gc.collect()
    for ch, ends in made:
        for end in ends:
            end.close()
        ch.close()


def _table(n: int) -> pa.Table:
    return pa.table({"i": np.arange(n), "s": [f"row{k}" for k in range(n)]})


@pytest.mark.parametrize("value", [np.arange(200_000), _table(20_000)], ids=["ndarray", "arrow"])
def test_an_unchanged_value_is_forwarded_not_copied(rings, value) -> None:
    aw, ar = rings()
    bw, br = rings()
    aw.write(value)
    bw.write(ar.read(timeout_s=5))
    out = br.read(timeout_s=5)
    assert (out.equals(value) if isinstance(value, pa.Table) else np.array_equal(out, value))
    stats = bw.statistics()
    assert stats["forwards"] == 1 and stats["bytes"] < 200 and stats["spills"] == 0


def test_a_changed_value_is_copied(rings) -> None:
    aw, ar = rings()
    bw, br = rings()
    aw.write(np.arange(100_000))
    v = ar.read(timeout_s=5)
    bw.write(v[1:])
    assert br.read(timeout_s=5)[0] == 1
    bw.write(v + 1)
    assert br.read(timeout_s=5)[0] == 1
    assert bw.statistics()["forwards"] == 0


def test_the_area_stays_until_every_reader_drops_the_value(rings) -> None:
    aw, ar = rings()                        # one payload area
    bw, b0, b1 = rings(n_readers=2)
    x = np.arange(200_000)
    aw.write(x)
    v = ar.read(timeout_s=5)
    bw.write(v)
    del v
    outs = [b0.read(timeout_s=5), b1.read(timeout_s=5)]
    for k in range(2):                      # held by two readers of B: A must not reuse it
        aw.write(np.full(200_000, k))
        assert ar.read(timeout_s=5)[0] == k
        assert all(np.array_equal(o, x) for o in outs)
    spills = aw.statistics()["spills"]
    assert spills == 2
    outs.pop()
    gc.collect()
    aw.write(np.zeros(200_000))
    ar.read(timeout_s=5)
    assert aw.statistics()["spills"] == spills + 1      # one reader still holds it
    outs.clear()
    gc.collect()
    aw.write(np.zeros(200_000))
    ar.read(timeout_s=5)
    assert aw.statistics()["spills"] == spills + 1      # free again: written in place


def test_a_chain_of_forwards_points_at_the_first_spill(rings) -> None:
    aw, ar = rings(capacity=2, slot_bytes=100_000)      # 8 MB values spill
    bw, br = rings(capacity=2, slot_bytes=100_000)
    cw, cr = rings(capacity=2, slot_bytes=100_000)
    x = np.arange(1_000_000)
    aw.write(x)
    v = ar.read(timeout_s=5)
    bw.write(v)
    w = br.read(timeout_s=5)
    cw.write(w)
    out = cr.read(timeout_s=5)
    del v, w
    gc.collect()
    for k in range(4):                      # A's writer must not reuse the spill out is in
        aw.write(np.full(1_000_000, k))
        assert ar.read(timeout_s=5)[0] == k
    assert np.array_equal(out, x)
    assert bw.statistics()["forwards"] == cw.statistics()["forwards"] == 1
    assert cw.statistics()["bytes"] < 200


def test_a_forward_that_cannot_be_written_gives_its_views_back(rings) -> None:
    aw, ar = rings()
    bw, br = rings()
    aw.write(np.arange(200_000))
    bw.write(7)                             # B's only slot is taken
    v = ar.read(timeout_s=5)
    with pytest.raises(ChannelTimeoutError):
        bw.write(v, timeout_s=0.05)
    del v
    gc.collect()
    aw.write(np.zeros(200_000))             # nobody holds A's area: written in place
    assert aw.statistics()["spills"] == 0
    assert br.read(timeout_s=5) == 7


def test_a_forward_whose_ring_is_gone_fails_that_value_only(rings) -> None:
    a = ShmChannel(1, capacity=1, slot_bytes=2 << 20)
    aw, ar = a.writer(), a.reader(0)
    bw, br = rings()
    aw.write(np.arange(200_000))
    bw.write(ar.read(timeout_s=5))
    gc.collect()
    for end in (aw, ar, a):
        end.close()                         # the owner unlinks A
    with pytest.raises(ChannelClosedError, match="forwarded value lives in is gone"):
        br.read(timeout_s=5)
    bw.write(np.arange(100_000))            # B goes on
    assert br.read(timeout_s=5)[-1] == 99_999


def test_forwards_out_of_a_reused_spill_map_it_once_and_read_each_value(rings, monkeypatch) -> None:
    """An echo loop of spilled values (a 1.6 MB Arrow table through an actor): the reader of the
    forwards maps the writer's spill segment once and keeps it, and still reads each new value
    written into it (a mapping per value cost ~90 us of a 300 us round trip)."""
    import headrace.channels.shm as shm
    aw, ar = rings(capacity=2, slot_bytes=100_000)
    bw, br = rings(capacity=2, slot_bytes=100_000)
    opened = []
    real_open = shm.Segment.open
    monkeypatch.setattr(shm.Segment, "open",
                        staticmethod(lambda name, **kw: opened.append(name) or
                                     real_open(name, **kw)))
    for k in range(20):
        aw.write(np.full(200_000, k))
        v = ar.read(timeout_s=5)
        bw.write(v)
        del v
        out = br.read(timeout_s=5)
        assert out[0] == out[-1] == k
        del out
        gc.collect()
    assert bw.statistics()["forwards"] == 20
    assert len(opened) <= 4, opened         # each reader maps a reused spill once, not per value
