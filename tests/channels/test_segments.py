"""POSIX shm segments: naming, ownership, unlink, sweep of dead owners."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from headrace.channels.segments import (SHM_DIR, Segment, is_alive, owned_segments,
                                        segment_name, start_ticks, sweep_dead_owners)


def test_name_carries_prefix_owner_pid_and_its_start_time() -> None:
    name = segment_name()
    prefix, pid, ticks, token = name.split("-")
    assert prefix == "headrace" and int(pid) == os.getpid() and len(token) == 16
    assert ticks == f"t{start_ticks(os.getpid())}"


def test_owner_unlinks_when_collected_and_mapping_outlives_the_name() -> None:
    seg = Segment.create(4096)
    name = seg.name
    seg.buf[:5] = b"hello"
    reader = Segment.open(name)
    assert bytes(reader.buf[:5]) == b"hello" and reader.buf.readonly
    view = reader.buf[:5]
    del seg
    gc.collect()
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert bytes(view) == b"hello"                  # the mapping is still valid


def test_non_owner_never_unlinks() -> None:
    seg = Segment.create(128)
    other = Segment.open(seg.name)
    del other
    gc.collect()
    assert os.path.exists(os.path.join(SHM_DIR, seg.name))
    seg.unlink()
    seg.unlink()                                    # idempotent
    assert not os.path.exists(os.path.join(SHM_DIR, seg.name))


def test_open_missing_segment_raises() -> None:
    with pytest.raises(FileNotFoundError):
        Segment.open("headrace-1-doesnotexist")


def test_sweep_removes_segments_of_dead_owners_only() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=30)
    dead_pid = int(dead.stdout)
    assert not is_alive(dead_pid)
    orphan = Segment.create(64, segment_name(dead_pid), owner=False)
    mine = Segment.create(64)
    removed = sweep_dead_owners()
    assert orphan.name in removed and mine.name not in removed
    assert owned_segments(dead_pid) == [] and mine.name in owned_segments(os.getpid())
    mine.unlink()
