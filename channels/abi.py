"""The word map of a shm ring's header and of an endpoint's private state (no numba here).

In: nothing. Out: the indices every user of the hot ops (``channels.native``) agrees on: the
shared header of a ring (``uint32`` words, hot ones on their own 64-byte cache line), a
doorbell's header, and an endpoint's private ``int64`` state that the fused ops keep current.
Invariants: changing a word here changes the ops' compiled code (``channels.aot`` hashes this
file with the ops' source, so an out-of-date build is never used).
"""

from __future__ import annotations

# Header words (uint32 indices). Hot words sit on their own 64-byte cache line.
MAGIC, VERSION, N_SLOTS, N_READERS, SLOT_SIZE_LO, SLOT_SIZE_HI, WRITER_PID = range(7)
READING = 8                     # a reader announces it is reading now (see ShmChannel.reading)
WRITE_SEQ = 16                  # values published so far (wraps at 2**32; compared by difference)
RD_NOTIFY, RD_WAITERS = 32, 33  # readers sleep on RD_NOTIFY
WR_NOTIFY, WR_WAITERS = 48, 49  # the writer sleeps on WR_NOTIFY
CLOSED = 64                     # 0 open, 1 closed, 2 broken (a peer died)
READER_PIDS = 80                # one word per reader, 64 readers at most
MAX_READERS = 64
READER_SEQ = 160                # per reader, one cache line each: values it has consumed
SLOTS = READER_SEQ + 16 * MAX_READERS   # per slot, one cache line: UNREAD, VIEWS
UNREAD, VIEWS = 0, 1            # offsets inside a slot's line (VIEWS: of payload area i)

# A doorbell (channels.doorbell) is a header of its own whose RD_NOTIFY word the writers of
# several channels bump after each value: one reader waits on it for whichever comes first.
BELL_WORDS = CLOSED + 16

# Per-endpoint state (a private int64 array, not shared): the fused ops keep it current.
ST_SPIN, ST_SPIN_MAX, ST_IDLE_NS, ST_SEQ, ST_WAITS, ST_VALUES, ST_SLOT0, ST_SLOT_SIZE = range(8)
ST_WORDS = 8


def header_words(n_slots: int) -> int:
    """Number of uint32 words of the header of a ring with ``n_slots`` slots."""
    return SLOTS + 16 * n_slots


# The ops' signatures, as numba reads them: exactly the types the channels pass (headers are
# C-contiguous uint32 arrays, slot words uint64, endpoint state int64; Python ints are int64).
# Both builds use them: numba.pycc at install (channels.aot), numba's JIT as the fallback.
_H, _M, _S = "uint32[::1]", "uint64[::1]", "int64[::1]"
SIGNATURES: dict[str, str] = {
    "ring": f"void({_H})",
    "bell_wait": f"int64({_H}, {_S}, int64, int64)",
    "write_wait": f"int64({_H}, {_S}, int64)",
    "write_scalar": f"int64({_H}, {_M}, {_S}, int64, int64, int64)",
    "write_float": f"int64({_H}, {_M}, {_S}, int64, float64, int64)",
    "pick_area": f"int64({_H}, {_M}, {_S}, {_S})",
    "write_commit": f"void({_H}, {_M}, {_S}, {_S}, int64, int64, int64, int64, int64)",
    "read_wait": f"UniTuple(int64, 6)({_H}, {_M}, {_S}, int64, int64)",
    "read_commit": f"void({_H}, {_S}, int64, boolean, int64)",
    "release": f"void({_H}, {_H}, int64)",
    "write_wait_try": f"int64({_H}, {_S}, int64)",
    "write_scalar_try": f"int64({_H}, {_M}, {_S}, int64, int64, int64)",
    "write_float_try": f"int64({_H}, {_M}, {_S}, int64, float64, int64)",
    "read_wait_try": f"UniTuple(int64, 6)({_H}, {_M}, {_S}, int64, int64)",
    "wait_any": f"int64({_S}, {_H}, int64, int64, boolean)",
    "snapshot": f"int64({_S}, {_H})",
    "load": f"uint32({_H}, int64)",
    "store": f"void({_H}, int64, int64)",
    "add": f"uint32({_H}, int64, int64)",
    "close": f"void({_H}, int64)",
}
