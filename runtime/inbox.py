"""The driver's inbox: one PULL socket, read by whichever thread is waiting for a result.

In: replies from children (RESULT, ERROR, ...). Out: calls to ``handle(header, frames)``.
Invariants: only the holder of ``lock`` touches the socket. A thread blocked in ``get()`` takes the
lock and reads the replies itself, so a round trip costs no hand-off between threads; the I/O
thread holds it only while no user thread has wanted it for a poll period (it then completes refs
for callbacks, futures and ``await``). A waiter never sleeps more than a short slice without
re-checking its condition, so deaths seen by the I/O thread wake it promptly.

  user thread in get():  lock ─▶ poll(sock) ─▶ handle ─▶ its ref is final ─▶ unlock
  I/O thread (no waiter): lock ─▶ poll(sock, wake pipe, pidfds) ─▶ handle ─▶ unlock
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import zmq

from . import protocol
from .deadline import Deadline

#: Longest a receiving waiter polls before re-checking its condition and the closed flag.
_SLICE_MS = 50
#: How long a waiter that cannot get the lock sleeps between checks of its condition.
_CONTENDED_S = 0.002


class Inbox:
    """The PULL socket plus the protocol deciding which thread reads it."""

    def __init__(self, sock: zmq.Socket, handle: Callable[[tuple, list], None],
                 wake_io: Callable[[], None]) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.closed = False
        self._handle = handle
        self._wake_io = wake_io
        self._wants = 0                 # user threads inside wait_until
        self._wants_lock = threading.Lock()
        self._receipts = 0              # bumped each time a user thread takes the socket
        self._seen = -1
        self.io_ident: int | None = None
        self.io_wants = False           # the I/O thread needs the socket (a child died)

    def drain(self, settle_s: float = 0.0) -> None:
        """Handle every message already here (caller holds ``lock``); wait ``settle_s`` more."""
        sock = self.sock
        deadline = time.monotonic() + settle_s
        while True:
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                header, frames = protocol.recv(sock, zmq.NOBLOCK)
                self._handle(header, frames)
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not sock.poll(math.ceil(left_ms)):
                return

    def take_for_io(self, timeout_s: float = 1.0) -> bool:
        """For the I/O thread: get the socket back from a receiving user thread."""
        self.io_wants = True
        try:
            return self.lock.acquire(timeout=timeout_s)
        finally:
            self.io_wants = False

    def users_idle(self) -> bool:
        """For the I/O thread: no user thread wanted the socket since the last call."""
        if self._wants or self._receipts != self._seen:
            self._seen = self._receipts
            return False
        return True

    def wait_until(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        """Read replies on this thread until ``cond()`` or the deadline; returns ``cond()``."""
        if threading.get_ident() == self.io_ident:
            raise RuntimeError("a blocking get() inside a done callback would stall headrace's "
                               "I/O thread; use add_done_callback or await the ref instead")
        with self._wants_lock:
            self._wants += 1
        try:
            return self._wait(cond, deadline)
        finally:
            with self._wants_lock:
                self._wants -= 1

    def _wait(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        woke = False
        while not cond():
            remaining = deadline.remaining_s()
            if remaining == 0 or self.closed:
                return cond()
            if self.io_wants:                   # let the I/O thread drain before a death
                time.sleep(_CONTENDED_S / 2)
                continue
            if not self.lock.acquire(blocking=False):
                if not woke:                    # the I/O thread may be parked in poll()
                    self._wake_io()
                    woke = True
                slice_s = _CONTENDED_S if remaining is None else min(_CONTENDED_S, remaining)
                if not self.lock.acquire(timeout=slice_s):
                    continue
            try:
                self._receive(cond, deadline)
            finally:
                self.lock.release()
        return True

    def _receive(self, cond: Callable[[], bool], deadline: Deadline) -> None:
        self._receipts += 1
        while not cond() and not self.closed and not self.io_wants:
            remaining = deadline.remaining_s()
            if remaining == 0:
                return
            ms = _SLICE_MS if remaining is None else min(_SLICE_MS, math.ceil(remaining * 1000))
            if self.sock.poll(ms):
                self.drain()
