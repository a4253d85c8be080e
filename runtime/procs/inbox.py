"""The driver's inbox: one PULL socket, read by whichever thread is waiting for a result.

In: replies from children (RESULT, ERROR, ...). Out: calls to ``handle(header, frames)``.
Invariants: only the holder of ``role`` touches the socket. A thread blocked in ``get()`` takes it
and reads the replies itself, so a round trip costs no hand-off between threads; the I/O thread
holds it while no user thread has wanted it for a poll period, or while a waiter relies on it
(a ``get`` over several producers): it then completes refs for callbacks, futures, ``await``
and those waiters. A thread that finds another user thread reading waits on its refs' callbacks;
the reader, letting go, hands the socket to the I/O thread.

  user thread in get():  lock ─▶ poll(sock) ─▶ handle ─▶ its ref is final ─▶ unlock
  I/O thread (no waiter): lock ─▶ poll(sock, wake pipe, pidfds) ─▶ handle ─▶ unlock
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import zmq

from ..wire import protocol
from ..refs.deadline import Deadline
from ..refs.waiting import ReadRole

#: Backstop: a receiving waiter re-checks the I/O thread's needs and the closed flag this often.
_SLICE_MS = 50
# NOTE: plain ints: pyzmq's enum flags cost microseconds per operation (IntFlag arithmetic)
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
#: How long a waiter waits for the I/O thread to let go of the socket before it looks again.
_HANDOVER_S = 0.05


class Inbox:
    """The PULL socket plus the protocol deciding which thread reads it; the ``Producer``
    (``runtime.refs.waiting``) of refs whose replies come over zmq."""

    def __init__(self, sock: zmq.Socket, handle: Callable[[tuple, list], None],
                 wake_io: Callable[[], None]) -> None:
        self.sock = sock
        self.socks = [sock]             # and the TCP one of children on other hosts (hosts/)
        self._pollset = [(sock, _POLLIN)]
        self.role = ReadRole(wake_io)   # a waiter found it taken: the I/O thread takes over
        self.closed = False
        self._handle = handle
        self._wake_io = wake_io
        self._wants = 0                 # user threads inside drive
        self._hold = 0                  # waiters that rely on the I/O thread reading
        self._count_lock = threading.Lock()
        self._receipts = 0              # bumped each time a user thread takes the socket
        self._seen = -1
        self.io_ident: int | None = None
        self.io_wants = False           # the I/O thread needs the socket (a child died)

    def add(self, sock: zmq.Socket) -> None:
        """Read ``sock`` too (before the I/O thread starts)."""
        self.socks.append(sock)
        self._pollset.append((sock, _POLLIN))

    def drain(self, settle_s: float = 0.0) -> None:
        """Handle every message already here (caller holds the role); wait ``settle_s`` more."""
        deadline = time.monotonic() + settle_s
        while True:
            for sock in self.socks:
                while sock.getsockopt(_EVENTS) & _POLLIN:
                    try:
                        header, frames = protocol.recv(sock, _NOBLOCK)
                    except zmq.Again:       # EVENTS said POLLIN early (CURVE): poll again
                        break
                    self._handle(header, frames)
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not self._poll(math.ceil(left_ms)):
                return

    def _poll(self, ms: int) -> bool:
        """Whether a message came within ``ms`` on any of our sockets."""
        return bool(zmq.zmq_poll(self._pollset, ms))

    def take_for_io(self, timeout_s: float = 1.0) -> bool:
        """For the I/O thread: get the socket back from a receiving user thread."""
        self.io_wants = True
        try:
            return self.role.take_blocking(timeout_s)
        finally:
            self.io_wants = False

    def io_should_read(self) -> bool:
        """For the I/O thread: a waiter relies on it, or no user thread wanted the socket since
        the last call (a thread in a get loop keeps it between calls)."""
        if self._hold and not self._wants:
            return True
        if self._wants or self._receipts != self._seen:
            self._seen = self._receipts
            return False
        return True

    # -- Producer ---------------------------------------------------------------------------
    def drive(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        """Read replies on this thread until ``cond()`` or the deadline. False if another user
        thread reads now, or the I/O thread needs the socket for a death: the caller then waits
        on its refs' callbacks."""
        if threading.get_ident() == self.io_ident:
            raise RuntimeError("a blocking get() inside a done callback would stall headrace's "
                               "I/O thread; use add_done_callback or await the ref instead")
        with self._count_lock:
            self._wants += 1
        try:
            return self._drive(cond, deadline)
        finally:
            with self._count_lock:
                self._wants -= 1

    def _drive(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        role = self.role
        while not cond():
            remaining = deadline.remaining_s()
            if remaining == 0:
                return True
            if self.closed or self.io_wants:    # shutdown finishes the refs: wait for that
                return False
            if not role.take():
                if role.holder != self.io_ident:
                    return False            # another user thread reads: it may finish ours
                self._wake_io()             # the I/O thread is parked in poll(): it lets go
                if not role.take_blocking(_HANDOVER_S if remaining is None
                                          else min(_HANDOVER_S, remaining)):
                    continue
            try:
                self._receive(cond, deadline)
            finally:
                role.give()
        return True

    def poll(self) -> None:
        pass                        # a waiter that relies on us has the I/O thread read


    def words(self) -> list[int]:
        return []                   # zmq has no futex word: the I/O thread reads for waiters

    def enter(self) -> None:
        with self._count_lock:
            self._hold += 1
        self._wake_io()

    def leave(self) -> None:
        with self._count_lock:
            self._hold -= 1

    def _receive(self, cond: Callable[[], bool], deadline: Deadline) -> None:
        self._receipts += 1
        while not cond() and not self.closed and not self.io_wants:
            remaining = deadline.remaining_s()
            if remaining == 0:
                return
            ms = _SLICE_MS if remaining is None else min(_SLICE_MS, math.ceil(remaining * 1000))
            if self._poll(ms):
                self.drain()
