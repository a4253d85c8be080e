"""num_returns on bind (Ray's spelling): one node per return value, each usable on its own."""

from __future__ import annotations

import pytest

import headrace as hr
from headrace.dag import InputNode, MultiOutputNode
from headrace.exceptions import TaskError

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Worker:
    def __init__(self, k=0):
        self.k = k

    def split(self, x):
        if x == 3:
            raise ValueError("three")
        return x + self.k, -x

    @hr.method(num_returns=2)
    def halves(self, x):
        return x // 2, x - x // 2

    def inc(self, x):
        return x + 1

    def scalar(self, x):
        return x


@hr.remote
def pair(x):
    return x, x * 10


def _dag(a, b, c):
    with InputNode() as inp:
        plus, _minus = a.split.options(num_returns=2).bind(inp)    # _minus is never used
        low, high = b.halves.bind(plus)                             # declared by @hr.method
        ten = pair.options(num_returns=2).bind(inp)[1]
        return MultiOutputNode([c.inc.bind(low), high, plus, ten])


def test_each_value_is_its_own_node_compiled_and_uncompiled_alike() -> None:
    a, b, c = Worker.remote(100), Worker.remote(), Worker.remote()
    dag = _dag(a, b, c)
    expected = [[53, 52, 104, 40], [53, 53, 105, 50]]
    assert [hr.get(dag.execute(x)) for x in (4, 5)] == expected
    with dag.experimental_compile() as compiled:
        assert [hr.get(compiled.execute(x)) for x in (4, 5)] == expected
        text = compiled.ir.as_text()
        assert "Worker.split(%0)  -> 2 values" in text and "Worker.halves(%2)  -> 2 values" \
            in text


def test_an_error_of_the_call_is_the_value_of_every_one_of_its_nodes() -> None:
    a, b, c = Worker.remote(100), Worker.remote(), Worker.remote()
    dag = _dag(a, b, c)
    with dag.experimental_compile() as compiled:
        refs = compiled.execute(3)
        for ref in refs[:3]:
            with pytest.raises(TaskError, match=r"^Worker.split \(bound at .*\) raised "
                                                r"ValueError: three"):
                hr.get(ref, timeout=30)
        assert hr.get(refs[3], timeout=30) == 30                   # pair() did not fail
        assert hr.get(compiled.execute(6), timeout=30) == [54, 53, 106, 60]
    refs = dag.execute(3)                                          # uncompiled: the same
    for ref in refs[:3]:
        with pytest.raises(ValueError, match="three"):
            hr.get(ref, timeout=30)


def test_a_call_that_returns_the_wrong_count_fails_each_of_its_nodes_clearly() -> None:
    a = Worker.remote()
    with InputNode() as inp:
        dag = MultiOutputNode(list(a.scalar.options(num_returns=2).bind(inp)))
    with dag.experimental_compile() as compiled:
        for ref in compiled.execute(7):
            with pytest.raises(TaskError, match=r"Worker.scalar was declared with "
                                                r"num_returns=2 but returned a int, which is "
                                                r"not iterable"):
                hr.get(ref, timeout=30)


def test_class_node_methods_keep_their_declared_num_returns() -> None:
    node = Worker.bind(1)
    with InputNode() as inp:
        low, high = node.halves.bind(inp)
        plus, _ = node.split.options(num_returns=2).bind(inp)
        dag = MultiOutputNode([high, low, plus])
    assert hr.get(dag.execute(9)) == [5, 4, 10]
    with dag.experimental_compile() as compiled:
        assert hr.get(compiled.execute(9), timeout=30) == [5, 4, 10]
