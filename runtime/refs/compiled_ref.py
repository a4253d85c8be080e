"""CompiledDAGRef: one output of one execution of a compiled DAG, with the full ref contract.

In: a ``CompiledDAG`` (which reads the output channels) and an execution number.
Out: a ``Ref`` whose waits read the DAG's outputs on the waiting thread; ``done()``, callbacks,
futures and ``await`` work without anyone in ``get`` (a background reader starts when needed).
Invariants (DESIGN 2.1): read any number of times, from any thread; a timed-out wait leaves it
pending and a retry works; executions are read in order and values of other executions are
kept on their refs (or dropped if their refs are gone); the value goes with the ref.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .ref import Ref, RefState, new_ref_id


class CompiledDAGRef(Ref):
    """A handle to output ``index`` of execution ``execution`` of a compiled DAG."""

    __slots__ = ("_dag", "_execution", "_index", "_read")
    _compiled = True

    def __init__(self, dag: Any, execution: int, index: int, name: str) -> None:
        super().__init__(new_ref_id(), name)
        self._dag = dag
        self._execution = execution
        self._index = index
        self._read = False          # the caller has looked at the value (max_buffered_results)

    @property
    def execution(self) -> int:
        """The execution this ref belongs to (0, 1, ... per compiled DAG)."""
        return self._execution

    def _producer(self) -> Any:
        return self._dag            # the waiting thread reads the DAG's outputs itself

    def _outcome(self) -> Any:
        self._read = True
        return super()._outcome()

    def done(self) -> bool:
        if self._state is RefState.PENDING:
            self._dag.poll()            # outputs already written are read without waiting
        return self._state is not RefState.PENDING

    def add_done_callback(self, fn: Callable[[Ref], Any]) -> None:
        super().add_done_callback(fn)
        if self._state is RefState.PENDING:
            self._dag.watch(self)       # nobody may be waiting: read in the background

    def _release_producer(self) -> None:
        pass        # NOTE: keep _dag: a final ref still names its DAG in repr and stats

    def __repr__(self) -> str:
        return (f"<CompiledDAGRef: status: {self._state.value}, key: {self.key}, "
                f"execution: {self._execution}>")


class CompiledDAGFuture:
    """What ``await compiled.execute_async(...)`` gives, one per output: await it for the value."""

    __slots__ = ("_ref",)

    def __init__(self, ref: CompiledDAGRef) -> None:
        self._ref = ref

    @property
    def refs(self) -> CompiledDAGRef:
        """The output's ``CompiledDAGRef``."""
        return self._ref

    def __await__(self) -> Any:
        return self._ref.__await__()

    def __repr__(self) -> str:
        return f"<CompiledDAGFuture {self._ref!r}>"
