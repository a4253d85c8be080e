"""The one walker (dag/walk.py) over every container kind, and every user of it agreeing:
bind's node search, templates and their filling, compiled and uncompiled runs, gather."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple

import pytest

import headrace as hr
from headrace.dag import InputNode, MultiOutputNode
from headrace.dag.walk import DROP, has_leaf, leaves, map_leaves

Pair = namedtuple("Pair", "left right")


class Tagged(list):
    pass


def _is_int(x):
    return type(x) is int


def _every_kind(x, y):
    return [x, (x, y), Pair(x, y), {"k": x}, OrderedDict(k=y), {x}, frozenset({y}),
            Tagged([x]), [[{"deep": (x,)}]]]


def test_every_container_kind_is_walked_and_rebuilt_with_its_type() -> None:
    value = _every_kind(1, 2)
    assert list(leaves(value, _is_int)) == [1, 1, 2, 1, 2, 1, 2, 1, 2, 1, 1]
    doubled = map_leaves(value, lambda v: v * 10, _is_int)
    assert doubled == _every_kind(10, 20)
    assert [type(x) for x in doubled] == [type(x) for x in value]
    counts = defaultdict(int, a=1)
    again = map_leaves(counts, lambda v: v + 1, _is_int)
    assert again == {"a": 2} and again.default_factory is int
    assert map_leaves([1, "a", 2], lambda v: DROP if v == 1 else v, _is_int) == ["a", 2]
    assert has_leaf({"x": [("a", 3)]}, _is_int) and not has_leaf({"x": ["a"]}, _is_int)


def test_a_rebuilt_container_is_new_so_a_callee_cannot_change_the_template() -> None:
    template = [[1], {"a": [2]}]
    out = map_leaves(template, lambda v: v, _is_int)
    out[0].append(99)
    out[1]["a"].append(99)
    assert template == [[1], {"a": [2]}]


@hr.remote
class Echo:
    def echo(self, value):
        return value


@hr.remote
def describe(value):
    return value


@pytest.mark.usefixtures("runtime")
def test_nodes_in_every_container_kind_reach_the_call_compiled_and_not() -> None:
    echo = Echo.remote().echo
    with InputNode() as inp:
        x = describe.bind(inp[0])               # a function node and an actor's
        y = echo.bind(inp[1])
        dag = MultiOutputNode([echo.bind(part) for part in _every_kind(x, y)])
    expected = _every_kind(1, 2)
    assert hr.get(dag.execute(1, 2), timeout=30) == expected
    with dag.experimental_compile() as compiled:
        got = hr.get(compiled.execute(1, 2), timeout=30)
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]


@pytest.mark.usefixtures("runtime")
def test_gather_finds_refs_in_every_container_kind() -> None:
    a, b = hr.put(1), hr.put(2)
    assert hr.gather(_every_kind(a, b), timeout=30) == _every_kind(1, 2)
