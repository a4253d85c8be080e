"""The shared-memory ring channel: one POSIX shm segment, one writer, n readers, futex sync.

In: values written by one process (or thread). Out: each value, in order, to each of
``n_readers`` readers in any processes that can map ``/dev/shm``.
Layout: a header (``channels.abi`` word map: write sequence, per-reader sequences and pids,
per-slot unread counts, per-area views counts, closed flag, futex words, a broken-reason text),
then ``capacity`` regions of 64 + ``slot_bytes`` bytes. Region i holds slot i's 64-byte frame
header (``channels.codec``) and payload area i; a slot's value may sit in any payload area (its
header says which).
Invariants:
- The writer reuses a slot only when its unread count is 0 (every reader has read it): that is the
  backpressure. It puts the payload in the free area it wrote last (cache-hot: a ring in a
  request/response loop keeps using one area); an area is free when no unread value is in it
  and no zero-copy view of it is alive. With none free, it spills the value, so holding views
  never blocks a pipeline and never sees its bytes overwritten.
- Payloads of at least ``COPY_MAX`` bytes are read zero-copy (read-only Arrow buffers, numpy
  arrays over them); a release token counts the views and gives the area back when the last dies.
  Smaller payloads are copied out, so they never pin an area.
- A value read zero-copy from a payload area and written unchanged to another ring (an actor
  returning its argument, a stage passing a table on) is forwarded, not copied: the slot names
  the area (segment, offset, the original frame header), the writer counts one view of that area
  per reader of its ring, and each reader maps it and gives its view back when its value dies.
  The area stays unwritten meanwhile, as for any view; a chain of such stages all point at the
  first ring's area.
- A payload larger than a slot spills into a segment of its own (owned by the writer). The writer
  reuses a spill segment once every reader is done with it and keeps at most one idle (the ring
  "grows" to the largest value in flight); the others are unlinked as soon as the readers are done.
- ``sync``: "spin" spins, "block" sleeps in the kernel at once, "auto" spins up to ``spin_us``
  then sleeps, and stops spinning after an idle wait, so an idle channel burns no CPU.
- A blocked endpoint wakes every ``check_s`` (100 ms by default) to check that its peers'
  processes still exist; a dead peer marks the channel broken. The runtime, which watches its
  processes anyway, does it at once with ``mark_broken`` and opens its channels with a long
  ``check_s``: each wake of an idle thread costs about 0.2 ms of CPU.
"""

from __future__ import annotations

import os
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .._config import INLINE_MAX_BYTES
from ..exceptions import ChannelClosedError, ValueDecodeError, WouldBlock
from . import abi, native
from .base import WRITER, Channel, closed_error, timeout_error, timeout_ns
from .codec import (HEADER, HEADER_BYTES, T_BYTES, T_FALSE, T_FLOAT, T_FORWARD, T_INT, T_NONE,
                    T_SPILL, T_TRUE, Encoded, decode, encode, read_header)
from .segments import Segment, unlink_name, is_alive

_MAGIC = 0x31435248          # "HRC1"
_VERSION = 2                 # 2: a slot's payload may sit in any payload area
_MASK = 0xFFFFFFFF
_REASON_BYTES = 256
_SLICE_NS = 100_000_000      # how often a blocked endpoint checks its peers
_NOTHING = object()            # read_if_any's default for read_nowait
_IDLE_FACTOR = 4             # "auto": a wait longer than this many spin windows means idle
COPY_MAX = INLINE_MAX_BYTES  # payloads below this are copied out of the slot
SPIN_US = 50.0               # default spin window of "auto"
_SPILL_HEAD = 64             # a spill segment: refs word, then a frame header, then the payload
_SPILL_GRAIN = 1 << 20
#: Idle spill segments kept for reuse, in bytes (beyond the one always kept): a pipeline of
#: several large values in flight reuses its segments instead of making new ones each write.
SPILL_KEEP_BYTES = 64 << 20
_I64_MIN, _I64_MAX = -(2 ** 63), 2 ** 63 - 1
_BITS, _FLOAT = struct.Struct("<q"), struct.Struct("<d")
#: A forward's slot payload: the value's payload offset in its segment, size, tag, aux, scalar
#: bits, the word that counts its views, the length of the ring's name; then the ring's name, and
#: for a value in a spill segment (its views counted in the spill's word 0) the spill's name.
_FORWARD = struct.Struct("<QQIIqIH")
_UPSTREAMS_KEPT = 16            # a reader's mappings of other rings' segments (forwards)


