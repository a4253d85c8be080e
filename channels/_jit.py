"""Compiled sync primitives of the shm ring: atomics on the header and the Linux futex syscall.

In: a ``uint32`` numpy array over a channel header (shared by several processes) and word indices.
Out: waits that spin for a while, then sleep in the kernel; publish/release/close that wake
sleepers only when someone sleeps.
Invariants: every function is ``@njit(cache=True)``, compiled once per install, not per process.
Ops that may wait are ``nogil`` (waiting never holds the GIL); ops that never wait keep the GIL,
and each waiting op has a ``*_try`` twin that keeps it too: releasing the GIL for nothing lets
another thread take it, and getting it back can cost milliseconds (a convoy); a twin passes its
arguments through unchanged (callers give it budget 0), so it reuses the op's compiled code.
Compile time is per distinct signature: a jitted callee given literal ints or bools is compiled
once per combination, so constants are passed as ``_I(...)``/``_TRUE``. libc's ``syscall`` and
``clock_gettime`` are declared as external symbols (not ctypes pointers), which keeps the cache
valid. This module imports numba: import it lazily (``import headrace`` never does).
Wake-up protocol (no lost wake-ups): a waiter increments the waiters word, then reads the notify
word, then re-checks its condition, then sleeps on the notify word if it has not moved. A waker
changes the condition, increments the notify word, then wakes only if the waiters word is
non-zero. All four are sequentially consistent atomics, so one of the two always sees the other.
"""

from __future__ import annotations

import ctypes.util
import os
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic

from .._config import cache_dir
from .abi import (CLOSED, N_READERS, N_SLOTS, RD_NOTIFY, RD_WAITERS, READER_SEQ, SIGNATURES,
                  SLOTS, ST_IDLE_NS, ST_SEQ, ST_SLOT0, ST_SLOT_SIZE, ST_SPIN, ST_SPIN_MAX,
                  ST_VALUES, ST_WAITS, UNREAD, VIEWS, WR_NOTIFY, WR_WAITERS, WRITE_SEQ)

llvm.load_library_permanently(ctypes.util.find_library("c"))

# NOTE: numba caches next to the source by default: inside the installed package, where a later
# `pip install -e .` finds the leftover folder as a namespace package. Ours goes to the per-user
# cache directory (decided when each @njit below is decorated); the user's own numba setting is
# put back at the end of this module.
_USER_CACHE_DIR = numba_config.CACHE_DIR
numba_config.CACHE_DIR = os.path.join(cache_dir(), "numba")

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}[platform.machine()]
#: Spins before a spinning waiter starts to yield its core between checks (a few µs).
_PURE_SPINS = 4096
_SYS_SCHED_YIELD = {"x86_64": 24, "aarch64": 124, "arm64": 124}[platform.machine()]
_SYS_FUTEX_WAITV = 449         # Linux 5.16+, the same number on x86_64 and aarch64
_FUTEX2_SIZE_U32 = 2            # futex_waitv flags: a 32-bit word, shared (not FUTEX2_PRIVATE)
_FUTEX_WAIT = 0                 # the shared (not PRIVATE) ops: the word lives in shared memory
_FUTEX_WAKE = 1
_CLOCK_MONOTONIC = 1
_WAKE_ALL = 0x7FFFFFFF
_syscall = types.ExternalFunction("syscall", types.int64(
    types.int64, types.intp, types.int64, types.int64, types.intp, types.int64, types.int64))
_clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.intp))


def _item_pointer(context, builder, aryty, ary, idx):
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [idx], wraparound=False)


@intrinsic
def _load(typingctx, a, i):
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, ordering="seq_cst", align=4)
    return a.dtype(a, types.intp), codegen


@intrinsic
def _store(typingctx, a, i, v):
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, ordering="seq_cst", align=4)
        return context.get_dummy_value()
    return types.void(a, types.intp, a.dtype), codegen


@intrinsic
def _fetch_add(typingctx, a, i, v):
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], ordering="seq_cst")
    return a.dtype(a, types.intp, a.dtype), codegen


