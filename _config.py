"""Constants and environment switches read once, at import. A leaf module: any layer may use it."""

from __future__ import annotations

import os

#: Prefix of every POSIX shared-memory segment name: ``headrace-<owner pid>-<id>``.
SHM_PREFIX = "headrace"

#: Values whose out-of-band buffers total at least this many bytes travel in shared memory;
#: smaller ones ride inline in control messages.
INLINE_MAX_BYTES = 64 * 1024

#: Extra checks (``verify()`` after compiler passes and similar); tests set it.
CHECKS = os.environ.get("HEADRACE_CHECKS", "") not in ("", "0")

#: Verbose internal logging; read once here, never on a hot path.
DEBUG = os.environ.get("HEADRACE_DEBUG", "") not in ("", "0")

#: An actor's (or a task worker's) calls and results move to a pair of shared-memory rings as
#: soon as the process is up and has attached them (zmq carries the calls until then and the
#: rest of the control messages always). "0": never.
ACTOR_LANES = os.environ.get("HEADRACE_ACTOR_LANES", "1") != "0"
#: Workers call actors over shm rings of their own (runtime/procs/links.py) when a call's
#: arguments carry no refs or handles; "0": every call from a worker goes through the driver.
DIRECT_CALLS = os.environ.get("HEADRACE_DIRECT_CALLS", "1") != "0"
#: Spare actor processes kept started, their lane attached, from the first actor on: a new actor
#: takes one, so it skips the process start and uses the rings from its first call. 0: none.
SPARE_ACTORS = int(os.environ.get("HEADRACE_SPARE_ACTORS", "1"))
#: Local workers are forked from a zygote that has made their imports (runtime/procs/zygote.py):
#: a worker is up in milliseconds, not ~0.3 s. "0": each starts a fresh interpreter.
ZYGOTE = os.environ.get("HEADRACE_ZYGOTE", "1") != "0"

#: How long shutdown() waits for children to exit on their own before SIGKILL.
SHUTDOWN_GRACE_S = 0.3
#: A timeout this long or longer (inf included) means "no deadline": about 31 years, far below
#: what threading, futex timespecs and int64 nanoseconds overflow at.
FOREVER_S = 1e9

#: Which build of the channels' hot ops to load (channels.native): "auto" (the one compiled at
#: install when it is current, else numba's JIT), "aot" (that build or an error), "jit".
NATIVE = os.environ.get("HEADRACE_NATIVE", "auto")
if NATIVE not in ("auto", "aot", "jit"):
    raise ValueError(f"HEADRACE_NATIVE must be auto, aot or jit, not {NATIVE!r}")

#: Spin window (µs) of compiled-DAG channels with sync="auto": a waiter spins (yielding its core
#: now and then) this long before it sleeps in the kernel. Long enough to cover the hops of a
#: pipeline in a back-to-back loop; an idle pipeline still sleeps after it, burning nothing.
DAG_SPIN_US = float(os.environ.get("HEADRACE_DAG_SPIN_US", "1000"))

#: How often a blocked end of a channel the runtime opened (compiled DAGs, actor lanes) checks its
#: peers' processes itself. The runtime watches every process and breaks their channels at once
#: on a death, so this is only a backstop; each wake of an idle thread costs ~0.2 ms of CPU.
WATCHED_CHECK_S = 5.0


def cache_dir() -> str:
    """The per-user cache directory (numba's compiled ops, the compile lock):
    ``HEADRACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/headrace``, else ``~/.cache/headrace``; never
    inside the package."""
    explicit = os.environ.get("HEADRACE_CACHE_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "headrace")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:                 # no writable home (a service account): a private temp dir
        import stat
        import tempfile
        path = os.path.join(tempfile.gettempdir(), f"headrace-cache-{os.getuid()}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)       # numba loads pickles from it: it must be ours alone
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or \
                info.st_mode & 0o077:
            path = tempfile.mkdtemp(prefix="headrace-cache-")
    return path
