"""A doorbell: one futex word that the writers of several channels ring, so that one reader can
wait for whichever of them has a value first.

In: channels made with ``ring=bell`` (``ShmChannel``, ``SocketChannel``): their writer endpoints
ring the bell after every value they publish, and every endpoint rings it when it closes.
Out: ``seen()`` and ``wait(seen, timeout_s)`` for the one reading thread (a compiled DAG's
driver reading all its output channels at once: an error of one output is seen as soon as it
arrives, whatever its siblings do).
Invariants: no lost wake-up. The reader reads ``seen()``, then tries each channel without
waiting, then waits only while the bell still shows ``seen``; a writer publishes its value before
it rings (sequentially consistent atomics, the protocol of ``channels.native``). A bell rung by
a process that cannot open it (another host) is not rung: the reader's waits are sliced, so it
still sees those values, a slice later. The owner unlinks the segment when it is closed or
collected; endpoints in other processes map it by name.

  writer A: publish ─▶ ring ─┐
  writer B: publish ─▶ ring ─┴─▶ [bell word] ─▶ reader: wait(seen) ─▶ try A, try B
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import abi, native
from .segments import Segment
from .shm import _IDLE_FACTOR

_BYTES = 4096


class Doorbell:
    """A futex word in a shared-memory segment of its own (owned by the process that made it).

    Args:
        spin_us: how long ``wait`` spins before it sleeps; it stops spinning after an idle wait
            (the "auto" rule of the shm channels), so an idle reader burns no CPU.
    """

    __slots__ = ("__weakref__", "_b", "_ops", "_seg", "_spin_us", "_st")

    def __init__(self, spin_us: float = 50.0) -> None:
        self._setup(Segment.create(_BYTES), spin_us)

    def _setup(self, seg: Segment | None, spin_us: float) -> None:
        self._seg = seg
        self._spin_us = spin_us
        self._ops = native.ops()
        self._b = None if seg is None else np.frombuffer(seg.mmap, np.uint32, abi.BELL_WORDS)
        self._st = st = np.zeros(abi.ST_WORDS, np.int64)
        st[abi.ST_SPIN] = st[abi.ST_SPIN_MAX] = int(spin_us * 1000)
        st[abi.ST_IDLE_NS] = _IDLE_FACTOR * int(spin_us * 1000)

    def __reduce__(self) -> Any:
        return _attach, (None if self._seg is None else self._seg.name, self._spin_us)

    @property
    def name(self) -> str | None:
        return None if self._seg is None else self._seg.name

    def ring(self) -> None:
        """A value was published (or a channel closed): wake the reader if it sleeps."""
        if self._b is not None:
            self._ops["ring"](self._b)

    def address(self) -> int:
        """Address of the bell's word (its sleepers count is the next word)."""
        return self._b.ctypes.data + 4 * abi.RD_NOTIFY

    def seen(self) -> int:
        """The bell's count now: read it *before* trying the channels, then ``wait`` on it."""
        return int(native.load(self._b, abi.RD_NOTIFY))

    def wait(self, seen: int, timeout_ns: int) -> bool:
        """Wait until the bell rang after it showed ``seen`` (or was closed), at most
        ``timeout_ns`` (the caller slices long waits); False on timeout."""
        return self._ops["bell_wait"](self._b, self._st, seen, max(0, timeout_ns)) != 0

    def close(self) -> None:
        """Wake the reader for good (its waits return at once) and unlink the segment."""
        if self._b is not None:
            native.close(self._b, 1)
        if self._seg is not None:
            self._seg.unlink()

    def __repr__(self) -> str:
        return f"<Doorbell {self.name}>"


def _attach(name: str | None, spin_us: float) -> Doorbell:
    """Map a bell made by another process (unpickling lands here). A bell that is gone (its
    owner exited, or lives on another host) is never rung: its readers' sliced waits cover it."""
    bell = object.__new__(Doorbell)
    try:
        seg = Segment.open(name, writable=True) if name is not None else None
    except FileNotFoundError:
        seg = None
    bell._setup(seg, spin_us)
    return bell
