"""``DAGContext``: Ray's process-wide defaults of compiled DAGs (``ray.dag.DAGContext``).

In: ``DAGContext.get_current().<field> = value`` in user code. Out: the defaults that
``experimental_compile()`` uses for options not given, read at each compile.
Invariants: one context per process (made on first use, under a lock); fields keep Ray's names;
a field that has no meaning here is accepted and documented as such, never silently used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_LOCK = threading.Lock()
_CURRENT: DAGContext | None = None


@dataclass
class DAGContext:
    """Defaults for ``experimental_compile()`` (set ``DAGContext.get_current().x = ...``).

    Attributes:
        submit_timeout: seconds ``execute()`` may wait without progress (``submit_timeout_s``).
        get_timeout: seconds a ``get`` of this DAG's refs waits when given ``timeout=None``;
            None (our default; Ray's is 10) waits without a deadline.
        buffer_size_bytes: bytes of a channel's slot before a value spills.
        max_inflight_executions: executions in flight before ``execute()`` waits.
        max_buffered_results: un-read results allowed before ``execute()`` raises
            ``PipelineFullError`` (None: no limit).
        overlap_gpu_communication: must stay False (no GPU transport here).
        teardown_timeout, read_iteration_timeout: accepted for Ray programs; unused, as our
            teardown returns in milliseconds and our loops never poll.
    """

    submit_timeout: float | None = 10.0
    get_timeout: float | None = None
    teardown_timeout: float = 30.0
    read_iteration_timeout: float = 0.1
    buffer_size_bytes: int = 1 << 20
    max_inflight_executions: int = 10
    max_buffered_results: int | None = None
    overlap_gpu_communication: bool = False

    @staticmethod
    def get_current() -> DAGContext:
        """This process's context (made on first use)."""
        global _CURRENT
        with _LOCK:
            if _CURRENT is None:
                _CURRENT = DAGContext()
            return _CURRENT