@intrinsic
def _load_at(typingctx, addr):
    """Atomic load of the uint32 at address ``addr`` (a word of an array kept alive elsewhere)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.load_atomic(ptr, ordering="seq_cst", align=4)
    return types.uint32(types.int64), codegen


@intrinsic
def _add_at(typingctx, addr, v):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], ordering="seq_cst")
    return types.uint32(types.int64, types.uint32), codegen


# NOTE: constants passed to another jitted function as plain (not literal) values: with literal
# ints and bools numba compiles the callee once per combination (3x the wait, ~1 s each).
_I = np.int64
_TRUE, _FALSE = np.bool_(True), np.bool_(False)
_ONE = np.uint32(1)
_MINUS_ONE = np.uint32(0xFFFFFFFF)


@njit(nogil=True, cache=True)
def now_ns() -> int:
    ts = np.empty(2, np.int64)
    _clock_gettime(_CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(nogil=True, cache=True)
def _futex_wait(h, word, expected, timeout_ns):
    ts = np.empty(2, np.int64)
    ts[0] = timeout_ns // 1_000_000_000
    ts[1] = timeout_ns % 1_000_000_000
    # EAGAIN (the word moved), EINTR and ETIMEDOUT are normal: the caller re-checks.
    _syscall(_SYS_FUTEX, h.ctypes.data + 4 * word, _FUTEX_WAIT, expected, ts.ctypes.data, 0, 0)


@njit(nogil=True, cache=True)
def _wake(h, notify, waiters):
    _fetch_add(h, notify, _ONE)
    if _load(h, waiters) != 0:
        _syscall(_SYS_FUTEX, h.ctypes.data + 4 * notify, _FUTEX_WAKE, _WAKE_ALL, 0, 0, 0)


@njit(nogil=True, cache=True)
def _ready(h, word, value, equal):
    if equal:
        return _load(h, word) == value
    return _load(h, word) != value


@njit(nogil=True, cache=True)
def wait(h, word, value, equal, notify, waiters, spin_ns, timeout_ns):
    """Wait until ``(h[word] == value) == equal``, the channel closes, or ``timeout_ns`` passes.

    Spins for up to ``spin_ns`` first (atomic loads only), then sleeps on ``h[notify]``.
    Returns 1 when ready, 0 on timeout, -1 when closed (the condition is checked first, so values
    published before a close are still read).
    """
    if _ready(h, word, value, equal):
        return 1
    if _load(h, CLOSED) != 0:
        return -1
    if timeout_ns == 0:
        return 0
    start = now_ns()
    if spin_ns > 0:
        limit = min(spin_ns, timeout_ns)
        i = 0
        while True:
            if _ready(h, word, value, equal):
                return 1
            if _load(h, CLOSED) != 0:
                return -1
            i += 1
            if (i & 31) == 0:
                if now_ns() - start >= limit:
                    break
                if i < _PURE_SPINS:
                    continue
                # NOTE: give the core away now and then: with more processes than cores (a
                # 3-actor chain on 2 cores), the one holding the value may be waiting for it.
                _syscall(_SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0)
    while True:
        _fetch_add(h, waiters, _ONE)
        seen = _load(h, notify)
        if _ready(h, word, value, equal):
            _fetch_add(h, waiters, _MINUS_ONE)
            return 1
        if _load(h, CLOSED) != 0:
            _fetch_add(h, waiters, _MINUS_ONE)
            return -1
        remaining = timeout_ns - (now_ns() - start)
        if remaining <= 0:
            _fetch_add(h, waiters, _MINUS_ONE)
            return 0
        _futex_wait(h, notify, seen, remaining)
        _fetch_add(h, waiters, _MINUS_ONE)


_SCALAR_MAX_TAG = 5             # codec tags 1..5 (None, True, False, int, float) are header-only
_T_SPILL = 14                   # codec.T_SPILL: the slot header names a spill segment
_AREA = 3                       # frame header word (u64) of a slot: the payload area of its value


@njit(nogil=True, cache=True)
def _wait_adapt(h, st, word, value, equal, notify, waiters, budget):
    """``wait`` with the endpoint's spin window; "auto" stops spinning after an idle wait."""
    if _ready(h, word, value, equal):
        return 1
    if budget == 0:
        return -1 if _load(h, CLOSED) != 0 else 0
    st[ST_WAITS] += 1
    start = now_ns()
    rc = wait(h, word, value, equal, notify, waiters, st[ST_SPIN], budget)
    if st[ST_IDLE_NS] > 0:
        waited = now_ns() - start
        if rc == 1:
            st[ST_SPIN] = 0 if waited > st[ST_IDLE_NS] else st[ST_SPIN_MAX]
        elif rc == 0 and waited > st[ST_IDLE_NS]:
            st[ST_SPIN] = 0     # a long wait sliced by timeouts: still idle, do not spin again
    return rc


