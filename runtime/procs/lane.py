"""Actor lanes: two shared-memory rings between the driver and one actor process.

In: control messages (``header``, frames) as ``protocol`` defines them. Out: the same messages on
the other side, without zmq's I/O threads in the way (a call round trip costs two futex hand-offs,
or none while the peer is still spinning).
Invariants:
- The call ring carries INIT_ACTOR, CALL and EXIT to the actor, in submission order; the driver
  writes it only under the runtime lock and never blocks on it (a full ring keeps calls queued).
- The result ring carries the actor's replies. A driver thread that waits for an actor call reads
  it itself (``drive``; the lane is a ``runtime.refs.waiting.Producer``), announcing so in the ring
  (as does a thread watching it among other producers); after each reply the actor checks the
  announcement and, when nobody reads, rings the doorbell (a tiny zmq message to the driver's
  inbox), so callbacks, futures and ``done()`` see results without anyone waiting in ``get()``.
- Before a death is handled, the driver drains what the actor wrote before dying.

  driver ─ CALL ─▶ [call ring] ─▶ actor main thread ─▶ fn ─▶ [result ring] ─▶ thread in get()
                                                                └─ nobody reading? DOORBELL (zmq)
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from ... import _config
from ...channels.shm import ShmChannel
from ...exceptions import ChannelClosedError, ChannelTimeoutError
from ..refs.deadline import Deadline
from ..refs.waiting import ReadRole

logger = logging.getLogger(__name__)
CAPACITY = 32                   # messages in flight each way before the driver queues calls
SLOT_BYTES = 16 * 1024          # larger messages spill (their big buffers are in segments anyway)
SPIN_US = float(os.environ.get("HEADRACE_LANE_SPIN_US", "500"))   # see ShmChannel "auto"
_GRACE_S = 300e-6               # how long an actor waits for a reader before ringing...
_PROBE_EVERY = 16               # ...or, while readers keep not coming, only every 16th time
#: Backstop: a reading thread re-checks its condition this often (a ref of the lane cancelled
#: by another thread before it was sent is final without a reply).
_BACKSTOP_S = 0.1


def _pack(header: tuple[Any, ...], frames: list[Any] | None) -> bytes:
    """One message as bytes: a plain pickle (inline frames are small; large data is in segments)."""
    tail = [pickle.PickleBuffer(f) for f in frames[1:]] if frames else []
    return pickle.dumps((header, tail), protocol=5)


def _unpack(message: bytes) -> tuple[tuple[Any, ...], list[Any]]:
    header, tail = pickle.loads(message)
    return header, [None, *tail]


class DriverLane:
    """The driver's end: writes calls, reads results (one reading thread at a time)."""

    def __init__(self, handle: Callable[[tuple, list], None],
                 check_s: float = _config.WATCHED_CHECK_S) -> None:
        self.calls = ShmChannel(1, CAPACITY, SLOT_BYTES, spin_us=SPIN_US, check_s=check_s)
        self.results = ShmChannel(1, CAPACITY, SLOT_BYTES, spin_us=SPIN_US, check_s=check_s)
        self._call_w = self.calls.writer()
        self._result_r = self.results.reader(0)
        self._handle = handle
        self._role = ReadRole(self.results.notify)  # which thread reads the result ring
        self._doorbell = False
        self._watchers = 0                  # threads reading or watching the result ring
        self._watch_lock = threading.Lock()

    def worker_ends(self) -> tuple[ShmChannel, ShmChannel]:
        """The actor's endpoints (picklable): call reader, result writer."""
        return self.calls.reader(0), self.results.writer()

    def send(self, header: tuple[Any, ...], frames: list[Any] | None = None,
             timeout_s: float = 0) -> bool:
        """Write a message to the actor; False if the ring stayed full for ``timeout_s``."""
        try:
            self._call_w.write(_pack(header, frames), timeout_s=timeout_s)
        except ChannelTimeoutError:
            return False
        except ChannelClosedError:
            return True                     # the actor is gone: its death fails the call
        return True

    # -- the Producer of its calls' refs (runtime.refs.waiting) ----------------------------------
    def drive(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        """Read replies on this thread until ``cond()`` or the deadline; False if another thread
        reads now or the lane is closed (the caller then waits on its refs' callbacks)."""
        if self.results.closed or not self._role.take():
            return False
        try:
            self._read(cond, deadline)
        finally:
            self._give()
        return cond() or deadline.remaining_s() == 0

    def poll(self) -> None:
        """Handle the replies already in the ring (nothing if another thread reads it)."""
        if self._role.take():
            try:
                self._drain()
            finally:
                self._give()

    def words(self) -> list[int]:
        return [self.results.notify_address()]

    def enter(self) -> None:
        self._announce(1)           # the actor need not ring the doorbell: a waiter watches

    def leave(self) -> None:
        self._announce(-1)
        self.poll()                 # what came in as we left: the actor saw us watching

    def _announce(self, delta: int) -> None:
        with self._watch_lock:
            self._watchers += delta
            if self._watchers == (1 if delta > 0 else 0):
                self._result_r.announce_reading(delta > 0)

    def _give(self) -> None:
        self._role.give()
        self._after_release()

    def _read(self, cond: Callable[[], bool], deadline: Deadline) -> None:
        reader = self._result_r
        self._announce(1)
        try:
            while not cond():
                remaining = deadline.remaining_s()
                if remaining == 0:
                    return
                try:
                    message = reader.read(timeout_s=_BACKSTOP_S if remaining is None
                                          else min(_BACKSTOP_S, remaining))
                except ChannelTimeoutError:
                    continue
                except ChannelClosedError:
                    return
                self._handle(*_unpack(message))
        finally:
            self._announce(-1)
            self._drain()                   # what came in as we left: the actor saw us reading

    def _drain(self) -> None:
        reader = self._result_r
        while True:
            try:
                message = reader.read_if_any()
            except ChannelClosedError:
                return
            if message is None:
                return
            self._handle(*_unpack(message))

    def doorbell(self) -> None:
        """The actor wrote while nobody read: drain now, or have the reading thread do it."""
        self._doorbell = True
        self._after_release()

    def _after_release(self) -> None:
        while self._doorbell and self._role.take():
            try:
                self._doorbell = False
                self._drain()
            finally:
                self._role.give()

    def drain_dead(self, reason: str, timeout_s: float = 1.0) -> None:
        """The actor died: wake any reader, then handle everything it wrote before dying."""
        self.results.mark_broken(reason)
        self.calls.mark_broken(reason)
        if self._role.take_blocking(timeout_s):
            try:
                self._drain()
            finally:
                self._role.give()

    def close(self) -> None:
        self.calls.close()
        self.results.close()


def attach(blob: bytes, doorbell: Callable[[], None]) -> WorkerLane | None:
    """The actor's end of the rings ``blob`` names (``DriverLane.worker_ends``, pickled), or
    None: calls stay on zmq. Rings the driver closed before we attached them (it is ending, or
    gave up on this process) are no error and say nothing; any other failure is logged."""
    try:
        return WorkerLane(pickle.loads(blob), doorbell)
    except ChannelClosedError:
        return None
    except BaseException:                   # noqa: BLE001 - no lane: calls stay on zmq
        logger.exception("could not attach the shm lane")
        return None


class WorkerLane:
    """The actor's end: reads calls, writes replies (and rings the doorbell when nobody reads)."""

    def __init__(self, ends: tuple[ShmChannel, ShmChannel],
                 doorbell: Callable[[], None]) -> None:
        self._calls, self._results = ends
        self._doorbell = doorbell
        self._grace_s = _GRACE_S        # 0 while the driver keeps not reading (fire and forget)
        self._sent = 0

    def recv(self) -> tuple[tuple[Any, ...], list[Any]]:
        """The next message; raises ChannelClosedError when the driver is gone."""
        return _unpack(self._calls.read())

    def close(self) -> None:
        self._calls.close()
        self._results.close()

    def send(self, header: tuple[Any, ...], frames: list[Any] | None = None) -> None:
        results = self._results
        results.write(_pack(header, frames))
        self._sent += 1
        if results.reader_is_active():
            return
        # The driver often starts reading a moment later (it is still submitting): give it
        # that moment before paying for a doorbell, which wakes its I/O thread. When it keeps
        # not coming (calls fired and forgotten), ring at once, probing now and then.
        grace = self._grace_s or (_GRACE_S if self._sent % _PROBE_EVERY == 0 else 0.0)
        until = time.perf_counter() + grace
        while time.perf_counter() < until:
            if results.reader_is_active() or results.backlog() == 0:
                self._grace_s = _GRACE_S
                return
        self._grace_s = 0.0
        self._doorbell()