def _pid_gone(pid: int) -> bool:
    if pid == 0 or pid == os.getpid():
        return False
    return not is_alive(pid)               # a zombie is gone too


def _taken_value(rebuild: Callable[..., Any], *args: Any) -> Any:
    """Rebuild a value already taken off the ring: any failure is a ValueDecodeError (the value
    is consumed; the channel goes on), a closed spill a ChannelClosedError."""
    try:
        return rebuild(*args)
    except (ValueDecodeError, ChannelClosedError):
        raise
    except Exception as exc:    # noqa: BLE001 - e.g. no memory or fds to map a spill
        raise ValueDecodeError(f"{type(exc).__name__}: {exc}") from exc


class _Origin:
    """Where a value read zero-copy lives: a ring's payload area (``spill`` None) or a spill
    segment of the ring; ``pin`` is the release token its views hold (see ``_remember``)."""

    __slots__ = ("ref", "ring", "spill", "pin", "offset", "size", "tag", "aux", "bits")

    def __init__(self, ref: weakref.ref, ring: Segment, spill: Segment | None, pin: _Pin,
                 offset: int, size: int, tag: int, aux: int, bits: int) -> None:
        self.ref, self.ring, self.spill, self.pin = ref, ring, spill, pin
        self.offset, self.size, self.tag, self.aux, self.bits = offset, size, tag, aux, bits


#: id(value) -> where it lives, for values of this process read zero-copy from a payload area
#: and still alive: a write of the very same object forwards instead of copying.
_ORIGINS: dict[int, _Origin] = {}


def _remember(value: Any, ring: Segment, spill: Segment | None, pin: _Pin, offset: int,
              size: int, tag: int, aux: int, bits: int) -> None:
    key = id(value)

    def forget(ref: weakref.ref) -> None:
        origin = _ORIGINS.get(key)
        if origin is not None and origin.ref is ref:
            del _ORIGINS[key]
    try:
        ref = weakref.ref(value, forget)
    except TypeError:       # dicts, lists and tuples of arrays: rebuilt, so encoded again
        return
    _ORIGINS[key] = _Origin(ref, ring, spill, pin, offset, size, tag, aux, bits)


class _Pin:
    """Release token: alive while any zero-copy view of a slot or spill payload is alive."""

    __slots__ = ("h", "pins", "word", "keep")

    def __init__(self, h: np.ndarray, pins: np.ndarray, word: int, keep: Any) -> None:
        self.h, self.pins, self.word, self.keep = h, pins, word, keep

    def __del__(self) -> None:
        try:
            native.ops()["release"](self.h, self.pins, self.word)
        except Exception:   # noqa: BLE001 - interpreter shutdown: the mapping goes with us
            pass