@njit(nogil=True, cache=True)
def _slot(h, st, seq):
    slot = seq % h[N_SLOTS]
    return SLOTS + 16 * slot, (st[ST_SLOT0] + slot * st[ST_SLOT_SIZE]) // 8


@njit(nogil=True, cache=True)
def _publish(h, m64, st, word, idx, tag_aux, size, bits):
    m64[idx] = tag_aux
    m64[idx + 1] = size
    m64[idx + 2] = bits
    _store(h, word + UNREAD, h[N_READERS])
    _fetch_add(h, WRITE_SEQ, _ONE)
    st[ST_SEQ] = (st[ST_SEQ] + 1) & 0xFFFFFFFF
    st[ST_VALUES] += 1
    _wake(h, _I(RD_NOTIFY), _I(RD_WAITERS))


@njit(nogil=True, cache=True)
def write_wait(h, st, budget):
    """Writer: wait until the next slot is free. 1 ready, 0 timeout, -1 closed.

    (Zero-copy views of the slot's old payload may still be alive: see its VIEWS word.)
    """
    if _load(h, CLOSED) != 0:
        return -1
    word, _ = _slot(h, st, st[ST_SEQ])
    rc = _wait_adapt(h, st, word + UNREAD, _I(0), _TRUE, _I(WR_NOTIFY), _I(WR_WAITERS), budget)
    if rc == 1 and _load(h, CLOSED) != 0:
        rc = -1
    return rc


@njit(nogil=True, cache=True)
def write_scalar(h, m64, st, tag, bits, budget):
    """Writer, whole op for a header-only value: wait for the slot, write, publish."""
    rc = write_wait(h, st, budget)
    if rc == 1:
        word, idx = _slot(h, st, st[ST_SEQ])
        _publish(h, m64, st, word, idx, np.uint64(tag), np.uint64(0), np.uint64(bits))
    return rc


@njit(nogil=True, cache=True)
def write_float(h, m64, st, tag, value, budget):
    rc = write_wait(h, st, budget)
    if rc == 1:
        word, idx = _slot(h, st, st[ST_SEQ])
        m64.view(np.float64)[idx + 2] = value
        _publish(h, m64, st, word, idx, np.uint64(tag), np.uint64(0), m64[idx + 2])
    return rc


@njit(cache=True)
def pick_area(h, m64, st, recent):
    """Writer (after ``write_wait``): the payload area for the next value, or -1 (spill).

    Ring slot i holds a value's header; its payload may sit in any payload area. An area is
    busy while a value in it is unread (its slot's UNREAD > 0) or viewed (the area's VIEWS > 0),
    as the shared header says. Of the free areas, the one written last (``recent``, this
    writer's private counters) is the hottest in the caches: a ring in a request/response loop
    keeps reusing one area instead of cycling through ``capacity`` of them.
    """
    n = np.int64(h[N_SLOTS])
    busy = np.zeros(n, np.bool_)
    for i in range(n):      # UNREAD before VIEWS: a reader counts its view before it unmarks
        word = SLOTS + 16 * i
        if _load(h, word + UNREAD) != 0:
            idx = (st[ST_SLOT0] + i * st[ST_SLOT_SIZE]) // 8
            tag = m64[idx] & np.uint64(0xFFFFFFFF)
            area = np.int64(m64[idx + _AREA])
            if tag > _SCALAR_MAX_TAG and tag != _T_SPILL and 0 <= area < n:
                busy[area] = True
    best = np.int64(-1)
    for p in range(n):
        if not busy[p] and _load(h, SLOTS + 16 * p + VIEWS) == 0 and \
                (best < 0 or recent[p] > recent[best]):
            best = p
    return best


@njit(cache=True)
def write_commit(h, m64, st, recent, tag, aux, size, bits, area):
    """Writer: the payload is in place (in ``area``, or a spill: -1); write the header, publish."""
    word, idx = _slot(h, st, st[ST_SEQ])
    if area >= 0:
        m64[idx + _AREA] = area
        recent[area] = st[ST_VALUES]
    _publish(h, m64, st, word, idx, np.uint64(tag) | (np.uint64(aux) << np.uint64(32)),
             np.uint64(size), np.uint64(bits))


