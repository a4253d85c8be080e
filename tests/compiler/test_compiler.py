"""Compiler passes: validate, fuse_chains, place, plan_channels, schedule, lower -> Plan.

Pure: nothing here spawns a process or opens a segment (the module's no_leaks check holds).
Plans are compared through ``as_text()``; results through the in-process interpreter.
"""

from __future__ import annotations

import pickle
import threading

import pytest

import headrace as hr
from headrace.compiler import DRIVER, StepKind, check_options, fuse_chains, lower
from headrace.dag import InputNode, MultiOutputNode, run_local, trace
from headrace.exceptions import DAGCompileError
from tests.compiler.fakes import FakeActor


@hr.remote
def prep(x):
    return x + 100


@hr.remote
def post(x):
    return x * 3


def _alive(key: str) -> bool:
    return key != "dead"


def test_fuse_chains_merges_two_methods_of_one_actor() -> None:
    a = FakeActor("a")
    with InputNode() as inp:
        ir = trace(a.inc.bind(a.double.bind(inp)))
    fused = fuse_chains(ir)
    assert fused.as_text() == "%0 = input\n%1 = a.[double, inc](%0)\nreturn %1"
    assert run_local(fused, 3) == run_local(ir, 3) == 7


def test_ops_follow_bind_order_and_fusion_keeps_it_per_actor() -> None:
    """a.fwd(0) -> a.bwd is a chain, but a.fwd(1) was bound between them: fusing would run
    the backward before the second forward, so it stays apart."""
    a = FakeActor("a")
    with InputNode() as inp:
        f0 = a.inc.bind(inp[0])
        f1 = a.inc.bind(inp[1])
        dag = MultiOutputNode([a.double.bind(f0), a.double.bind(f1)])
    ir = trace(dag)
    assert fuse_chains(ir).as_text() == ir.as_text() == (
        "%0 = input\n%1 = %0[0]\n%2 = a.inc(%1)\n%3 = %0[1]\n%4 = a.inc(%3)\n"
        "%5 = a.double(%2)\n%6 = a.double(%4)\nreturn (%5, %6)")
    assert run_local(fuse_chains(ir), 1, 2) == run_local(ir, 1, 2) == [4, 6]


def test_fuse_chains_merges_functions_and_stops_at_fan_out_outputs_and_other_actors() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        x = post.bind(prep.bind(inp))           # fused: one function process
        y = a.inc.bind(x)
        z = b.double.bind(y)                    # another actor: not fused
        w = a.double.bind(y)                    # y feeds two ops: not fused
        dag = MultiOutputNode([z, w, a.inc.bind(a.inc.bind(w))])
    ir = trace(dag)
    fused = fuse_chains(ir)
    assert fused.as_text() == ("%0 = input\n%1 = [prep, post](%0)\n%2 = a.inc(%1)\n"
                               "%3 = b.double(%2)\n%4 = a.double(%2)\n%5 = a.[inc, inc](%4)\n"
                               "return (%3, %4, %5)")
    assert run_local(fused, 1) == run_local(ir, 1) == [608, 608, 610]


def test_plan_of_a_three_process_dag() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        x = prep.bind(inp[0])
        y = a.add.bind(x, inp.k)
        dag = MultiOutputNode([x, b.double.bind(y), inp.k])
    plan = lower(trace(dag), {"max_inflight_executions": 4, "buffer_size_bytes": 4096})
    text = plan.as_text()
    sites = {line.split("@ ")[1] for line in text.splitlines() if "@ " in line}
    assert all(s.startswith(__file__) for s in sites)
    assert "\n".join(line.split("  @")[0] for line in text.splitlines()) == """\
plan: 6 ops, 3 processes, 5 channels (max_inflight_executions=4, sync=auto)
process fn:2 (prep)
  READ    ch0 input %1
  COMPUTE %1 = %0[0]
  COMPUTE %2 = prep(%1)
  WRITE   ch2 %2
process actor:a (a)
  READ    ch1 input %3
  COMPUTE %3 = %0.k
  READ    ch2 %2
  COMPUTE %4 = a.add(%2, %3)
  WRITE   ch3 %4
process actor:b (b)
  READ    ch3 %4
  COMPUTE %5 = b.double(%4)
  WRITE   ch4 %5
channels
  ch0 shm    input %1 driver -> fn:2  (4 KiB x 4)
  ch1 shm    input %3 driver -> actor:a  (4 KiB x 4)
  ch2 shm    %2     fn:2 -> actor:a, driver  (4 KiB x 4)
  ch3 shm    %4     actor:a -> actor:b  (4 KiB x 4)
  ch4 shm    %5     actor:b -> driver  (4 KiB x 4)
return (%2 <- ch2, %5 <- ch4, %3 (driver))"""
    again = pickle.loads(pickle.dumps(plan))
    assert again.as_text() == text and again.process_of("actor:a").actor == "a"
    assert plan.tasks[2].fn_blob is not None and plan.tasks[4].method == "add"


