"""Every fault case ends clean: no segment of a dead owner and no unreaped child remains."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from headrace._config import SHM_PREFIX
from headrace.channels.segments import SHM_DIR, is_alive

from ..conftest import child_pids


def _orphaned_segments() -> list[str]:
    """Segments named after a process that no longer runs (ours or anyone's)."""
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}-")]
    return [n for n in names if n.split("-")[1].isdigit() and not is_alive(int(n.split("-")[1]))]


def _zombie_children() -> list[int]:
    return [pid for pid in child_pids() if not is_alive(pid)]


@pytest.fixture(autouse=True)
def ends_clean() -> Iterator[None]:
    before = set(_orphaned_segments())      # another run's leftovers are not this case's
    yield
    deadline = time.monotonic() + 2.0
    while (set(_orphaned_segments()) - before or _zombie_children()) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(set(_orphaned_segments()) - before) == [], "segments of dead processes left"
    assert _zombie_children() == [], f"children that died were not reaped: {_describe()}"


def _describe() -> str:
    """What the runtime knows of each zombie child, and where its I/O thread (the reaper) is."""
    import sys
    import traceback
    from headrace.runtime import api
    rt = api._RUNTIME
    known = {p.pid: (p.label, p.state.name) for p in rt.procs.values()} if rt else {}
    io = next((t for t in threading.enumerate() if t.name == "headrace-io"), None)
    stack = "".join(traceback.format_stack(sys._current_frames()[io.ident])) if io else "none"
    return f"{[(pid, known.get(pid)) for pid in _zombie_children()]}; I/O thread:\n{stack}"