class ShmChannel(Channel):
    """A shared-memory ring channel. The constructor creates (and owns) the segment.

    Args:
        n_readers: readers that each get every value (1..64).
        capacity: ring slots: how many values may be in flight before ``write`` blocks.
        slot_bytes: payload bytes per slot; larger values spill (never an error).
        sync: "auto" (spin up to ``spin_us``, then sleep), "spin" or "block".
        spin_us: the spin window of "auto".
        ring: a ``channels.doorbell.Doorbell`` the writer rings after each value, and every
            endpoint when it closes (one reader then waits for several channels at once).
    """

    kind = "shm"

    def __init__(self, n_readers: int = 1, capacity: int = 8, slot_bytes: int = 1 << 20, *,
                 sync: str = "auto", spin_us: float = SPIN_US,
                 check_s: float = _SLICE_NS / 1e9, ring: Any = None) -> None:
        if not 1 <= n_readers <= abi.MAX_READERS:
            raise ValueError(f"n_readers must be in 1..{abi.MAX_READERS}, not {n_readers}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        if slot_bytes < 0:
            raise ValueError(f"slot_bytes must be >= 0, not {slot_bytes}")
        slot_size = (HEADER_BYTES + slot_bytes + 63) & ~63
        head = (abi.header_words(capacity) * 4 + _REASON_BYTES + 4095) & ~4095
        seg = Segment.create(head + capacity * slot_size)
        h = np.frombuffer(seg.mmap, np.uint32, abi.header_words(capacity))
        h[abi.N_SLOTS], h[abi.N_READERS] = capacity, n_readers
        h[abi.SLOT_SIZE_LO], h[abi.SLOT_SIZE_HI] = slot_size & _MASK, slot_size >> 32
        h[abi.VERSION] = _VERSION
        native.store(h, abi.MAGIC, _MAGIC)
        self._setup(seg, None, sync, spin_us, check_s, owner=True, bell=ring)

    def _setup(self, seg: Segment, role: int | None, sync: str, spin_us: float,
               check_s: float, owner: bool, bell: Any = None) -> None:
        if sync not in ("auto", "spin", "block"):
            raise ValueError(f"sync must be 'auto', 'spin' or 'block', not {sync!r}")
        self._seg = seg
        self._owner = owner
        self._bell = bell
        capacity = int(np.frombuffer(seg.mmap, np.uint32, abi.N_SLOTS + 1)[abi.N_SLOTS])
        self._h = h = np.frombuffer(seg.mmap, np.uint32, abi.header_words(capacity))
        if h[abi.MAGIC] != _MAGIC or h[abi.VERSION] != _VERSION:
            raise ValueError(f"{seg.name} is not a headrace channel of version {_VERSION}")
        self._mv = seg.buf
        self._m64 = np.frombuffer(seg.mmap, np.uint64, seg.size // 8)
        self._addr = h.ctypes.data
        self._ops = native.ops()
        self._n = capacity
        self._n_readers = int(h[abi.N_READERS])
        self._slot_size = int(h[abi.SLOT_SIZE_LO]) | int(h[abi.SLOT_SIZE_HI]) << 32
        self._reason_off = abi.header_words(capacity) * 4
        self._slot0 = seg.size - capacity * self._slot_size
        self._sync, self._spin_us, self._check_s = sync, spin_us, check_s
        self._slice_ns = max(1_000_000, int(check_s * 1e9))
        spin_max = int(spin_us * 1000) if sync == "auto" else _SLICE_NS if sync == "spin" else 0
        self._st = st = np.zeros(abi.ST_WORDS, np.int64)
        self._recent = np.full(capacity, -1, np.int64)     # writer: per payload area, see pick_area
        st[abi.ST_SPIN] = st[abi.ST_SPIN_MAX] = spin_max
        st[abi.ST_IDLE_NS] = _IDLE_FACTOR * spin_max if sync == "auto" else 0
        st[abi.ST_SLOT0], st[abi.ST_SLOT_SIZE] = self._slot0, self._slot_size
        self.role = role
        self._stats = {"bytes": 0, "spills": 0, "forwards": 0}
        self._spills: list[tuple[Segment, np.ndarray]] = []     # writer: its spill segments
        # reader: spill segments mapped lately, newest last (see _read_spill)
        self._spill_cache: OrderedDict[str, tuple[Segment, np.ndarray]] = OrderedDict()
        # reader: other rings' segments mapped for forwards, newest last (see _upstream)
        self._upstreams: OrderedDict[str, tuple[Segment, np.ndarray]] = OrderedDict()
        if role == WRITER:
            native.store(h, abi.WRITER_PID, os.getpid())
            st[abi.ST_SEQ] = native.load(h, abi.WRITE_SEQ)
        elif role is not None:
            native.store(h, abi.READER_PIDS + role, os.getpid())
            st[abi.ST_SEQ] = native.load(h, abi.READER_SEQ + 16 * role)

    # endpoints ---------------------------------------------------------------------------
    def writer(self) -> ShmChannel:
        return self._endpoint(WRITER)

    def reader(self, index: int = 0) -> ShmChannel:
        if not 0 <= index < self._n_readers:
            raise IndexError(f"reader index {index} out of range for {self._n_readers} readers")
        return self._endpoint(index)

    def _endpoint(self, role: int) -> ShmChannel:
        ep = object.__new__(ShmChannel)
        ep._setup(self._seg, role, self._sync, self._spin_us, self._check_s, owner=self._owner,
                  bell=self._bell)
        return ep

    def __reduce__(self) -> Any:
        return _attach, (self._seg.name, self.role, self._sync, self._spin_us, self._check_s,
                         self._bell)

    @property
    def name(self) -> str:
        return self._seg.name

    # writing -----------------------------------------------------------------------------
    def write(self, value: Any, timeout_s: float | None = None) -> None:
        self._write(value, timeout_s)
        if self._bell is not None:
            self._bell.ring()

    def _write(self, value: Any, timeout_s: float | None) -> None:
        if self.role != WRITER:
            self._check_role("writer")
        budget = self._slice_ns if timeout_s is None else \
            min(timeout_ns(timeout_s), self._slice_ns)
        t = type(value)
        if t is int and _I64_MIN <= value <= _I64_MAX:
            self._run("write_scalar",
                      (self._h, self._m64, self._st, T_INT, value), budget, timeout_s, "write")
            return
        if t is float:
            self._run("write_float",
                      (self._h, self._m64, self._st, T_FLOAT, value), budget, timeout_s, "write")
            return
        fits = self._slot_size - HEADER_BYTES
        if t is bytes and len(value) <= fits:
            self._run("write_wait", (self._h, self._st), budget, timeout_s, "write")
            area = self._ops["pick_area"](self._h, self._m64, self._st, self._recent)
            if area >= 0:                                           # else: spill, below
                start = self._slot0 + area * self._slot_size + HEADER_BYTES
                self._mv[start:start + len(value)] = value
                self._stats["bytes"] += len(value)
                self._ops["write_commit"](self._h, self._m64, self._st, self._recent, T_BYTES,
                                          0, len(value), 0, area)
                return
        if _ORIGINS:
            origin = _ORIGINS.get(id(value))
            if origin is not None and origin.ref() is value:
                self._forward(origin, budget, timeout_s)
                return
        # a TypeError of encode() leaves the channel untouched
        self._write_encoded(encode(value), budget, timeout_s)

    def _forward(self, origin: _Origin, budget: int, timeout_s: float | None) -> None:
        """Write a reference to ``origin``'s payload area instead of a copy of the value."""
        pin = origin.pin
        ring = origin.ring.name.encode()
        desc = _FORWARD.pack(origin.offset, origin.size, origin.tag, origin.aux, origin.bits,
                             pin.word, len(ring)) + ring
        if origin.spill is not None:
            desc += origin.spill.name.encode()
        n = self._n_readers
        native.add(pin.pins, pin.word, n)       # one view per reader, given back by each
        try:
            self._write_encoded(Encoded(T_FORWARD, size=len(desc), parts=[(0, desc)]), budget,
                                timeout_s)
        except BaseException:
            for _ in range(n):              # give them back as a reader would (then unpinned)
                type(pin)(pin.h, pin.pins, pin.word, pin.keep)
            raise
        self._stats["forwards"] += 1

    def write_encoded(self, enc: Any, timeout_s: float | None = None) -> None:
        """``write`` of a value already encoded (``codec.encode``, not a header-only scalar):
        a writer of several channels encodes every value first, then writes them all."""
        if self.role != WRITER:
            self._check_role("writer")
        if enc.tag <= T_FLOAT:
            raise ValueError("write_encoded() takes a value with a payload; write() a scalar")
        budget = self._slice_ns if timeout_s is None else \
            min(timeout_ns(timeout_s), self._slice_ns)
        self._write_encoded(enc, budget, timeout_s)
        if self._bell is not None:
            self._bell.ring()

    def _write_encoded(self, enc: Any, budget: int, timeout_s: float | None) -> None:
        fits = self._slot_size - HEADER_BYTES
        self._run("write_wait", (self._h, self._st), budget, timeout_s, "write")
        size = enc.size
        area = self._ops["pick_area"](self._h, self._m64, self._st, self._recent) \
            if size <= fits else -1
        if area < 0:                    # too big, or every payload area is read or viewed
            name = self._write_spill(enc)
            off = self._slot0 + int(self._st[abi.ST_SEQ]) % self._n * self._slot_size
            self._mv[off + HEADER.size:off + HEADER.size + len(name)] = name
            tag, aux, size, bits = T_SPILL, 0, len(name), 0
        else:
            if size:
                start = self._slot0 + area * self._slot_size + HEADER_BYTES
                enc.write_payload(self._mv[start:start + size])
            tag, aux, bits = enc.tag, enc.aux, enc.scalar
            self._stats["bytes"] += size
        self._ops["write_commit"](self._h, self._m64, self._st, self._recent, tag, aux, size,
                                  bits, area)

    def _write_spill(self, enc: Any) -> bytes:
        """Put the value in a spill segment; returns the segment's name for the slot."""
        need = _SPILL_HEAD + HEADER_BYTES + enc.size
        seg, sh = self._take_spill(need)
        enc.pack_header(seg.buf, _SPILL_HEAD)
        start = _SPILL_HEAD + HEADER_BYTES
        enc.write_payload(seg.buf[start:start + enc.size])
        native.store(sh, 0, self._n_readers)
        self._stats["spills"] += 1
        self._stats["bytes"] += enc.size
        return seg.name.encode()

    def _take_spill(self, need: int) -> tuple[Segment, np.ndarray]:
        """A free spill segment of at least ``need`` bytes. Idle ones are kept for the next
        spills: the largest one always, others while they total ``SPILL_KEEP_BYTES``."""
        free = [e for e in self._spills if native.load(e[1], 0) == 0]
        fit = [e for e in free if e[0].size >= need]
        chosen = min(fit, key=lambda e: e[0].size) if fit else None
        keep = chosen or (max(free, key=lambda e: e[0].size) if free else None)
        budget = SPILL_KEEP_BYTES
        for entry in sorted(free, key=lambda e: e[0].size, reverse=True):
            if entry is keep or entry is chosen:
                continue
            if entry[0].size <= budget and entry[0].size >= need:
                budget -= entry[0].size         # fits later values like this one: keep it
            else:
                self._drop_spill(entry)
        if chosen is None:
            if keep is not None:        # too small for this value: replace it
                self._drop_spill(keep)
            seg = Segment.create((need + _SPILL_GRAIN - 1) // _SPILL_GRAIN * _SPILL_GRAIN)
            chosen = (seg, np.frombuffer(seg.mmap, np.uint32, 16))
            self._spills.append(chosen)
        return chosen

    def _drop_spill(self, entry: tuple[Segment, np.ndarray]) -> None:
        self._spills = [e for e in self._spills if e is not entry]
        entry[0].unlink()

    # reading -----------------------------------------------------------------------------
    def read(self, timeout_s: float | None = None) -> Any:
        if self.role is None or self.role < 0:
            self._check_role("reader")
        budget = self._slice_ns if timeout_s is None else \
            min(timeout_ns(timeout_s), self._slice_ns)
        return self._take(self._run("read_wait", (self._h, self._m64, self._st, self.role),
                                    budget, timeout_s, "read"))

    def read_nowait(self) -> Any:
        value = self.read_if_any(_NOTHING)
        if value is _NOTHING:
            raise WouldBlock("no value is waiting")
        return value

    def read_if_any(self, default: Any = None) -> Any:
        """``read_nowait`` that returns ``default`` instead of raising ``WouldBlock`` (a raise
        and catch costs a microsecond, and a reader draining a ring ends each drain with one).

        Raises:
            ChannelClosedError: closed, nothing left to read.
        """
        if self.role is None or self.role < 0:
            self._check_role("reader")
        res = self._ops["read_wait_try"](self._h, self._m64, self._st, self.role, 0)
        if res[0] != 1:
            if res[0] == -1:
                raise closed_error(self, self._reason())
            return default
        return self._take(res)

    def _take(self, waited: tuple) -> Any:
        """Take the value whose header ``read_wait`` returned off the ring, and rebuild it."""
        rc, tag, aux, size, bits, area = waited
        h = self._h
        commit = self._ops["read_commit"]
        if tag <= T_FLOAT:              # header-only: everything is in the locals already
            commit(h, self._st, self.role, False, 0)
            return bits if tag == T_INT else None if tag == T_NONE else True \
                if tag == T_TRUE else False if tag == T_FALSE else \
                _FLOAT.unpack(_BITS.pack(bits))[0]
        if tag == T_SPILL:
            off = self._slot0 + int(self._st[abi.ST_SEQ]) % self._n * self._slot_size
            name = bytes(self._mv[off + HEADER.size:off + HEADER.size + size]).decode()
            commit(h, self._st, self.role, False, 0)
            return _taken_value(self._read_spill, name)
        start = self._slot0 + area * self._slot_size + HEADER_BYTES
        self._stats["bytes"] += size
        if tag == T_BYTES:              # bytes are always copied out: they own their memory
            value = self._mv[start:start + size].tobytes()
            commit(h, self._st, self.role, False, area)
            return value
        if size < COPY_MAX:
            payload = bytearray(self._mv[start:start + size])
            commit(h, self._st, self.role, False, area)
            if tag == T_FORWARD:
                return _taken_value(self._read_forward, payload)
            return decode(tag, aux, bits, payload)
        commit(h, self._st, self.role, True, area)
        pin = _Pin(h, h, abi.SLOTS + 16 * area + abi.VIEWS, self._seg)
        value = _taken_value(self._decode_pinned, tag, aux, bits, self._addr + start, size, pin)
        _remember(value, self._seg, None, pin, start, size, tag, aux, bits)
        return value

    def _read_forward(self, desc: bytearray) -> Any:
        """The value a forward names, read zero-copy from the other ring's area (its writer
        counted our view there; the pin gives it back)."""
        offset, size, tag, aux, bits, word, n_ring = _FORWARD.unpack_from(desc)
        names = bytes(desc[_FORWARD.size:]).decode()
        ring, h = self._upstream(names[:n_ring])
        if names[n_ring:]:              # in a spill segment of that ring
            seg, pins = self._spill(names[n_ring:])
            pin: _Pin = _SpillPin(h, pins, word, seg)
        else:
            seg, pins = ring, h
            pin = _Pin(h, h, word, seg)
        if word >= pins.shape[0] or offset + size > seg.size:
            raise ValueDecodeError(f"a forward names bytes {offset}..{offset + size} and view "
                                   f"count word {word} of {seg.name}, which has {seg.size} "
                                   f"bytes and {pins.shape[0]} words")
        value = self._decode_pinned(tag, aux, bits, pins.ctypes.data + offset, size, pin)
        _remember(value, ring, None if seg is ring else seg, pin, offset, size, tag, aux, bits)
        return value

    def _upstream(self, name: str) -> tuple[Segment, np.ndarray]:
        """Ring segment ``name`` mapped, with its header (kept for the next forwards)."""
        if name == self._seg.name:
            return self._seg, self._h
        cached = self._upstreams.get(name)
        if cached is not None:
            self._upstreams.move_to_end(name)
            return cached
        try:
            seg = Segment.open(name, writable=True)
        except FileNotFoundError:
            raise closed_error(self, f"the ring {name} that a forwarded value lives in is gone "
                                     "(its owner closed it or exited)") from None
        capacity = int(np.frombuffer(seg.mmap, np.uint32, abi.N_SLOTS + 1)[abi.N_SLOTS])
        h = np.frombuffer(seg.mmap, np.uint32, abi.header_words(capacity))
        self._upstreams[name] = seg, h
        if len(self._upstreams) > _UPSTREAMS_KEPT:
            self._upstreams.popitem(last=False)
        return seg, h

    def _read_spill(self, name: str) -> Any:
        seg, sh = self._spill(name)
        tag, aux, size, scalar = read_header(seg.buf, _SPILL_HEAD)
        start = _SPILL_HEAD + HEADER_BYTES
        self._stats["bytes"] += size
        if size < COPY_MAX:
            payload = bytearray(seg.buf[start:start + size])
            self._unpin_spill(sh, name)
            if tag == T_FORWARD:
                return self._read_forward(payload)
            return decode(tag, aux, scalar, payload)
        pin = _SpillPin(self._h, sh, 0, seg)
        value = self._decode_pinned(tag, aux, scalar, sh.ctypes.data + start, size, pin)
        _remember(value, self._seg, seg, pin, start, size, tag, aux, scalar)
        return value

    def _spill(self, name: str) -> tuple[Segment, np.ndarray]:
        """Spill segment ``name``, mapped (kept from an earlier value when it can be)."""
        cached = self._spill_cache.get(name)
        if cached is None:
            return self._map_spill(name)
        self._spill_cache.move_to_end(name)
        return cached

    def _map_spill(self, name: str) -> tuple[Segment, np.ndarray]:
        """Map spill segment ``name`` and remember it: the writer reuses its spill segments,
        and a mapping already made has its pages faulted in. Mappings beyond the newest are
        kept while they total ``SPILL_KEEP_BYTES`` (a name is never reused for another
        segment, so a kept mapping is never stale)."""
        try:
            seg = Segment.open(name, writable=True)
        except FileNotFoundError:
            raise closed_error(self, f"its spill segment {name} is gone "
                                     "(the writer closed the channel or died)") from None
        sh = np.frombuffer(seg.mmap, np.uint32, 16)
        cache = self._spill_cache
        cache[name] = (seg, sh)
        total = sum(s.size for s, _ in cache.values())
        while len(cache) > 1 and total - seg.size > SPILL_KEEP_BYTES:
            _, (old, _) = cache.popitem(last=False)
            total -= old.size
        return seg, sh

    def _unpin_spill(self, sh: np.ndarray, name: str) -> None:
        self._ops["release"](self._h, sh, 0)
        if self._h[abi.CLOSED] and native.load(sh, 0) == 0:
            unlink_name(name)               # the writer may be gone: the last reader cleans up

    @staticmethod
    def _decode_pinned(tag: int, aux: int, scalar: Any, address: int, size: int,
                       pin: Any) -> Any:
        import pyarrow as pa
        return decode(tag, aux, scalar, pa.foreign_buffer(address, size, base=pin))

    # waiting -----------------------------------------------------------------------------
    def _run(self, op: str, args: tuple, budget: int, timeout_s: float | None,
             what: str) -> Any:
        """Call a blocking op; on a timed-out slice, check peers and go on until the deadline.

        The op's ``_try`` twin goes first: it keeps the GIL, and most calls need no wait.
        """
        res = self._ops[op + "_try"](*args, 0)
        rc = res if type(res) is int else res[0]
        if rc == 1:
            return res
        wait = self._ops[op]
        if rc == 0 and budget > 0:
            res = wait(*args, budget)
            rc = res if type(res) is int else res[0]
            if rc == 1:
                return res
        total = timeout_ns(timeout_s)
        deadline = None if total < 0 else time.monotonic_ns() + total - budget
        while True:
            if rc == -1:
                raise closed_error(self, self._reason())
            if rc == 1:
                return res
            now = time.monotonic_ns()
            if deadline is not None and now >= deadline:
                raise timeout_error(self, what, timeout_s)
            self._check_peers()
            budget = self._slice_ns if deadline is None else min(self._slice_ns, deadline - now)
            res = wait(*args, budget)
            rc = res if type(res) is int else res[0]

    def _check_peers(self) -> None:
        h = self._h
        if self.role == WRITER:
            peers = [(f"reader {i}", int(h[abi.READER_PIDS + i])) for i in range(self._n_readers)]
        else:
            peers = [("writer", int(h[abi.WRITER_PID]))]
        for what, pid in peers:
            if _pid_gone(pid):
                self.mark_broken(f"the {what} process (pid {pid}) died")
                return

    def announce_reading(self, active: bool) -> None:
        """Reader: say whether a thread is reading this channel right now.

        A writer that finds no reader active (``reader_is_active``) after a write can notify the
        reading side out of band. Both sides use sequentially consistent atomics, so a value
        written just as the reader leaves is seen by one of them: the reader re-checks the
        channel after announcing it left.
        """
        native.store(self._h, abi.READING, 1 if active else 0)

    def notify_address(self) -> int:
        """Address of the word readers sleep on (it moves with each value and on a close);
        the count of sleepers is the next word. For one waiter on several producers."""
        return self._addr + 4 * abi.RD_NOTIFY

    def has_value(self) -> bool:
        """Reader: whether a read would not wait now (a value is there, or the channel is
        closed). A hint for pollers: cheaper than a read that finds nothing."""
        h = self._h
        return int(h[abi.WRITE_SEQ]) != int(self._st[abi.ST_SEQ]) or bool(h[abi.CLOSED])

    def notify(self) -> None:
        """Move the readers' word and wake who sleeps on it (they re-check; nothing else)."""
        self._ops["ring"](self._h)

    def reader_is_active(self) -> bool:
        return bool(native.load(self._h, abi.READING))

    def taken(self) -> int:
        return int(self._st[abi.ST_VALUES])

    def progress(self) -> tuple[int, tuple[int, ...]]:
        h = self._h
        return int(h[abi.WRITE_SEQ]), tuple(int(h[abi.READER_SEQ + 16 * i])
                                            for i in range(self._n_readers))

    def backlog(self) -> int:
        """Values written that the slowest reader has not consumed yet."""
        h = self._h
        written = int(h[abi.WRITE_SEQ])
        return max((written - int(h[abi.READER_SEQ + 16 * i])) & _MASK
                   for i in range(self._n_readers))

    # closing -----------------------------------------------------------------------------
    def close(self) -> None:
        self._shut(1, None)

    def abandon(self) -> None:
        self._shut(1, None)
        for entry in list(self._spills):    # unread spills too; readers' mappings stay valid
            self._drop_spill(entry)

    def mark_broken(self, reason: str) -> None:
        self._shut(2, reason)

    def _shut(self, code: int, reason: str | None) -> None:
        h = self._h
        if reason and not h[abi.CLOSED]:
            raw = reason.encode()[:_REASON_BYTES - 1]
            self._mv[self._reason_off:self._reason_off + len(raw) + 1] = raw + b"\0"
        native.close(h, code)
        if self._bell is not None:
            self._bell.ring()
        for entry in [e for e in self._spills if native.load(e[1], 0) == 0]:
            self._drop_spill(entry)     # spills still unread stay for their readers
        self._spill_cache.clear()
        self._upstreams.clear()
        if self._owner:
            self._seg.unlink()

    def _reason(self) -> str | None:
        if self._h[abi.CLOSED] != 2:
            return None
        raw = bytes(self._mv[self._reason_off:self._reason_off + _REASON_BYTES])
        return raw.split(b"\0", 1)[0].decode(errors="replace") or "a peer process died"

    @property
    def closed(self) -> bool:
        return bool(self._h[abi.CLOSED])

    def statistics(self) -> dict[str, Any]:
        h = self._h
        st = self._st
        return {"kind": self.kind, "role": self.role, "n_readers": self._n_readers,
                "capacity": self._n, "slot_bytes": self._slot_size - HEADER_BYTES,
                "sync": self._sync, "check_s": self._check_s, "closed": self.closed,
                "name": self._seg.name,
                "written": int(h[abi.WRITE_SEQ]), "backlog": self.backlog(),
                "spill_segments": len(self._spills), "values": int(st[abi.ST_VALUES]),
                "waits": int(st[abi.ST_WAITS]), **self._stats}

    def __repr__(self) -> str:
        role = "owner" if self.role is None else "writer" if self.role == WRITER \
            else f"reader {self.role}"
        return f"<ShmChannel {self._seg.name} {role}, {self._n_readers} readers>"


class _SpillPin(_Pin):
    """A release token for a spill segment: the last reader unlinks it if the channel closed."""

    __slots__ = ()

    def __del__(self) -> None:
        try:
            native.ops()["release"](self.h, self.pins, self.word)
            if self.h[abi.CLOSED] and native.load(self.pins, 0) == 0:
                unlink_name(self.keep.name)
        except Exception:   # noqa: BLE001 - interpreter shutdown
            pass


def _attach(name: str, role: int | None, sync: str, spin_us: float,
            check_s: float, bell: Any = None) -> ShmChannel:
    """Open an endpoint of an existing channel (unpickling lands here)."""
    try:
        seg = Segment.open(name, writable=True)
    except FileNotFoundError:
        from ..exceptions import ChannelClosedError
        raise ChannelClosedError(f"shared-memory channel {name} no longer exists "
                                 "(its owner closed it or exited)") from None
    ep = object.__new__(ShmChannel)
    ep._setup(seg, role, sync, spin_us, check_s, owner=False, bell=bell)
    return ep
