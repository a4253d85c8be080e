"""Every fault case ends clean: no segment of a dead owner remains (within 5 s).

(Children are checked per module by the root conftest's no_leaks: none may be left after
shutdown, zombies included.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from headrace._config import SHM_PREFIX
from headrace.channels.segments import SHM_DIR, is_alive


def _orphaned_segments() -> list[str]:
    """Segments named after a process that no longer runs (ours or anyone's)."""
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}-")]
    return [n for n in names if n.split("-")[1].isdigit() and not is_alive(int(n.split("-")[1]))]


@pytest.fixture(autouse=True)
def ends_clean() -> Iterator[None]:
    before = set(_orphaned_segments())      # another run's leftovers are not this case's
    yield
    deadline = time.monotonic() + 5.0       # a killed child may take a while to die, loaded
    while set(_orphaned_segments()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(set(_orphaned_segments()) - before) == [], "segments of dead processes left"
