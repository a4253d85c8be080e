"""Each actor runs its methods in the order they were bound (Ray's rule), compiled or not.

Bind order is one global topological order (a node's arguments are bound before it), so running
every process's ops in it keeps the no-deadlock argument of compiler/scheduling.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headrace as hr
from headrace.dag import InputNode, MultiOutputNode
from headrace.dag.ir import trace

pytestmark = [pytest.mark.usefixtures("runtime"), pytest.mark.deadline_s(120)]


@hr.remote
class Stateful:
    """Every call is logged and changes the state, so results depend on the order of calls."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.state = 0

    def _call(self, name: str, x: int) -> int:
        self.log.append(name)
        self.state = self.state * 3 + x + 1
        return self.state

    def inc(self, x: int) -> int:
        return self._call("inc", x)

    def f(self, x: int) -> int:
        return self._call("f", x)

    def double_and_inc(self, x: int) -> int:
        return self._call("double_and_inc", 2 * x)

    def fwd(self, x: int, mb: int) -> int:
        return self._call(f"F{mb}", x)

    def bwd(self, x: int, mb: int) -> int:
        return self._call(f"B{mb}", x)

    def take_log(self) -> list[str]:
        log, self.log, self.state = self.log, [], 0
        return log


@pytest.fixture(scope="module")
def actors() -> Iterator[list[Any]]:
    yield [Stateful.remote(), Stateful.remote()]


def _logs(actors: list[Any]) -> list[list[str]]:
    return hr.get([a.take_log.remote() for a in actors], timeout=30)


def _both_ways(dag: Any, actors: list[Any], *args: Any) -> tuple[Any, list[list[str]]]:
    """The compiled run's (results, per-actor logs), checked against the uncompiled run's."""
    _logs(actors)
    expected = hr.get(dag.execute(*args), timeout=30)
    expected_logs = _logs(actors)
    with dag.experimental_compile() as compiled:
        got = hr.get(compiled.execute(*args), timeout=30)
    logs = _logs(actors)
    assert (got, logs) == (expected, expected_logs)
    return got, logs


def test_an_actor_runs_its_methods_in_bind_order_not_output_order(actors) -> None:
    a1, a2 = actors
    with InputNode() as inp:
        b1 = a2.f.bind(a1.inc.bind(inp))
        b2 = a1.double_and_inc.bind(a2.inc.bind(inp))
        dag = MultiOutputNode([b2, b1])
    ops = [op.name for op in trace(dag).ops]
    assert ops == ["input", "Stateful.inc", "Stateful.f", "Stateful.inc",
                   "Stateful.double_and_inc"]
    _, logs = _both_ways(dag, actors, 1)
    assert logs == [["inc", "double_and_inc"], ["f", "inc"]]


def test_pipeline_parallel_forwards_then_backwards_in_bind_order(actors) -> None:
    """Two stages, two microbatches: F0 F1 on both, then B0 B1 back (a 1F1B-free schedule)."""
    a1, a2 = actors
    with InputNode() as inp:
        f1 = [a1.fwd.bind(inp[mb], mb) for mb in (0, 1)]
        f2 = [a2.fwd.bind(f1[mb], mb) for mb in (0, 1)]
        b2 = [a2.bwd.bind(f2[mb], mb) for mb in (0, 1)]
        b1 = [a1.bwd.bind(b2[mb], mb) for mb in (0, 1)]
        dag = MultiOutputNode(b1)
    _, logs = _both_ways(dag, actors, 3, 5)
    assert logs == [["F0", "F1", "B0", "B1"], ["F0", "F1", "B0", "B1"]]


_BIND = st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["inc", "f", "double_and_inc"]),
                           st.lists(st.integers(0, 100), max_size=2)),
                 min_size=1, max_size=7)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(binds=_BIND, x=st.integers(0, 10))
def test_random_binds_give_the_uncompiled_results_and_call_order(actors, binds, x) -> None:
    """Each bind takes the input or an earlier node (picked by index); every node is an output,
    listed in reverse (so the order outputs are reached in is not the bind order).
    Each actor's calls come in bind order, compiled and uncompiled alike."""
    with InputNode() as inp:
        nodes: list[Any] = [inp]
        for actor, method, picks in binds:
            arg = nodes[picks[0] % len(nodes)] if picks else inp
            nodes.append(getattr(actors[actor], method).bind(arg))
        dag = MultiOutputNode(nodes[:0:-1])        # outputs last-bound first
    _, logs = _both_ways(dag, actors, x)
    assert logs == [[m for a, m, _ in binds if a == k] for k in (0, 1)]     # bind order
