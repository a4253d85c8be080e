"""Payloads: encoded values as they sit in the object table and travel in control messages.

In: a Python value (``encode``) or a wire descriptor plus received frames (``from_wire``).
Out: ``Payload``: a pickle stream and its out-of-band buffers, each inline or in shared memory.
Invariants: a payload whose buffers total >= INLINE_MAX_BYTES keeps them in one POSIX segment
named after the session owner (the driver), so its shutdown sweeps them; a buffer that already
lies in a segment this process mapped (a worker echoing its input) is referenced, not copied;
a Payload holds its Segments, so their names live exactly as long as some payload needs them.

  sender                                   wire                         receiver
  encode(v) ─▶ meta + [inline | (seg, off, len)] ─▶ frames[0] header, frames[1:] inline
                                                    ─▶ from_wire ─▶ decode() ─▶ zero-copy value
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from .._config import INLINE_MAX_BYTES
from ..channels.segments import Segment, segment_name
from ..channels.serialization import dumps, loads

_ALIGN = 64
#: Wire form of one buffer: an int (index of an inline frame) or (segment name, offset, nbytes).
BufSpec = int | tuple[str, int, int]
#: Wire form of a payload: (pickle stream, buffer specs).
WireDesc = tuple[bytes, tuple[BufSpec, ...]]


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
        return loads(self.meta, self.buffers)

    def to_wire(self, frames: list[Any]) -> WireDesc:
        """The descriptor to send; inline buffers are appended to ``frames`` (zero copy)."""
        specs: list[BufSpec] = []
        for buf, spec in zip(self.buffers, self.specs, strict=True):
            if spec is None:
                specs.append(len(frames))
                frames.append(buf)
            else:
                specs.append(spec)
        return self.meta, tuple(specs)


class SegmentTable:
    """The segments a process has mapped, by name; finds which one a buffer lies in."""

    def __init__(self) -> None:
        self._by_name: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
        self._ranges: dict[str, tuple[int, int]] = {}      # name -> (start, end) address

    def get(self, name: str, *, owner: bool) -> Segment:
        seg = self._by_name.get(name)
        if seg is None:
            seg = Segment.open(name, owner=owner)
            self._by_name[name] = seg
        elif owner:
            seg.take_ownership()
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


def encode(value: Any, *, owner_pid: int, own: bool, table: SegmentTable | None = None) -> Payload:
    """Encode ``value``; large out-of-band buffers go to one new shm segment (or stay put).

    ``own``: this process unlinks the new segment when the payload dies (the driver); a worker
    passes False and the driver adopts the name on receipt.
    """
    meta, pickle_buffers = dumps(value)
    raws = [b.raw() for b in pickle_buffers]
    if sum(r.nbytes for r in raws) < INLINE_MAX_BYTES:
        return Payload(meta, raws, [None] * len(raws), [])
    specs: list[tuple[str, int, int] | None] = [None] * len(raws)
    segments: list[Segment] = []
    fresh: list[int] = []
    for i, raw in enumerate(raws):
        found = table.locate(raw) if table is not None else None
        if found is None:
            fresh.append(i)
        else:
            seg, offset = found
            specs[i] = (seg.name, offset, raw.nbytes)
            if seg not in segments:
                segments.append(seg)
    buffers = list(raws)
    if fresh:
        seg = _copy_into_segment([raws[i] for i in fresh], owner_pid, own, specs, fresh, buffers)
        segments.append(seg)
        if table is not None:
            table.add(seg)
    for i, spec in enumerate(specs):       # decode-side views, read-only like the receiver's
        if spec is not None and i not in fresh:
            buffers[i] = raws[i].toreadonly()
    return Payload(meta, buffers, specs, segments)


def _copy_into_segment(raws: list[memoryview], owner_pid: int, own: bool,
                       specs: list[tuple[str, int, int] | None], where: list[int],
                       buffers: list[memoryview]) -> Segment:
    offsets, size = [], 0
    for raw in raws:
        offsets.append(size)
        size += -(-raw.nbytes // _ALIGN) * _ALIGN
    seg = Segment.create_from(list(zip(offsets, raws, strict=True)), size,
                              segment_name(owner_pid), owner=own)
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
