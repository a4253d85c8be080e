"""Ray's early checks, found by running Ray's compiled-graph tests against headrace: wrong
execute() arguments, ambiguous input use, bind() signatures and nodes hidden in objects are
refused before anything runs; ref misuse is a ValueError (Ray's) and a TypeError; DAGContext and
get_id() exist."""

from __future__ import annotations

import asyncio
import copy
import pickle
import time
from collections.abc import Iterator

import pytest

import headrace as hr
from headrace.dag import DAGContext, InputNode, MultiOutputNode
from headrace.exceptions import (CompiledGetTimeoutError, DAGCompileError,
                                 RayChannelTimeoutError)

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Worker:
    def take(self, *args, **kwargs):
        return args, kwargs

    def one(self, x):
        return x

    def nap(self, delay_s):
        time.sleep(delay_s)
        return delay_s

    @staticmethod
    def helper(x):
        return x


@hr.remote
def plus(x, y=0, *, z):
    return x + y + z


class Box:
    def __init__(self, value):
        self.value = value


@pytest.fixture(scope="module")
def worker():
    return Worker.remote()


@pytest.fixture
def context() -> Iterator[DAGContext]:
    ctx = DAGContext.get_current()
    saved = dict(vars(ctx))
    yield ctx
    vars(ctx).update(saved)


def test_execute_refuses_arguments_the_input_does_not_read_and_submits_nothing(worker) -> None:
    with InputNode() as inp:
        dag = MultiOutputNode([worker.take.bind(inp[0]), worker.take.bind(inp[1])])
    with dag.experimental_compile() as compiled:
        for args in ((1,), (1, 2, 3)):
            with pytest.raises(ValueError, match=r"^dag.execute\(\) or dag.execute_async\(\) "
                                                 rf"must be called with 2 positional args, got "
                                                 rf"{len(args)}: the DAG's input \(bound at "):
                compiled.execute(*args)
        with pytest.raises(ValueError, match="must be called with 2 positional args, got 1"):
            asyncio.run(compiled.execute_async(1))
        assert compiled.stats()["executions"] == 0
        assert hr.get(compiled.execute(1, 2), timeout=30) == [((1,), {}), ((2,), {})]
    with InputNode() as inp:
        dag = worker.take.bind(inp.x, y=inp.y)
    with dag.experimental_compile() as compiled:
        with pytest.raises(ValueError, match=r"must be called with kwarg `y` \(the DAG reads "
                                             r"inp.y, bound at .*\); got \['x'\]"):
            compiled.execute(x=1)
        assert hr.get(compiled.execute(x=1, y=2), timeout=30) == ((1,), {"y": 2})
    with InputNode() as inp:
        dag = worker.one.bind(inp)
    with dag.experimental_compile() as compiled:
        with pytest.raises(ValueError, match="must be called with 1 positional args, got 2"):
            compiled.execute(1, 2)
        with pytest.raises(ValueError, match=r"got keyword arguments \['z'\], but the DAG "
                                             r"binds its InputNode"):
            compiled.execute(1, z=3)
        assert compiled.stats()["executions"] == 0


def test_the_whole_input_and_parts_of_it_in_one_dag_are_refused_at_compile(worker) -> None:
    with InputNode() as inp:
        dag = MultiOutputNode([worker.one.bind(inp), worker.take.bind(inp[1])])
    with pytest.raises(DAGCompileError, match=r"^the DAG uses its InputNode whole \(in "
                                              r"'Worker.one' \(bound at .*\)\) and parts of it "
                                              r"\(input\[1\], bound at ") as info:
        dag.experimental_compile()
    assert isinstance(info.value, ValueError)


def test_bind_checks_the_signature_of_methods_and_functions(worker) -> None:
    with InputNode() as inp:
        with pytest.raises(TypeError, match=r"^Worker.one.bind\(\) at .*: too many positional "
                                            r"arguments. The function 'Worker.one' has the "
                                            r"signature \(x\)"):
            worker.one.bind(inp, 2)
        with pytest.raises(TypeError, match=r"^plus.bind\(\) at .*: missing a required "
                                            r"argument: 'z'"):
            plus.bind(inp)
        with pytest.raises(TypeError, match=r"^Worker.one.bind\(\) .* missing a required"):
            Worker.bind().one.bind()
        assert worker.helper.bind(inp) is not None                 # a staticmethod: no self
        assert plus.bind(inp, z=inp) is not None


def test_a_node_hidden_inside_an_object_is_named_not_taken_for_a_missing_input(worker) -> None:
    with InputNode() as inp:
        dag = worker.one.bind(Box(inp))
    with pytest.raises(DAGCompileError, match=r"argument 0 is a Box holding the DAG node "
                                              r"'input' \(bound at .*\) inside it"):
        dag.experimental_compile()


def test_misused_refs_raise_errors_that_are_value_errors_as_in_ray(worker) -> None:
    with InputNode() as inp:
        dag = worker.one.bind(inp)
    with dag.experimental_compile() as compiled:
        ref = compiled.execute(5)
        with pytest.raises(ValueError, match=r"element 1 is NoneType") as info:
            hr.get([ref, None])
        assert isinstance(info.value, TypeError)
        with pytest.raises(ValueError, match="cannot be pickled on its own"):
            pickle.dumps(ref)
        assert copy.copy(ref) is ref and copy.deepcopy([ref])[0] is ref
        assert hr.get(ref, timeout=30) == 5


def test_dag_context_sets_the_compile_defaults_and_get_timeout(worker, context) -> None:
    context.max_inflight_executions = 3
    context.submit_timeout = 2.5
    context.buffer_size_bytes = 4096
    with InputNode() as inp:
        dag = worker.nap.bind(inp)
    with dag.experimental_compile(_max_buffered_results=7) as compiled:
        opts = compiled.plan.options
        assert (opts.max_inflight_executions, opts.submit_timeout_s, opts.buffer_size_bytes,
                opts.max_buffered_results) == (3, 2.5, 4096, 7)
        assert compiled.get_timeout_s is None
        assert len(compiled.get_id()) == 32 and int(compiled.get_id(), 16) >= 0
    context.get_timeout = 0.2
    with dag.experimental_compile() as compiled:
        ref = compiled.execute(1.0)
        start = time.monotonic()
        with pytest.raises(RayChannelTimeoutError, match="after 0.2 s") as info:
            hr.get(ref)                             # timeout=None: DAGContext.get_timeout
        assert isinstance(info.value, CompiledGetTimeoutError)
        assert time.monotonic() - start < 0.9
        assert hr.get(ref, timeout=30) == 1.0       # an explicit timeout wins
    context.overlap_gpu_communication = True
    with pytest.raises(ValueError, match="overlap_gpu_communication is True, which needs GPUs"):
        dag.experimental_compile()


def test_two_compiled_dags_have_different_ids(worker) -> None:
    with InputNode() as inp:
        dag = worker.one.bind(inp)
    with dag.experimental_compile() as first, dag.experimental_compile() as second:
        assert first.get_id() != second.get_id()
        assert hr.get([first.execute(1), second.execute(2)], timeout=30) == [1, 2]
