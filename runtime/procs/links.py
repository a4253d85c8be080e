"""Direct calls: a worker calls an actor over a pair of shm rings of their own, not through
the driver (a nested call costs one round trip, as the driver's own calls do).

In: the calls a worker makes to an actor (``WorkerClient.submit_call``). Out: the callee's
replies, read by the caller's thread that waits for them (or, when nobody waits, after the
callee rang the caller's doorbell, by its control thread).
Invariants:
- A call goes direct when nothing in its arguments needs the driver (no refs, no handles);
  otherwise it goes through the driver. ``Route`` keeps one caller's calls to one actor in the
  order they were made: calls of one kind go out only while no call of the other kind is still
  running (an actor that runs its calls concurrently has no order to keep).
- The link is set up by an ordinary call through the driver (``LINK``, an internal method): the
  driver starts the actor first if need be, and fails the call if the actor is dead; calls made
  meanwhile wait behind it. A failed or dead link sends the calls through the driver again.
- Ownership stays with the driver's rule: the values of direct calls live in the caller, in
  segments named after it (its death frees them); a direct ref that leaves the caller (an
  argument of a call through the driver, inside a value, a return value) is first adopted by the
  driver (``WorkerClient.adopt``); a reply that carries refs or handles goes through the driver.
- The callee's death fails the pending direct calls with ``ActorDiedError`` (the caller's
  control thread watches its pidfd); the caller's death ends the callee's link thread (its ring
  reader checks its peer every ``_CHECK_S``).

  caller thread ─ CALL ─▶ [call ring] ─▶ callee link thread ─▶ fn ─▶ [result ring] ─▶ caller
                                                                 └─ nobody reading? DOORBELL (zmq)
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ...exceptions import ActorDiedError

#: The internal actor method that attaches a caller's link (not a user method name).
LINK = "__headrace_link__"
#: How often a blocked link endpoint checks that its peer's process still exists.
_CHECK_S = 1.0
_LINK_IDS = itertools.count(1)


class Link:
    """The caller's end: writes calls to the callee's link thread, reads its replies."""

    def __init__(self, label: str, handle: Callable[[Link, tuple, list], None]) -> None:
        from .lane import DriverLane        # lazy: shm and numpy load with the first link
        self.id = f"{os.getpid()}.{next(_LINK_IDS)}"
        self.label = label
        self.lane = DriverLane(lambda h, f: handle(self, h, f), check_s=_CHECK_S)
        self.pending: dict[str, list[Any]] = {}     # call id -> its refs (alive until replied)
        self.args: dict[str, Any] = {}              # call id -> its arguments' payload
        self.pid: int | None = None                 # the callee's, once linked
        self.wid: str | None = None
        self.dead: str | None = None
        self._backlog: collections.deque = collections.deque()
        self._lock = threading.Lock()
        weakref.finalize(self, self.lane.close)

    def ends(self) -> tuple[Any, Any]:
        return self.lane.worker_ends()

    def send(self, tid: str, refs: list[Any], header: tuple, frames: list[Any],
             args: Any) -> None:
        """Write a call (or queue it while the ring is full)."""
        with self._lock:
            if self.dead is not None:
                err = ActorDiedError(self.dead)
                for ref in refs:
                    ref._finish_error(err)
                return
            self.pending[tid] = refs
            self.args[tid] = args
            for ref in refs:
                ref._task = self            # its producer: this link's result ring
            if self._backlog or not self.lane.send(header, frames):
                self._backlog.append((header, frames))

    def answered(self, tid: str) -> list[Any] | None:
        """The refs of call ``tid``, which the callee answered; sends what the ring held back."""
        with self._lock:
            self.args.pop(tid, None)
            refs = self.pending.pop(tid, None)
            while self._backlog and self.lane.send(*self._backlog[0]):
                self._backlog.popleft()
        return refs

    def die(self, reason: str) -> None:
        """The callee died (or the link broke): fail every pending call with that reason."""
        with self._lock:
            if self.dead is not None:
                return
            self.dead = reason
        self.lane.drain_dead(reason)            # what it wrote before dying still counts
        with self._lock:
            pending, self.pending = self.pending, {}
            self.args.clear()
            self._backlog.clear()
        err = ActorDiedError(reason)
        for refs in pending.values():
            for ref in refs:
                ref._finish_error(err)


class Route:
    """One caller's calls to one actor, in order, each direct or through the driver."""

    __slots__ = ("concurrent", "direct_ok", "link", "_lock", "_mode", "_pending", "_queue")

    def __init__(self) -> None:
        self.link: Link | None = None
        self.concurrent = False         # the actor runs calls concurrently: no order to keep
        #: False once the driver refused a link for good (the actor is on another host, or
        #: its calls are retried): every call goes through the driver
        self.direct_ok = True
        self._lock = threading.RLock()
        self._mode: str | None = None
        self._pending = 0
        self._queue: collections.deque = collections.deque()

    def submit(self, direct: bool, send: Callable[[bool], None], first: Any) -> None:
        """``send(direct)`` now, or once the calls of the other kind are done."""
        mode = "direct" if direct else "driver"
        with self._lock:
            if not self.concurrent and (self._queue or (self._pending and self._mode != mode)):
                self._queue.append((mode, send, first))
                return
            self._start(mode, send, first)

    def _start(self, mode: str, send: Callable[[bool], None], first: Any) -> None:
        self._mode = mode
        self._pending += 1
        send(mode == "direct")
        first.add_done_callback(self._done)

    def _done(self, _ref: Any) -> None:
        with self._lock:
            self._pending -= 1
            queue = self._queue
            while queue and (self._pending == 0 or queue[0][0] == self._mode or self.concurrent):
                mode, send, first = queue.popleft()
                if mode == "direct" and (self.link is None or self.link.dead is not None):
                    mode = "driver"     # no link (it failed or died): through the driver
                self._start(mode, send, first)
