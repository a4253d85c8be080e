"""The in-process channel: a bounded ring of Python objects between threads of one process.

In: values written by one thread. Out: the same objects (no serialization, no copy) to each of
``n_readers`` readers. Invariants: those of ``channels.base``; it cannot cross processes
(pickling an endpoint raises ``TypeError``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .base import WRITER, Channel, closed_error, timeout_error, timeout_ns


class _Ring:
    def __init__(self, n_readers: int, capacity: int) -> None:
        self.n_readers = n_readers
        self.capacity = capacity
        self.values: list[Any] = [None] * capacity
        self.unread = [0] * capacity
        self.write_seq = 0
        self.cond = threading.Condition(threading.Lock())
        self.closed = False
        self.reason: str | None = None


class InProcChannel(Channel):
    """A channel whose endpoints are threads of this process. ``capacity`` values in flight."""

    kind = "inproc"

    def __init__(self, n_readers: int = 1, capacity: int = 8, *, _ring: _Ring | None = None,
                 _role: int | None = None) -> None:
        if _ring is None:
            if not 1 <= n_readers:
                raise ValueError(f"n_readers must be >= 1, not {n_readers}")
            if capacity < 1:
                raise ValueError(f"capacity must be >= 1, not {capacity}")
            _ring = _Ring(n_readers, capacity)
        self._ring = _ring
        self.role = _role
        self._seq = 0
        self._stats = {"values": 0, "waits": 0}

    def writer(self) -> InProcChannel:
        return InProcChannel(_ring=self._ring, _role=WRITER)

    def reader(self, index: int = 0) -> InProcChannel:
        if not 0 <= index < self._ring.n_readers:
            raise IndexError(f"reader index {index} out of range for "
                             f"{self._ring.n_readers} readers")
        return InProcChannel(_ring=self._ring, _role=index)

    def write(self, value: Any, timeout_s: float | None = None) -> None:
        self._check_role("writer")
        ring = self._ring
        slot = self._seq % ring.capacity
        with ring.cond:
            if not self._wait(lambda: ring.unread[slot] == 0, timeout_s):
                raise timeout_error(self, "write", timeout_s)
            ring.values[slot] = value
            ring.unread[slot] = ring.n_readers
            ring.write_seq += 1
            ring.cond.notify_all()
        self._seq += 1
        self._stats["values"] += 1

    def read(self, timeout_s: float | None = None) -> Any:
        self._check_role("reader")
        ring = self._ring
        seq = self._seq
        slot = seq % ring.capacity
        with ring.cond:
            if not self._wait(lambda: ring.write_seq > seq, timeout_s, drain=True):
                raise timeout_error(self, "read", timeout_s)
            value = ring.values[slot]
            ring.unread[slot] -= 1
            if ring.unread[slot] == 0:
                ring.values[slot] = None
                ring.cond.notify_all()
        self._seq += 1
        self._stats["values"] += 1
        return value

    def _wait(self, ready: Any, timeout_s: float | None, drain: bool = False) -> bool:
        """Under the lock: wait for ``ready()``; False on timeout; raises once closed."""
        ring = self._ring
        limit = timeout_ns(timeout_s)
        deadline = None if limit < 0 else time.monotonic() + limit / 1e9
        waited = False
        while True:
            if drain and ready():       # values written before a close stay readable
                return True
            if ring.closed:
                raise closed_error(self, ring.reason)
            if not drain and ready():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not waited:
                self._stats["waits"] += 1
                waited = True
            ring.cond.wait(remaining)

    def close(self) -> None:
        self._shut(None)

    def mark_broken(self, reason: str) -> None:
        self._shut(reason)

    def _shut(self, reason: str | None) -> None:
        ring = self._ring
        with ring.cond:
            if not ring.closed:
                ring.closed = True
                ring.reason = reason
            ring.cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._ring.closed

    def statistics(self) -> dict[str, Any]:
        return {"kind": self.kind, "role": self.role, "n_readers": self._ring.n_readers,
                "capacity": self._ring.capacity, "closed": self._ring.closed,
                "bytes": 0, "spills": 0, **self._stats}

    def __reduce__(self) -> Any:
        raise TypeError("an in-process channel cannot be sent to another process; "
                        "use a shared-memory or socket channel across processes")

    def __repr__(self) -> str:
        role = "owner" if self.role is None else "writer" if self.role == WRITER \
            else f"reader {self.role}"
        return f"<InProcChannel {role}, {self._ring.n_readers} readers>"
