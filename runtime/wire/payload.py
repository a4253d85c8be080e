"""Payloads: encoded values as they sit in the object table and travel in control messages.

In: a Python value (``encode``) or a wire descriptor plus received frames (``from_wire``).
Out: ``Payload``: a pickle stream and its out-of-band buffers, each inline or in shared memory.
Invariants: a payload whose buffers total >= INLINE_MAX_BYTES keeps them in one POSIX segment
named after the session owner (the driver), so its shutdown sweeps them; a buffer that already
lies in a segment this process mapped (a worker echoing its input) is referenced, not copied;
a Payload holds its Segments, so their names live exactly as long as some payload needs them.
Every segment starts with a 64-byte header whose first word counts the zero-copy views alive in
all processes (each decode pins its segments until the values built on them die); the driver
keeps a freed segment mapped for reuse (``SegmentPool``) only when that count is 0, because a
fresh tmpfs page costs a page fault and reusing one costs nothing.

  sender                                   wire                         receiver
  encode(v) ─▶ meta + [inline | (seg, off, len)] ─▶ frames[0] header, frames[1:] inline
                                                    ─▶ from_wire ─▶ decode() ─▶ zero-copy value
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from ..._config import INLINE_MAX_BYTES
from ...channels.segments import SHM_DIR, Segment, unlink_name, segment_name
from ...channels.serialization import dumps, loads

_ALIGN = 64
_HEAD = 64      # the segment header: word 0 counts live zero-copy views, in every process
#: Wire form of one buffer: an int (index of an inline frame) or (segment name, offset, nbytes).
BufSpec = int | tuple[str, int, int]
#: Wire form of a payload: (pickle stream, buffer specs).
WireDesc = tuple[bytes, tuple[BufSpec, ...]]


#: Value types that pickle as themselves: no ref, handle or out-of-band buffer can be inside, so
#: a call's arguments or result of these types skip the walk and capture (runtime/procs).
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})

#: True in a process on another host than the driver: nothing goes to shm, values travel inline.
_INLINE_ONLY = False


def inline_only() -> None:
    """This process is on another host than the driver: encode every value inline."""
    global _INLINE_ONLY
    _INLINE_ONLY = True


class Payload:
    """An encoded value. ``decode()`` rebuilds it, reading shared-memory buffers in place."""

    __slots__ = ("meta", "buffers", "specs", "segments")

    def __init__(self, meta: bytes, buffers: list[memoryview],
                 specs: list[tuple[str, int, int] | None], segments: list[Segment]) -> None:
        self.meta = meta
        self.buffers = buffers        # ready to hand to pickle.loads
        self.specs = specs            # per buffer: None (inline) or where it lies in shm
        self.segments = segments      # keeps the segment names alive

    @property
    def nbytes(self) -> int:
        return len(self.meta) + sum(b.nbytes for b in self.buffers)

    def decode(self) -> Any:
        """The value; buffers in shared memory are used in place and pin their segment."""
        if not self.segments:
            return loads(self.meta, self.buffers)
        import pyarrow as pa    # lazy: only large payloads get here
        buffers: list[Any] = list(self.buffers)
        pins: dict[str, _ViewPin] = {}
        for i, spec in enumerate(self.specs):
            if spec is None:
                continue
            name, offset, nbytes = spec
            pin = pins.get(name)
            if pin is None:
                seg = next(g for g in self.segments if g.name == name)
                pin = pins[name] = _ViewPin(seg)
            buffers[i] = pa.foreign_buffer(pin.address + offset, nbytes, base=pin)
        return loads(self.meta, buffers)

    def to_wire(self, frames: list[Any], *, inline: bool = False) -> WireDesc:
        """The descriptor to send; inline buffers are appended to ``frames`` (zero copy).

        ``inline``: shared-memory buffers travel as frames too (for a process on another host).
        """
        specs: list[BufSpec] = []
        for buf, spec in zip(self.buffers, self.specs, strict=True):
            if spec is None or inline:
                specs.append(len(frames))
                frames.append(buf)
            else:
                specs.append(spec)
        return self.meta, tuple(specs)


class _ViewPin:
    """Counts one decode's views of a segment in its header while any of them is alive."""

    __slots__ = ("address", "header", "segment")

    def __init__(self, segment: Segment) -> None:
        from ...channels import native      # lazy: the ops load on the first large payload
        self.segment = segment
        self.header = _header(segment)
        self.address = self.header.ctypes.data
        native.add(self.header, 0, 1)

    def __del__(self) -> None:
        try:
            from ...channels import native
            native.add(self.header, 0, -1)
        except Exception:   # noqa: BLE001,S110 - interpreter shutdown: the mapping goes too
            pass