def test_the_values_of_a_call_with_num_returns_leave_its_process_separately() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        first, second = a.pair.options(num_returns=2).bind(inp, 7)
        _unused, used = b.pair.options(num_returns=2).bind(inp, second)
        dag = MultiOutputNode([b.inc.bind(used), first])
    ir = trace(dag, unused=True)
    assert run_local(ir, 1) == [8, 1]
    plan = lower(ir)
    assert "\n".join(line.split("  @")[0] for line in plan.as_text().splitlines()[1:]) == """\
process actor:a (a)
  READ    ch0 input
  COMPUTE %0 = input
  COMPUTE %1 = a.pair(%0, 7)  -> 2 values
  COMPUTE %2 = %1[0]
  WRITE   ch1 %2
  COMPUTE %3 = %1[1]
  WRITE   ch2 %3
process actor:b (b)
  READ    ch0 input
  COMPUTE %0 = input
  READ    ch2 %3
  COMPUTE %4 = b.pair(%0, %3)  -> 2 values
  COMPUTE %5 = %4[1]
  COMPUTE %6 = b.inc(%5)
  WRITE   ch3 %6
channels
  ch0 shm    input  driver -> actor:a, actor:b  (1 MiB x 10)
  ch1 shm    %2     actor:a -> driver  (1 MiB x 10)
  ch2 shm    %3     actor:a -> actor:b  (1 MiB x 10)
  ch3 shm    %6     actor:b -> driver  (1 MiB x 10)
return (%6 <- ch3, %2 <- ch1)"""


def test_a_process_with_no_channel_input_reads_the_input_as_its_trigger() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp), b.inc.bind(5)])
    plan = lower(trace(dag), {"channel": "socket"})
    (ch_a, parts_a), (ch_b, parts_b) = plan.input_splits    # they use different parts
    assert plan.input_channel == -1 and parts_a == (0,) and parts_b == ()
    assert plan.process_of("actor:b").reads() == (ch_b,)
    assert plan.channels[ch_a].readers == ("actor:a",) and \
        plan.channels[ch_b].readers == ("actor:b",)
    assert {c.kind.value for c in plan.channels} == {"socket"}


def test_a_call_on_constants_waits_for_its_execution_even_in_a_fed_process() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(5), a.inc.bind(b.double.bind(inp))])
    plan = lower(trace(dag))
    steps = plan.process_of("actor:a").steps
    channel = dict((plan.channels[c].readers[0], c) for c, _ in plan.input_splits)["actor:a"]
    assert steps[0].kind is StepKind.READ and steps[0].channel == channel
    assert run_local(trace(dag), 3) == [6, 7]


def test_input_parts_go_only_to_the_readers_that_use_them() -> None:
    """Ray's "multi-args": actor i binds inp[i]; each gets a channel with its part only. Readers
    that use the same parts share one channel; when all do, it carries the arguments as such."""
    actors = [FakeActor(f"a{i}") for i in range(3)]
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp[i]) for i, a in enumerate(actors)] +
                              [actors[0].double.bind(inp[1])])
    plan = lower(trace(dag))
    assert plan.input_channel == -1
    carried = {plan.channels[c].readers: parts for c, parts in plan.input_splits}
    names = {op.index: op.line() for op in plan.tasks}
    assert {r: tuple(names[i] for i in parts) for r, parts in carried.items()} == {
        ("actor:a0",): ("%1 = %0[0]", "%3 = %0[1]"), ("actor:a1",): ("%3 = %0[1]",),
        ("actor:a2",): ("%5 = %0[2]",)}
    with InputNode() as inp:
        same = MultiOutputNode([a.inc.bind(inp[0]) for a in actors])
    plan = lower(trace(same))
    assert plan.input_splits == () and \
        plan.channels[plan.input_channel].readers == ("actor:a0", "actor:a1", "actor:a2")


