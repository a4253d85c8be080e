"""The channels' hot ops, loaded once per process: built ahead of time, or numba's JIT.

In: ``HEADRACE_NATIVE`` ("auto", "aot" or "jit"; ``_config.NATIVE``). Out: ``ops()``, the table
of entry points (``abi.SIGNATURES`` names) that shm rings, doorbells and waiters call; ``load``,
``store``, ``add`` and ``close`` for the cold paths; ``kind()``, which build is in use; and
``prepare()``, which starts the JIT's one-off compile in the background where it is needed.
Invariants:
- "auto" uses the extension module that ``pip install`` built (``channels.aot``) when its stamp
  matches the installed source: no numba import and no compile in any process. Otherwise (an
  edited checkout, an install where the build failed, another interpreter) numba compiles the
  same source for the same signatures, once per install (``channels.warmup``), into the per-user
  cache. Both builds are the same code; "aot" refuses the fallback, "jit" skips the build.
- Nothing here imports numba unless the JIT is used.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import subprocess
import threading
from typing import Any

from .. import _config
from . import aot, warmup

log = logging.getLogger(__name__)

_OPS: dict[str, Any] = {}
_KIND: list[str] = []
_LOCK = threading.Lock()


def _built() -> Any:
    """The ahead-of-time build if it is present and current, else None (with the reason logged)."""
    try:
        from . import _native_ops as module     # aot.MODULE, built by pip install
    except ImportError as exc:
        log.debug("no ahead-of-time build of the channel ops (%s): numba's JIT compiles them", exc)
        return None
    if module.source_key() != aot.source_key():
        log.warning("the ahead-of-time build of headrace's channel ops (%s) is older than their "
                    "source, which changed after install; numba's JIT compiles them instead "
                    "(reinstall headrace to rebuild)", module.__file__)
        return None
    return module


def _load() -> None:
    mode = _config.NATIVE
    built = None if mode == "jit" else _built()
    if built is None and mode == "aot":
        raise ImportError("HEADRACE_NATIVE=aot, but headrace's ahead-of-time build of the channel "
                          "ops is missing or out of date: reinstall headrace (pip install .) on "
                          "a machine with a C compiler, or unset HEADRACE_NATIVE")
    if built is not None:
        from .abi import SIGNATURES
        _OPS.update({name: getattr(built, name) for name in SIGNATURES})
        _KIND.append("aot")
        return
    from . import _jit
    with warmup.compile_lock():     # after an install, one process compiles; the rest load
        _OPS.update(_jit.entry_points())
    _KIND.append("jit")


def ops() -> dict[str, Any]:
    """The hot ops' entry points (loaded on the first call)."""
    if not _OPS:
        with _LOCK:
            if not _OPS:
                _load()
    return _OPS


def kind() -> str:
    """"aot" (the build made at install) or "jit" (numba's, cached per user)."""
    ops()
    return _KIND[0]


def ready() -> bool:
    """Whether the ops load without compiling (built at install, or numba's cache written)."""
    if _config.NATIVE != "jit" and _built() is not None:
        return True
    return warmup.is_ready()


def prepare() -> subprocess.Popen | None:
    """Start the JIT's one-off compile in a background process where no build is usable and
    numba's cache is not written yet; the caller reaps (or kills) the process it gets."""
    if ready():
        return None
    return warmup.start()


def load(h: Any, word: int) -> int:
    """Atomic load of header word ``word``."""
    return ops()["load"](h, word)


def store(h: Any, word: int, value: int) -> None:
    """Atomic store (sequentially consistent) of ``value`` into header word ``word``."""
    ops()["store"](h, word, value)


def add(h: Any, word: int, delta: int) -> int:
    """Atomic ``h[word] += delta`` (delta may be negative); returns the previous value."""
    return ops()["add"](h, word, delta)


def close(h: Any, code: int) -> None:
    """Mark a ring closed (1) or broken (2), the first code wins; wake everyone."""
    ops()["close"](h, code)


def has_waitv() -> bool:
    """Whether this kernel has ``futex_waitv`` (Linux 5.16+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall(ctypes.c_long(449), None, 0, 0, None, 0)     # SYS_futex_waitv (x86_64, arm64)
    return ctypes.get_errno() != errno.ENOSYS
