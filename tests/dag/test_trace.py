"""bind(), InputNode, MultiOutputNode and trace(): nodes become a frozen, printable DagIR."""

from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import pytest

import headrace as hr
from headrace.dag import DAGNode, InputNode, MultiOutputNode, OpKind, run_local, trace
from headrace.exceptions import DAGCompileError
from tests.compiler.fakes import FakeActor


@hr.remote
def add(x, y=0):
    return x + y


@hr.remote
def pair(x):
    return x, -x


def _line() -> int:
    return sys._getframe(1).f_lineno


def test_chain_traces_in_topological_order_with_bind_sites() -> None:
    a = FakeActor("a")
    with InputNode() as inp:
        line = _line() + 1
        dag = a.inc.bind(add.bind(inp, 10))
    ir = trace(dag)
    assert ir.as_text() == "%0 = input\n%1 = add(%0, 10)\n%2 = a.inc(%1)\nreturn %2"
    assert [op.kind for op in ir.ops] == [OpKind.INPUT, OpKind.FUNCTION, OpKind.METHOD]
    assert ir.ops[1].site == f"{__file__}:{line}" == ir.ops[2].site
    assert run_local(ir, 5) == 16


def test_nodes_nested_in_lists_and_dicts_and_as_kwargs() -> None:
    a = FakeActor("a")
    with InputNode() as inp:
        x = add.bind(inp[0], y=inp.k)
        dag = a.add.bind([x, 1], y={"v": inp[1], "c": (x,)})
    ir = trace(dag)
    assert ir.as_text() == ("%0 = input\n%1 = %0[0]\n%2 = %0.k\n%3 = add(%1, y=%2)\n"
                            "%4 = %0[1]\n%5 = a.add([%3, 1], y={'v': %4, 'c': (%3,)})\nreturn %5")
    assert ir.ops[5].deps == (3, 4)
    got = run_local(ir, 1, 2, k=3, call=lambda op: (lambda *a, **k: (a, k)) if op.method
                    else op.target.fn)
    assert got == (([4, 1],), {"y": {"v": 2, "c": (4,)}})


def test_one_node_used_twice_is_one_op_and_inp_key_twice_is_one_value() -> None:
    with InputNode() as inp:
        x = add.bind(inp.k)
        dag = MultiOutputNode([add.bind(x, x), x, inp.k, inp.k])
    ir = trace(dag)
    assert ir.as_text() == ("%0 = input\n%1 = %0.k\n%2 = add(%1)\n%3 = add(%2, %2)\n"
                            "return (%3, %2, %1, %1)")
    assert run_local(ir, k=2) == [4, 2, 2, 2]


def test_input_parts_named_like_node_attributes_are_parts_of_the_input() -> None:
    names = ["name", "args", "kwargs", "site", "uid", "key", "access", "upstream"]
    with InputNode() as inp:
        dag = MultiOutputNode([getattr(inp, n) for n in names] + [inp.cfg.key, inp.cfg.access])
    ir = trace(dag)
    values = {n: f"<{n}>" for n in names}
    assert run_local(ir, **values, cfg=SimpleNamespace(key=1, access=2)) == \
        [f"<{n}>" for n in names] + [1, 2]


def test_input_forms() -> None:
    with InputNode() as inp:
        dag = MultiOutputNode([inp.cfg.scale, inp["n"], inp.items[1]])
    ir = trace(dag)
    arg = SimpleNamespace(cfg=SimpleNamespace(scale=3), items=[7, 8])
    assert run_local(ir, arg, n=5) == [3, 5, 8]
    obj = {"n": 1, "cfg": None}
    with InputNode() as inp:
        ir2 = trace(MultiOutputNode([inp["n"], inp]))
    assert run_local(ir2, obj) == [1, obj]


def test_input_errors_name_the_node_and_the_arguments() -> None:
    with InputNode() as inp:
        ir = trace(add.bind(inp))
    with pytest.raises(TypeError, match=r"takes exactly one positional argument, but it got 2 "
                                        r"positional and 0 keyword"):
        run_local(ir, 1, 2)
    with InputNode() as inp:
        ir = trace(add.bind(inp[2]))
    with pytest.raises(TypeError, match=r"reads positional argument 2 \(inp\[2\], bound at "
                                        r".*test_trace.py:\d+\), but execute\(\) got 1"):
        run_local(ir, 1)
    with InputNode() as inp:
        ir = trace(add.bind(inp.key))
    with pytest.raises(TypeError, match=r"keyword argument 'key' .* got \['other'\]"):
        run_local(ir, 1, 2, other=3)
    with pytest.raises(TypeError, match="indexed by an int .* or a str"):
        InputNode()[1.5]


def test_multi_output_and_num_returns_errors() -> None:
    with pytest.raises(DAGCompileError, match=r"MultiOutputNode \(at .*\) takes a non-empty"):
        MultiOutputNode([])
    with pytest.raises(DAGCompileError, match="output 1 is int, not a node"):
        MultiOutputNode([InputNode(), 3])
    with pytest.raises(ValueError, match="num_returns must be an int >= 1, got 0"):
        add.options(num_returns=0).bind(1)
    with pytest.raises(DAGCompileError, match=r"a.inc \(bound at .*\) has num_returns=0; it "):
        FakeActor("a").inc.options(num_returns=0).bind(1)


def test_num_returns_gives_one_node_per_value_and_checks_the_count() -> None:
    with InputNode() as inp:
        first, second = pair.options(num_returns=2).bind(inp)
        ir = trace(MultiOutputNode([second, add.bind(first, 1)]))
    assert [op.kind for op in ir.ops] == [OpKind.INPUT, OpKind.FUNCTION, OpKind.ITEM,
                                          OpKind.ITEM, OpKind.FUNCTION]
    assert ir.as_text().splitlines()[1:4] == ["%1 = pair(%0)  -> 2 values", "%2 = %1[0]",
                                              "%3 = %1[1]"]
    assert repr(second).startswith("<ItemNode pair[1] bound at ")
    assert run_local(ir, 4) == [-4, 5]
    with InputNode() as inp:
        x, _y, z = pair.options(num_returns=3).bind(inp)
        ir = trace(MultiOutputNode([x, z]))
    with pytest.raises(ValueError, match="^pair was declared with num_returns=3 but returned "
                                         "2 values$"):
        run_local(ir, 4)


def test_nodes_do_not_pickle_and_say_why() -> None:
    with InputNode() as inp:
        node = add.bind(inp)
    with pytest.raises(TypeError, match=r"DAG node 'add' \(bound at .*\) cannot be pickled"):
        pickle.dumps(node)
    assert isinstance(node, DAGNode) and "add" in repr(node)


def test_deep_chain_traces_without_recursion() -> None:
    a = FakeActor("a")
    with InputNode() as inp:
        node = inp
        for _ in range(5000):
            node = a.inc.bind(node)
    ir = trace(node)
    assert len(ir.ops) == 5001 and run_local(ir, 0) == 5000


def test_trace_rejects_what_is_not_a_node() -> None:
    with pytest.raises(TypeError, match="expects a DAG node, got int"):
        trace(3)