def _header(segment: Segment) -> Any:
    import numpy as np
    return np.frombuffer(segment.mmap, np.uint32, _HEAD // 4)


class SegmentPool:
    """Freed object segments of the driver, kept mapped for reuse (bounded; oldest go first).

    A segment comes back here from its finalizer, and only when no process holds a view of it;
    otherwise it is unlinked (its mappings stay valid for those views).
    """

    def __init__(self, max_bytes: int = 1 << 30, max_segments: int = 8) -> None:
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self._free: list[tuple[str, int, mmap.mmap]] = []
        self._lock = threading.Lock()

    def recycle(self, name: str, size: int, mm: mmap.mmap) -> None:
        """Finalizer of a driver-owned segment: keep it for reuse, or unlink it."""
        try:
            import numpy as np
            idle = size >= _HEAD and int(np.frombuffer(mm, np.uint32, 1)[0]) == 0
        except (ValueError, TypeError):     # a closed mapping
            idle = False
        if not idle or size > self.max_bytes:
            unlink_name(name)
            return
        with self._lock:
            self._free.append((name, size, mm))
            while len(self._free) > self.max_segments or \
                    sum(e[1] for e in self._free) > self.max_bytes:
                unlink_name(self._free.pop(0)[0])

    def create(self, parts: list[tuple[int, memoryview]], size: int, owner_pid: int) -> Segment:
        """A segment holding ``parts``: a freed one of a fitting size, else a new one."""
        with self._lock:
            fits = [e for e in self._free if size <= e[1] <= 2 * size]
            entry = min(fits, key=lambda e: e[1]) if fits else None
            if entry is not None:
                self._free.remove(entry)
        if entry is None:
            seg = Segment.create_from(parts, size, segment_name(owner_pid), owner=False,
                                      writable=True)
        else:
            name, got, mm = entry
            if memoryview(mm).readonly:     # adopted from a worker: map it writable once
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
                try:
                    mm = mmap.mmap(fd, got)
                finally:
                    os.close(fd)
            seg = Segment(name, got, mm, owner=False)
            for offset, data in parts:
                seg.buf[offset:offset + data.nbytes] = data.cast("B") if data.ndim != 1 \
                    or data.format != "B" else data
        seg.take_ownership(self.recycle)
        return seg

    def clear(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for name, _, _ in free:
            unlink_name(name)


class SegmentTable:
    """The segments a process has mapped, by name; finds which one a buffer lies in.

    The driver's table has a ``pool``: segments it creates or adopts go back there when freed.
    """

    def __init__(self, pool: SegmentPool | None = None) -> None:
        self._by_name: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
        self._ranges: dict[str, tuple[int, int]] = {}      # name -> (start, end) address
        self.pool = pool

    def get(self, name: str, *, owner: bool) -> Segment:
        seg = self._by_name.get(name)
        if seg is None:
            seg = Segment.open(name, writable=True)     # writable: views are counted in it
            self._by_name[name] = seg
        if owner:
            seg.take_ownership(self.pool.recycle if self.pool is not None else None)
        return seg

    def add(self, seg: Segment) -> None:
        self._by_name[seg.name] = seg

    def locate(self, buf: memoryview) -> tuple[Segment, int] | None:
        """The live mapped segment containing ``buf`` and its offset there, if any."""
        live = dict(self._by_name.items())
        if not live:
            self._ranges.clear()
            return None
        start = _address(buf)
        for name in [n for n in self._ranges if n not in live]:
            del self._ranges[name]
        for name, seg in live.items():
            bounds = self._ranges.get(name)
            if bounds is None:
                lo = _address(seg.buf)
                bounds = self._ranges[name] = (lo, lo + seg.size)
            if bounds[0] <= start and start + buf.nbytes <= bounds[1]:
                return seg, start - bounds[0]
        return None


def encode(value: Any, *, owner_pid: int, own: bool, table: SegmentTable | None = None,
           reuse_pid: int | None = None, made: list[Segment] | None = None) -> Payload:
    """Encode ``value``; large out-of-band buffers go to one new shm segment (or stay put).

    ``own``: this process unlinks the new segment when the payload dies (the driver); a worker
    passes False and the driver adopts the name on receipt. ``reuse_pid``: only buffers in
    segments named after that process stay put (the receiver may own no others); ``made``
    gets the new segment, if one was made.
    """
    meta, pickle_buffers = dumps(value)
    raws = [b.raw() for b in pickle_buffers]
    if _INLINE_ONLY or sum(r.nbytes for r in raws) < INLINE_MAX_BYTES:
        return Payload(meta, raws, [None] * len(raws), [])
    specs: list[tuple[str, int, int] | None] = [None] * len(raws)
    segments: list[Segment] = []
    fresh: list[int] = []
    prefix = None if reuse_pid is None else segment_name(reuse_pid).rsplit("-", 1)[0] + "-"
    for i, raw in enumerate(raws):
        found = table.locate(raw) if table is not None else None
        if found is not None and prefix is not None and not found[0].name.startswith(prefix):
            found = None
        if found is None:
            fresh.append(i)
        else:
            seg, offset = found
            specs[i] = (seg.name, offset, raw.nbytes)
            if seg not in segments:
                segments.append(seg)
    buffers = list(raws)
    if fresh:
        pool = table.pool if table is not None and own else None
        seg = _copy_into_segment([raws[i] for i in fresh], owner_pid, own, specs, fresh, buffers,
                                 pool)
        segments.append(seg)
        if made is not None:
            made.append(seg)
        if table is not None:
            table.add(seg)
    for i, spec in enumerate(specs):       # decode-side views, read-only like the receiver's
        if spec is not None and i not in fresh:
            buffers[i] = raws[i].toreadonly()
    return Payload(meta, buffers, specs, segments)


def _copy_into_segment(raws: list[memoryview], owner_pid: int, own: bool,
                       specs: list[tuple[str, int, int] | None], where: list[int],
                       buffers: list[memoryview], pool: SegmentPool | None) -> Segment:
    offsets, size = [], _HEAD
    for raw in raws:
        offsets.append(size)
        size += -(-raw.nbytes // _ALIGN) * _ALIGN
    parts = list(zip(offsets, raws, strict=True))
    if pool is not None:
        seg = pool.create(parts, size, owner_pid)
    else:
        seg = Segment.create_from(parts, size, segment_name(owner_pid), owner=own)
    for raw, offset, i in zip(raws, offsets, where, strict=True):
        specs[i] = (seg.name, offset, raw.nbytes)
        buffers[i] = seg.buf[offset:offset + raw.nbytes]
    return seg


def from_wire(desc: WireDesc, frames: Sequence[Any], table: SegmentTable, *,
              owner: bool) -> Payload:
    """Rebuild a payload from its descriptor; ``owner`` adopts newly seen segment names."""
    meta, wire_specs = desc
    buffers: list[memoryview] = []
    specs: list[tuple[str, int, int] | None] = []
    segments: list[Segment] = []
    for spec in wire_specs:
        if isinstance(spec, int):
            frame = frames[spec]
            buffers.append(frame.buffer if hasattr(frame, "buffer") else memoryview(frame))
            specs.append(None)
            continue
        name, offset, nbytes = spec
        seg = table.get(name, owner=owner)
        if seg not in segments:
            segments.append(seg)
        buffers.append(seg.buf[offset:offset + nbytes].toreadonly())
        specs.append(spec)
    return Payload(meta, buffers, specs, segments)


def _address(buf: memoryview) -> int:
    import numpy as np          # lazy: only large payloads get here
    return int(np.frombuffer(buf, np.uint8).ctypes.data) if buf.nbytes else 0