@njit(nogil=True, cache=True)
def read_wait(h, m64, st, reader, budget):
    """Reader: wait for the next value and read its header:
    ``(rc, tag, aux, size, bits, area)`` (``area``: its payload area; not for spills).

    The value stays until ``read_commit``, header-only values too: a Python signal handler that
    raises as this returns (a signal that came while we slept) then leaves the value unread.
    """
    seq = st[ST_SEQ]
    rc = _wait_adapt(h, st, _I(WRITE_SEQ), seq, _FALSE, _I(RD_NOTIFY), _I(RD_WAITERS), budget)
    if rc != 1:
        return rc, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    _, idx = _slot(h, st, seq)
    head = m64[idx]
    size = np.int64(m64[idx + 1])
    bits = m64.view(np.int64)[idx + 2]
    area = m64.view(np.int64)[idx + _AREA]
    tag = head & np.uint64(0xFFFFFFFF)
    return 1, np.int64(tag), np.int64(head >> np.uint64(32)), size, bits, area


@njit(cache=True)
def read_commit(h, st, reader, keep_view, area):
    """Reader: done with the current slot (``keep_view``: zero-copy views of its payload, in
    ``area``, stay alive)."""
    seq = st[ST_SEQ]
    word, _ = _slot(h, st, seq)
    nxt = (seq + 1) & 0xFFFFFFFF
    st[ST_SEQ] = nxt
    st[ST_VALUES] += 1
    consume(h, word, reader, nxt, keep_view, SLOTS + 16 * area + VIEWS)


@njit(cache=True)
def publish(h, slot_word, n_readers):
    """Writer: the slot at ``slot_word`` is written; make it visible to ``n_readers`` readers."""
    _store(h, slot_word + UNREAD, np.uint32(n_readers))
    _fetch_add(h, WRITE_SEQ, _ONE)
    _wake(h, _I(RD_NOTIFY), _I(RD_WAITERS))


@njit(cache=True)
def consume(h, slot_word, reader, seq, keep_view, views_word):
    """Reader ``reader`` is done with the slot at ``slot_word`` and now stands at ``seq``.

    With ``keep_view`` the reader still holds zero-copy views into the value's payload: it
    counts one more view (at ``views_word``) before giving up its unread mark, so the writer
    never sees the payload free too early.
    """
    if keep_view:
        _fetch_add(h, views_word, _ONE)
    _store(h, READER_SEQ + 16 * reader, np.uint32(seq))
    if _fetch_add(h, slot_word + UNREAD, _MINUS_ONE) == 1:
        _wake(h, _I(WR_NOTIFY), _I(WR_WAITERS))


@njit(cache=True)
def release(h, pins, word):
    """A zero-copy view counted at ``pins[word]`` died; wake the writer if it was the last."""
    if _fetch_add(pins, word, _MINUS_ONE) == 1:
        _wake(h, _I(WR_NOTIFY), _I(WR_WAITERS))


@njit(cache=True)
def load(h, word):
    return _load(h, word)


@njit(cache=True)
def store(h, word, value):
    _store(h, word, np.uint32(value))


@njit(cache=True)
def add(h, word, delta):
    """Atomic ``h[word] += delta`` (delta may be negative); returns the previous value."""
    return _fetch_add(h, word, np.uint32(delta & 0xFFFFFFFF))


@njit(cache=True)
def close(h, code):
    """Mark the channel closed (1) or broken (2), the first code wins; wake everyone."""
    if _load(h, CLOSED) == 0:
        _store(h, CLOSED, np.uint32(code))
    _wake(h, _I(RD_NOTIFY), _I(RD_WAITERS))
    _wake(h, _I(WR_NOTIFY), _I(WR_WAITERS))


@njit(cache=True)
def ring(b):
    """Writer of a channel with a doorbell: a value was published (or the channel closed)."""
    _wake(b, _I(RD_NOTIFY), _I(RD_WAITERS))


@njit(nogil=True, cache=True)
def bell_wait(b, st, seen, budget):
    """Reader of several channels: wait until the bell rang since it read ``seen`` from it, it
    was closed (-1), or ``budget`` ns passed (0); spins as the endpoint state ``st`` says."""
    return _wait_adapt(b, st, _I(RD_NOTIFY), seen, _FALSE, _I(RD_NOTIFY), _I(RD_WAITERS), budget)


