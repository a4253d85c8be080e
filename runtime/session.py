"""The session: the one process-wide runtime, started by ``init()`` (or the first API call) and
ended by ``shutdown()``.

In: ``init(...)`` arguments. Out: ``current()`` (the runtime, started if need be) for the API
modules (``api``, ``remote``, ``compiled``), ``is_initialized()``, ``shutdown()``.
Invariants: at most one runtime per process, made and dropped under one lock; ``shutdown`` runs
at interpreter exit too. Nothing here imports the API modules, so they import it one way.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from .procs import client

_LOCK = threading.RLock()
_RUNTIME: Any = None
_ATEXIT = False


def init(num_cpus: int | None = None, *, address: Any = None,
         log_to_driver: bool = True, logging_level: int = logging.INFO,
         ignore_reinit_error: bool = False) -> dict[str, Any]:
    """Start the embedded local runtime: ``num_cpus`` pooled task workers (default: all cores).

    Args:
        num_cpus: Task worker processes and CPU slots; default ``os.cpu_count()``.
        address: None (or ``"local"``): the embedded runtime on this host. A Dask scheduler
            address (``"tcp://scheduler:8786"``) or a ``distributed.Client``: actors run on
            that cluster's workers as well (needs ``pip install 'headrace[dask]'``).
        log_to_driver: Copy workers' and actors' output to this process's stderr.
        logging_level: Root logging level inside workers and actors.
        ignore_reinit_error: Return quietly if already initialised (Ray's flag).

    Returns:
        A dict describing the runtime (``num_cpus``, ``session_dir``, ``driver_pid``).

    Raises:
        RuntimeError: already initialised and ``ignore_reinit_error`` is False.
    """
    global _RUNTIME, _ATEXIT
    if client.CLIENT is not None:       # inside a worker: the driver's session is ours
        if ignore_reinit_error:
            return _describe(client.CLIENT)
        raise RuntimeError("headrace is already initialised in this worker (it uses the "
                           "driver's session); call hr.init() on the driver only, or pass "
                           "ignore_reinit_error=True")
    if address in ("local", "auto"):
        address = None
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int)
                                 or num_cpus < 1):
        raise ValueError(f"num_cpus must be an int >= 1, got {num_cpus!r}")
    with _LOCK:
        if _RUNTIME is not None:
            if ignore_reinit_error:
                return _describe(_RUNTIME)
            raise RuntimeError("headrace is already initialised; call hr.shutdown() first, or "
                               "pass ignore_reinit_error=True")
        from .procs.core import Runtime
        _RUNTIME = Runtime(num_cpus or os.cpu_count() or 1, log_to_driver=log_to_driver,
                           logging_level=logging_level, address=address)
        if not _ATEXIT:
            atexit.register(shutdown)
            _ATEXIT = True
        return _describe(_RUNTIME)


def _describe(rt: Any) -> dict[str, Any]:
    return {"num_cpus": rt.num_cpus, "session_dir": rt.dir, "driver_pid": rt.driver_pid}


def shutdown() -> None:
    """Stop every child process and unlink every shared-memory segment. Idempotent. (Inside
    a worker it does nothing: the driver's session goes on.)"""
    global _RUNTIME
    with _LOCK:
        rt, _RUNTIME = _RUNTIME, None
    if rt is not None:
        rt.shutdown()


def is_initialized() -> bool:
    return _RUNTIME is not None or client.CLIENT is not None


def current() -> Any:
    """The runtime, started with the defaults if no ``init()`` came first; inside a worker,
    the client that asks the driver's runtime."""
    rt = _RUNTIME
    if rt is None:
        if client.CLIENT is not None:
            return client.CLIENT
        init(ignore_reinit_error=True)
        rt = _RUNTIME
    return rt


def running() -> Any:
    """The runtime if one runs, else None (never starts one; None inside a worker)."""
    return _RUNTIME