def test_every_process_computes_in_topological_order_and_reads_before_computing() -> None:
    actors = [FakeActor(f"a{i}") for i in range(4)]
    with InputNode() as inp:
        nodes = [inp]
        for i in range(40):
            args = [nodes[-1], nodes[len(nodes) // 2]]
            nodes.append(actors[i % 4].add.bind(*args))
        dag = MultiOutputNode(nodes[-3:])
    ir = trace(dag)
    plan = lower(ir)
    for proc in plan.processes:
        have = set()
        last = -1
        for step in proc.steps:
            if step.kind is StepKind.READ:
                have.add(step.op)
            elif step.kind is StepKind.COMPUTE:
                assert step.op > last
                last = step.op
                for dep in plan.tasks[step.op].deps:
                    assert dep in have or plan.tasks[dep].kind.value in ("input", "attr") or \
                        any(s.op == dep for s in proc.steps if s.kind is StepKind.COMPUTE)
                have.add(step.op)
            else:
                assert step.op in have
    outs = [c for c in plan.output_channels]
    assert all(DRIVER in plan.channels[c].readers for c in outs)


def test_two_input_nodes_are_refused_naming_both_sites() -> None:
    a = FakeActor("a")
    first, second = InputNode(), InputNode()
    with pytest.raises(DAGCompileError, match=r"uses 2 different InputNodes \(made at "
                                              r".*test_compiler.py:\d+, .*test_compiler.py"):
        lower(trace(a.add.bind(first, second)))


def test_a_dag_without_input_is_refused() -> None:
    a = FakeActor("a")
    with pytest.raises(DAGCompileError, match=r"has no InputNode.*\n\nBind the first node"):
        lower(trace(a.inc.bind(1)))


def test_a_call_no_output_depends_on_is_refused_naming_it() -> None:
    a, b = FakeActor("a"), FakeActor("b")
    with InputNode() as inp:
        kept = a.inc.bind(inp)
        lost = b.double.bind(kept)      # bound, never returned: its result would be lost
    with pytest.raises(DAGCompileError, match=r"node 'b.double' \(bound at .*test_compiler.py:"
                                              r"\d+\) is not an output and no output depends"):
        lower(trace(kept, unused=True))
    assert lost is not None
    assert trace(kept).as_text() == "%0 = input\n%1 = a.inc(%0)\nreturn %1"  # uncompiled: skipped
    assert lower(trace(kept)).outputs == (1,)


def test_a_dead_actor_is_refused_with_the_node_and_site() -> None:
    dead = FakeActor("dead")
    with InputNode() as inp:
        dag = dead.inc.bind(inp)
    with pytest.raises(DAGCompileError, match=r"node 'dead.inc' \(bound at .*test_compiler.py:"
                                              r"\d+\) calls an actor that is no longer alive"):
        lower(trace(dag), is_alive=_alive)


def test_an_unpicklable_constant_is_refused_with_where_and_how_to_fix() -> None:
    a = FakeActor("a")
    with InputNode() as inp:
        dag = a.add.bind(inp, y=threading.Lock())
    with pytest.raises(DAGCompileError, match=r"node 'a.add' \(bound at .*\): keyword argument "
                                              r"'y' is a lock that cannot be pickled"):
        lower(trace(dag))


@pytest.mark.parametrize("options, error, match", [
    ({"max_inflight": 3}, TypeError, r"unknown compile option\(s\) 'max_inflight'; valid"),
    ({"max_inflight_executions": 0}, ValueError, r"max_inflight_executions must be >= 1, got 0"),
    ({"max_inflight_executions": 2.5}, TypeError, r"must be int, got float: 2.5"),
    ({"sync": "fast"}, ValueError, r"sync must be one of \('auto', 'spin', 'block'\)"),
    ({"channel": "tcp"}, ValueError, r"channel must be one of"),
    ({"submit_timeout_s": -1}, ValueError, r"submit_timeout_s must be >= 0, got -1"),
    ({"max_buffered_results": True}, TypeError, r"must be int or None, got bool"),
    ({"buffer_size_bytes": 8}, ValueError, r"buffer_size_bytes must be >= 64, got 8"),
    ({"profile": 1}, TypeError, r"profile must be bool or str, got int: 1"),
    ({"profile": ""}, ValueError, r"profile must be True, False or a file path, got ''"),
])
def test_bad_options_are_refused(options, error, match) -> None:
    with pytest.raises(error, match=match):
        check_options(options)


def test_a_thousand_node_dag_lowers_to_a_plan() -> None:
    actors = [FakeActor(f"a{i}") for i in range(8)]
    with InputNode() as inp:
        node = inp
        for i in range(1000):
            node = actors[i % 8].inc.bind(node)
    ir = trace(node)
    plan = lower(ir)
    assert len(plan.processes) == 8 and len(plan.channels) == 1001
    assert run_local(fuse_chains(ir), 0) == run_local(ir, 0) == 1000


def test_channels_are_planned_by_host_shm_inside_one_and_sockets_between() -> None:
    a, b, c = FakeActor("a"), FakeActor("b"), FakeActor("c")
    with InputNode() as inp:
        dag = c.inc.bind(b.inc.bind(a.inc.bind(inp)))
    where = {"actor:a": "10.0.0.2", "actor:b": "10.0.0.2", "actor:c": "10.0.0.3"}
    plan = lower(trace(dag), host_of=lambda key: where.get(key, ""))
    kinds = {(c.writer, c.readers, c.host): c.kind.value for c in plan.channels}
    assert kinds == {(DRIVER, ("actor:a",), ""): "socket",
                     ("actor:a", ("actor:b",), "10.0.0.2"): "shm",
                     ("actor:b", ("actor:c",), "10.0.0.2"): "socket",
                     ("actor:c", (DRIVER,), "10.0.0.3"): "socket"}
    text = plan.as_text()
    assert "process actor:a (a) on host 10.0.0.2" in text and "from host 10.0.0.3" in text
    local = lower(trace(dag), host_of=lambda key: "")          # one host: as before
    assert {c.kind.value for c in local.channels} == {"shm"} and local.hosts == ()
    with pytest.raises(ValueError, match="channel='shm' cannot link driver .* to actor:a on another host"):
        lower(trace(dag), {"channel": "shm"}, host_of=lambda key: where.get(key, ""))
