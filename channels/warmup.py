"""The one-off numba compile of the channels' hot ops: once per install, in one process at a time.

In: nothing (the installed ``channels/_jit.py``). Out: ``compile_lock()`` around every load of
the compiled ops, ``is_ready()``, and ``start()``, which compiles them in a background process.
Invariants: after a fresh install the ops take about 10 s to compile (then about 0.4 s to load
from numba's cache). Without a lock every new process (the driver, each actor attaching a ring)
would compile them at once, on the same cores; with it, one compiles and the others wait, then
load the cache. A ready stamp (keyed by the source's path, size and mtime) says the cache is
written, so ``start()`` costs nothing once it is. No numba import here: ``import headrace``
stays light.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from .._config import cache_dir

#: The longest a process waits for another one's compile before compiling itself.
LOCK_WAIT_S = 180.0

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jit.py")


def _key() -> str:
    st = os.stat(_SOURCE)
    raw = f"{_SOURCE}:{st.st_size}:{st.st_mtime_ns}:{sys.version_info[:2]}".encode()
    return hashlib.sha1(raw).hexdigest()[:16]


def _path(suffix: str) -> str:
    """The stamp or lock file of this install, next to numba's cache in the per-user cache
    directory (wiping that directory wipes both)."""
    folder = os.path.join(cache_dir(), "numba")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"ready-{_key()}.{suffix}")


def is_ready() -> bool:
    """Whether numba's cache of the hot ops has been written for this install."""
    return os.path.exists(_path("ready"))


@contextlib.contextmanager
def compile_lock() -> Iterator[None]:
    """Hold the install's compile lock (waits for another process's compile, at most
    ``LOCK_WAIT_S``); on leaving, marks the cache ready."""
    ready = is_ready()
    fd = None if ready else os.open(_path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fd is not None:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break           # compile ourselves rather than wait for ever
                    time.sleep(0.05)
        yield
        if not ready:
            with open(_path("ready"), "w") as f:
                f.write(_SOURCE + "\n")
    finally:
        if fd is not None:
            os.close(fd)                # releases the lock


def start() -> subprocess.Popen | None:
    """Compile the hot ops in a background process unless the cache is ready; the caller
    reaps (or kills) the process it gets."""
    if is_ready():
        return None
    return subprocess.Popen(
        [sys.executable, "-c", "from headrace.channels import native; native.ops()"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