@njit(nogil=True, cache=True)
def wait_any(addrs, seen, spin_ns, timeout_ns, waitv):
    """Wait until one of several notify words moved: ``addrs[k]`` is the address of a word
    (a header's RD_NOTIFY, its waiters count at the next word) last seen at ``seen[k]``.

    Spins up to ``spin_ns``, then counts itself in every waiters word and sleeps on all the
    words at once (``futex_waitv``: one waiter woken by whichever producer moves first).
    Without ``waitv`` (a kernel before 5.16) it sleeps on word 0 in 1 ms slices and re-checks
    the rest. Returns the index of a word that moved, or -1 once ``timeout_ns`` passed.
    """
    n = addrs.shape[0]
    for k in range(n):
        if _load_at(addrs[k]) != seen[k]:
            return k
    if timeout_ns <= 0:
        return -1
    start = now_ns()
    if spin_ns > 0:
        limit = min(spin_ns, timeout_ns)
        i = 0
        while True:
            for k in range(n):
                if _load_at(addrs[k]) != seen[k]:
                    return k
            i += 1
            if (i & 31) == 0:
                if now_ns() - start >= limit:
                    break
                if i >= _PURE_SPINS:
                    _syscall(_SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0)
    vec = np.zeros(3 * n, np.uint64)    # struct futex_waitv {u64 val, uaddr; u32 flags, rsvd}
    for k in range(n):
        vec[3 * k] = seen[k]
        vec[3 * k + 1] = addrs[k]
        vec[3 * k + 2] = _FUTEX2_SIZE_U32
        _add_at(addrs[k] + 4, _ONE)
    ts = np.empty(2, np.int64)
    found = -1
    while found < 0:
        for k in range(n):
            if _load_at(addrs[k]) != seen[k]:
                found = k
                break
        if found >= 0:
            break
        now = now_ns()
        if now - start >= timeout_ns:
            break
        if waitv:       # an absolute CLOCK_MONOTONIC deadline; EAGAIN/EINTR/ETIMEDOUT re-check
            end = start + timeout_ns
            ts[0] = end // 1_000_000_000
            ts[1] = end % 1_000_000_000
            _syscall(_SYS_FUTEX_WAITV, vec.ctypes.data, n, 0, ts.ctypes.data, _CLOCK_MONOTONIC,
                     0)
        else:
            left = min(timeout_ns - (now - start), 1_000_000)
            ts[0] = 0
            ts[1] = left
            _syscall(_SYS_FUTEX, addrs[0], _FUTEX_WAIT, seen[0], ts.ctypes.data, 0, 0)
    for k in range(n):
        _add_at(addrs[k] + 4, _MINUS_ONE)
    return found


@njit(cache=True)
def snapshot(addrs, seen):
    """``seen[k]`` = the word at ``addrs[k]`` now (atomic loads): read before looking around,
    then ``wait_any`` on them. Returns a mask of the words that moved since ``seen`` was taken
    (bit k; bit 63 stands for every k >= 63)."""
    moved = np.int64(0)
    for k in range(addrs.shape[0]):
        v = _load_at(addrs[k])
        if v != seen[k]:
            moved |= np.int64(1) << np.int64(min(k, 63))
            seen[k] = v
    return moved


@njit(cache=True)
def write_wait_try(h, st, budget):
    return write_wait(h, st, budget)


@njit(cache=True)
def write_scalar_try(h, m64, st, tag, bits, budget):
    return write_scalar(h, m64, st, tag, bits, budget)


@njit(cache=True)
def write_float_try(h, m64, st, tag, value, budget):
    return write_float(h, m64, st, tag, value, budget)


@njit(cache=True)
def read_wait_try(h, m64, st, reader, budget):
    return read_wait(h, m64, st, reader, budget)


def entry_points() -> dict[str, object]:
    """The ops of ``abi.SIGNATURES`` as direct entry points, compiled (or loaded from numba's
    cache) for exactly those types: calling one skips numba's dispatcher (about 300 ns a call)."""
    here = globals()
    return {name: here[name].compile(sig) for name, sig in SIGNATURES.items()}


numba_config.CACHE_DIR = _USER_CACHE_DIR
