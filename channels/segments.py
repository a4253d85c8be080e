"""POSIX shared-memory segments: create, open, unlink, and sweep the ones of dead owners.

In: a size, or a name. Out: ``Segment`` (a mapped segment with a writable or read-only view).
Invariants: names are ``headrace-<owner pid>-<hex id>``, never reused; only the owner unlinks
(``Segment.unlink``, or its finalizer once the owning object is garbage-collected); a mapping
stays valid after the name is unlinked, so zero-copy views outlive the name safely.
We use ``os.open('/dev/shm/...')`` + ``mmap`` rather than ``multiprocessing.shared_memory``,
whose resource tracker unlinks segments when any process that opened them exits.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
import weakref
from typing import Any

from .._config import SHM_PREFIX

SHM_DIR = "/dev/shm"


def segment_name(owner_pid: int | None = None) -> str:
    """A fresh, unique segment name carrying the owner pid."""
    return f"{SHM_PREFIX}-{owner_pid or os.getpid()}-{secrets.token_hex(8)}"


class Segment:
    """One mapped POSIX shm segment. ``buf`` is a memoryview over the whole mapping."""

    __slots__ = ("name", "size", "mmap", "buf", "_finalizer", "__weakref__")

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.mmap = mm
        self.buf = memoryview(mm) if size else memoryview(b"")
        # The owner unlinks the name when this object dies; the mapping lives on in any views.
        self._finalizer = weakref.finalize(self, _unlink, name) if owner else None

    @classmethod
    def create(cls, size: int, name: str | None = None, *, owner: bool = True) -> Segment:
        """Create and map a new segment of ``size`` bytes (pages populated up front)."""
        name = name or segment_name()
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = _map(fd, size, writable=True, populate=True)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        return cls(name, size, mm, owner)

    @classmethod
    def create_from(cls, parts: list[tuple[int, memoryview]], size: int, name: str | None = None,
                    *, owner: bool = True, writable: bool = False) -> Segment:
        """Create a segment holding ``parts`` (offset, bytes), mapped read-only unless asked.

        Written with pwrite, which fills fresh tmpfs pages without a page fault per page
        (about 2x faster than writing through a new mapping on virtual machines).
        """
        name = name or segment_name()
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            for offset, data in parts:
                done = 0
                while done < data.nbytes:
                    done += os.pwrite(fd, data[done:], offset + done)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot) if size \
                else mmap.mmap(-1, 1)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        return cls(name, size, mm, owner)

    @classmethod
    def open(cls, name: str, *, writable: bool = False, owner: bool = False) -> Segment:
        """Map an existing segment; raises FileNotFoundError if the name is gone."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = _map(fd, size, writable=writable, populate=False)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner)

    def take_ownership(self, on_free: Any = None) -> None:
        """Make this object free the name when it is garbage-collected.

        ``on_free(name, size, mmap)`` replaces the plain unlink (a pool may keep the segment);
        it must not hold this object.
        """
        if self._finalizer is not None:
            if on_free is None:
                return
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _unlink, self.name) if on_free is None \
            else weakref.finalize(self, on_free, self.name, self.size, self.mmap)

    def disown(self) -> None:
        """Hand the name to someone else: this object will not unlink it."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def unlink(self) -> None:
        """Remove the name now (idempotent); existing mappings stay valid."""
        if self._finalizer is not None:
            self._finalizer()
        else:
            _unlink(self.name)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {self.size} bytes)"


def _map(fd: int, size: int, *, writable: bool, populate: bool) -> mmap.mmap:
    if size == 0:
        return mmap.mmap(-1, 1)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=prot)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def owned_segments(owner_pid: int) -> list[str]:
    """Names of the segments in /dev/shm whose name carries ``owner_pid``."""
    prefix = f"{SHM_PREFIX}-{owner_pid}-"
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_owned(owner_pid: int) -> int:
    """Unlink every segment of ``owner_pid``; returns how many were removed."""
    names = owned_segments(owner_pid)
    for name in names:
        _unlink(name)
    return len(names)


def sweep_dead_owners() -> list[str]:
    """Unlink the segments whose owner process is gone; returns their names.

    Gone: no such pid, a zombie, or a pid reused by a process that started after the segment
    was last changed (so it cannot be the owner, which made the segment while running).
    """
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != SHM_PREFIX or not parts[1].isdigit():
            continue
        try:
            changed = os.stat(os.path.join(SHM_DIR, name)).st_ctime
        except FileNotFoundError:
            continue
        if not is_alive(int(parts[1]), since=changed):
            _unlink(name)
            removed.append(name)
    return removed


#: Slack when comparing a process's start time with a file time (clock ticks, clock skew).
_START_SLACK_S = 0.5


def is_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` is running (a zombie is not); with ``since`` (a wall-clock time),
    also whether it started before then, i.e. it is not a newer process that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:                     # no /proc to read: ask the kernel
        return _exists(pid)
    if fields[0] in (b"Z", b"X"):
        return False
    if since is None:
        return True
    started = _boot_wall_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= since + _START_SLACK_S


def _boot_wall_time() -> float:
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
