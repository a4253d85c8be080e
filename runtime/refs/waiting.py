"""One waiter per blocking call, woken by whichever producer finishes a ref first.

In: a condition over refs (``get``, ``wait``, ``gather``, ``result()``), the refs, a deadline.
Each pending ref names its *producer* (``Ref._producer()``): what makes it final. The runtime's
inbox (zmq replies), an actor's lane (shm rings) and a compiled DAG (its output channels) are the
three producers; all implement ``Producer``, so refs and ``get`` know nothing else about them.
Out: the condition holds, or the deadline passed (``wait_until`` returns which).
Invariants:
- With one producer the waiting thread reads it itself (``drive``): the hot path of a round
  trip, no hand-off to another thread.
- Otherwise (several producers, or one that another thread reads now) the thread installs one
  waiter: a futex word that the refs' done-callbacks ring, and waits on it *and* on every
  producer's notify words at once (``futex_waitv``), taking what arrived (``poll``) each time
  one moves. No polling slices: a producer's word moves when it has something, a callback
  rings when another thread finished a ref, a death or teardown closes the channels (which
  wakes their words) and fails the refs (which rings). A backstop re-check once a second
  covers producers that cannot ring (a socket writer on another host).
- No lost wake-up: a word's value is read before the producer is polled and the condition is
  checked; whoever changes something afterwards moves the word (sequentially consistent atomics,
  the protocol of ``channels.native``).
- ``ReadRole``: one thread at a time reads a producer. A thread that finds it taken is recorded;
  the holder, letting go, rings the producer's word, so the one left waiting looks again.

  get([a, b, c]) ─▶ one producer?  ─▶ producer.drive(cond)           (reads on this thread)
                └▶ several / taken ─▶ callbacks ring W; loop { snapshot words; poll each;
                                        cond()? ; wait_any(W, words of a's, b's, c's producers) }
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .deadline import Deadline

#: Backstop: a waiter re-checks its condition this often even if no word moved.
_BACKSTOP_NS = 1_000_000_000
#: How long a waiter spins on the words before it sleeps, while its waits keep being short.
_SPIN_NS = 100_000
#: A wait longer than this many spin windows means the producers are idle: stop spinning.
_IDLE_FACTOR = 4
#: Around every wait that blocks, a context manager (set in task workers: the driver lends the
#: worker's CPU slot to another task meanwhile).
_BLOCK_HOOK: list[Callable[[], Any]] = []


def set_block_hook(hook: Callable[[], Any]) -> None:
    """Install ``hook()``, a context manager entered around every wait that blocks."""
    _BLOCK_HOOK[:] = [hook]


class Producer(Protocol):
    """What makes refs final. Refs group by producer; one waiter drives or watches each."""

    def drive(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        """Read on this thread until ``cond()`` or the deadline. False when it cannot help now
        (another thread reads; the producer closed): the caller then waits on its waiter."""

    def poll(self) -> None:
        """Take what has arrived, without waiting (nothing if another thread reads now)."""

    def words(self) -> list[int]:
        """Addresses of notify words (uint32, waiters count at the next word) that move when
        ``poll`` may find something. Empty: the producer finishes refs on a thread of its own
        (their callbacks ring the waiter)."""

    def enter(self) -> None:
        """A waiter relies on this producer from now on (until ``leave``)."""

    def leave(self) -> None: ...


class ReadRole:
    """Which thread reads a producer now. ``take`` never blocks; ``give`` rings ``ring`` when
    some thread found the role taken meanwhile (it waits on the producer's word)."""

    __slots__ = ("_lock", "_missed", "_ring", "holder")

    def __init__(self, ring: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._missed = False
        self._ring = ring
        self.holder: int | None = None

    def take(self) -> bool:
        if not self._lock.acquire(blocking=False):
            self._missed = True            # NOTE: then try again: the holder may just have left
            if not self._lock.acquire(blocking=False):
                return False
        self.holder = threading.get_ident()
        return True

    def take_blocking(self, timeout_s: float) -> bool:
        if not self._lock.acquire(timeout=timeout_s):
            return False
        self.holder = threading.get_ident()
        return True

    def give(self) -> None:
        self.holder = None
        self._lock.release()
        if self._missed:
            self._missed = False
            self._ring()


def wait_until(cond: Callable[[], bool], refs: Iterable[Any], deadline: Deadline,
               producers: Iterable[Producer] = ()) -> bool:
    """Block until ``cond()`` or the deadline; returns ``cond()``.

    ``refs``: the pending refs ``cond`` depends on (their producers are driven or watched, and
    their callbacks wake this thread); ``producers``: more producers to drive (a DAG whose
    pipeline must drain before a submit).
    """
    if cond():
        return True
    refs = [r for r in refs if not r._final()]
    found = dict.fromkeys(producers)
    for ref in refs:
        p = ref._producer()
        if p is not None:
            found.setdefault(p)
    group = list(found)
    if len(group) == 1 and group[0].drive(cond, deadline):
        return cond()
    if _BLOCK_HOOK and deadline.remaining_s() != 0:
        with _BLOCK_HOOK[0]():
            return _wait(cond, refs, group, deadline)
    return _wait(cond, refs, group, deadline)


def _wait(cond: Callable[[], bool], refs: list[Any], group: list[Producer],
          deadline: Deadline) -> bool:
    words, owners = [], []              # owners[k]: the producer of word k + 1
    for p in group:
        for address in p.words():
            words.append(address)
            owners.append(p)
    waiter = _FutexWaiter.mine(words) if words else _EventWaiter()
    for ref in refs:
        ref._add_waiter(waiter.ring)
    entered = []
    try:
        for p in group:
            p.enter()
            entered.append(p)
        waiter.arm()
        look = group                    # at first every producer; then those whose word moved
        while True:
            for p in look:
                p.poll()
            if cond():
                return True
            remaining = deadline.remaining_s()
            if remaining == 0:
                return False
            waiter.sleep(_BACKSTOP_NS if remaining is None
                         else min(_BACKSTOP_NS, int(remaining * 1e9) + 1))
            moved = waiter.arm()        # before looking: a later change wakes the next sleep
            # 0: the sleep timed out (the backstop), < 0: cannot tell: look at every producer
            look = group if moved <= 0 else \
                list(dict.fromkeys(owners[k - 1] for k in range(1, len(words) + 1)
                                   if moved >> min(k, 63) & 1))
    finally:
        for p in entered:
            p.leave()
        for ref in refs:
            ref._remove_done_callback(waiter.ring)
        waiter.done()


class _EventWaiter:
    """The waiter when no producer has words: only callbacks (rung on other threads) wake it."""

    __slots__ = ("_event", "ring")

    def __init__(self) -> None:
        self._event = event = threading.Event()
        self.ring = lambda _ref=None: event.set()

    def done(self) -> None:
        pass

    def arm(self) -> int:
        """Returns -1: every producer is to be looked at."""
        self._event.clear()
        return -1

    def sleep(self, budget_ns: int) -> None:
        self._event.wait(budget_ns / 1e9)


class _FutexWaiter:
    """A thread's futex word (private memory), rung by callbacks, and the sleep on it and the
    producers' words at once. Spins first while answers keep coming quickly ("auto")."""

    __slots__ = ("_addr", "_addrs", "_kept", "_ops", "_seen", "_spin", "_w", "_waitv", "ring")
    _local = threading.local()

    @classmethod
    def mine(cls, words: list[int]) -> _FutexWaiter:
        """This thread's waiter, set to sleep on its own word and ``words``."""
        import numpy as np
        waiter = getattr(cls._local, "waiter", None)
        if waiter is None:
            waiter = cls._local.waiter = cls()
        elif waiter._addrs is not None:     # a wait inside a wait (a callback that waits)
            waiter = cls()
        key = tuple(words)
        kept = waiter._kept
        if kept is None or kept[0] != key:  # the same producers as last time: same arrays
            kept = waiter._kept = (key, np.array([waiter._addr, *words], np.int64),
                                   np.zeros(len(words) + 1, np.uint32))
        waiter._addrs, waiter._seen = kept[1], kept[2]     # (arm() takes the values first)
        return waiter

    def __init__(self) -> None:
        import numpy as np

        from ...channels import abi, native
        self._ops = ops = native.ops()
        self._waitv = _has_waitv()
        self._w = w = np.zeros(abi.BELL_WORDS, np.uint32)
        self._addr = w.ctypes.data + 4 * abi.RD_NOTIFY
        self._spin = _SPIN_NS
        self._addrs: Any = None             # set while a wait uses it
        self._kept: Any = None              # (words, addrs, seen) of the last wait
        self._seen: Any = None
        ring = ops["ring"]
        self.ring = lambda _ref=None: ring(w)

    def done(self) -> None:
        self._addrs = self._seen = None

    def arm(self) -> int:
        """Take the words' values; returns the mask of those that moved since the last time."""
        return self._ops["snapshot"](self._addrs, self._seen)

    def sleep(self, budget_ns: int) -> None:
        spin = self._spin
        start = time.perf_counter_ns()
        moved = self._ops["wait_any"](self._addrs, self._seen, spin, budget_ns, self._waitv)
        took = time.perf_counter_ns() - start
        if spin and moved >= 0 and took > _IDLE_FACTOR * _SPIN_NS:
            self._spin = 0              # the producers are idle: sleep at once next time
        elif not spin and took < _SPIN_NS:
            self._spin = _SPIN_NS       # answers come quickly again: spin for them


_WAITV: list[bool] = []


def _has_waitv() -> bool:
    if not _WAITV:
        from ...channels.native import has_waitv
        _WAITV.append(has_waitv())
    return _WAITV[0]
