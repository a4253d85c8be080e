"""Ray's spelling works: compile options, import paths, exception names, graph errors."""

from __future__ import annotations

import linecache
import os
import time
import uuid
from typing import Any

import pytest

import headrace as hr
from headrace.compiler import check_options
from headrace.dag import InputNode, MultiOutputNode

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Echo:
    def echo(self, x):
        return x

    def nap(self, delay_s):
        time.sleep(delay_s)


def test_ray_option_names_mean_ours() -> None:
    opts = check_options({"_max_inflight_executions": 3, "_submit_timeout": 7.5,
                          "_buffer_size_bytes": 4096, "_max_buffered_results": 9,
                          "enable_asyncio": True})
    assert (opts.max_inflight_executions, opts.submit_timeout_s, opts.buffer_size_bytes,
            opts.max_buffered_results) == (3, 7.5, 4096, 9)
    assert check_options({"_max_inflight_executions": 3, "max_inflight_executions": 3}) \
        .max_inflight_executions == 3
    with pytest.raises(TypeError, match=r"^compile options _max_inflight_executions=3 and "
                                        r"max_inflight_executions=4 disagree"):
        check_options({"_max_inflight_executions": 3, "max_inflight_executions": 4})
    with pytest.raises(TypeError, match="enable_asyncio must be a bool"):
        check_options({"enable_asyncio": "yes"})


@pytest.mark.parametrize("option, value", [("_overlap_gpu_communication", True),
                                           ("_default_communicator", object())])
def test_ray_gpu_options_that_need_a_gpu_are_refused(option, value) -> None:
    with pytest.raises(ValueError, match=rf"^compile option\(s\) {option}=.* need GPUs"):
        check_options({option: value})
    assert check_options({option: False if option.startswith("_overlap") else "create"})


def test_a_dag_compiled_with_ray_options_runs() -> None:
    a = Echo.remote()
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile(_max_inflight_executions=2, _submit_timeout=5,
                                  enable_asyncio=False) as compiled:
        assert compiled.plan.options.max_inflight_executions == 2
        assert hr.get([compiled.execute(i) for i in range(5)], timeout=30) == list(range(5))
    with pytest.raises(hr.ChannelClosedError, match=r"^Channel closed\. The compiled DAG was "
                                                    r"torn down; compile the DAG again"):
        compiled.execute(1)


def test_multi_output_node_of_one_node_is_a_value_error_and_graph_errors_are_too() -> None:
    with InputNode() as inp:
        with pytest.raises(ValueError, match=r"takes a non-empty list of nodes.*\n\nWrap one "
                                             r"node in a list: MultiOutputNode\(\[node\]\)"):
            MultiOutputNode(inp)
    assert issubclass(hr.DAGCompileError, ValueError)


def test_ray_import_paths_and_exception_names_resolve() -> None:
    from headrace import exceptions
    from headrace.dag.class_node import ClassMethodNode
    from headrace.dag.function_node import FunctionNode
    from headrace.dag.input_node import InputAttributeNode, InputNode as RayInputNode
    from headrace.dag.output_node import MultiOutputNode as RayMultiOutputNode
    assert (RayInputNode, RayMultiOutputNode) == (InputNode, MultiOutputNode)
    assert ClassMethodNode and FunctionNode and InputAttributeNode
    assert exceptions.RayTaskError is hr.TaskError
    assert exceptions.RayActorError is hr.ActorDiedError
    assert exceptions.RayChannelError is hr.ChannelClosedError
    assert issubclass(hr.SubmitTimeoutError, exceptions.RayChannelTimeoutError)
    assert exceptions.RaySystemError is exceptions.RayError is hr.HeadraceError
    assert exceptions.RayCgraphCapacityExceeded is hr.PipelineFullError


@hr.remote
def nap(delay_s):
    time.sleep(delay_s)


def test_a_timed_out_wait_for_compiled_refs_is_rays_channel_timeout_too() -> None:
    from headrace.exceptions import GetTimeoutError, RayChannelTimeoutError
    with InputNode() as inp:
        dag = Echo.remote().nap.bind(inp)
    with dag.experimental_compile() as compiled:
        ref = compiled.execute(1.0)
        for wait in (lambda: hr.get(ref, timeout=0.05), lambda: ref.result(timeout=0.05),
                     lambda: hr.get([ref], timeout=0.05)):
            with pytest.raises(RayChannelTimeoutError, match="1 of 1 ref still pending") as info:
                wait()
            assert isinstance(info.value, GetTimeoutError) and isinstance(info.value,
                                                                          TimeoutError)
        assert hr.get(ref, timeout=30) is None
    with pytest.raises(GetTimeoutError) as info:    # an ObjectRef's: no channel involved
        hr.get(nap.remote(1.0), timeout=0.05)
    assert not isinstance(info.value, RayChannelTimeoutError)


@hr.remote
class Fails:
    def divide(self, x):
        return 1 / x


def test_str_of_a_compiled_task_error_shows_the_remote_traceback_with_source_lines() -> None:
    a = Fails.remote()
    with InputNode() as inp:
        dag = a.divide.bind(inp)
    with dag.experimental_compile() as compiled:
        with pytest.raises(ZeroDivisionError) as info:
            hr.get(compiled.execute(0), timeout=30)
    text = str(info.value)
    head, tb = text.split("\n\n", 1)
    assert head.startswith("Fails.divide (bound at ") and head.endswith(
        "raised ZeroDivisionError: division by zero")
    assert tb.startswith('Traceback (most recent call last):\n  File "' + __file__)
    assert "    return 1 / x\n" in tb and tb.endswith("ZeroDivisionError: division by zero")
    assert "dag_loop.py" not in tb                  # headrace's own frames are left out


def _cell(source: str, name: str) -> Any:
    """Define ``name`` as a notebook does: from a cell whose file exists nowhere, but whose
    lines are in this process's linecache (so by-value pickling must carry them along)."""
    filename = f"<headrace-test-cell-{uuid.uuid4().hex}>"
    lines = source.splitlines(True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def test_code_from_a_file_the_workers_cannot_read_still_shows_its_source_lines() -> None:
    divide = hr.remote(_cell("def divide(x):\n    return 10 // x  # the cell's line\n",
                             "divide"))
    with pytest.raises(ZeroDivisionError) as info:
        hr.get(divide.remote(0), timeout=30)
    assert "    return 10 // x  # the cell's line\n" in str(info.value)
    Cell = hr.remote(_cell("class Cell:\n    def half(self, x):\n"
                           "        return {}[x]  # a compiled node's line\n", "Cell"))
    with InputNode() as inp:
        dag = Cell.remote().half.bind(inp)
    with dag.experimental_compile() as compiled:
        with pytest.raises(KeyError) as info:
            hr.get(compiled.execute(3), timeout=30)
    assert "    return {}[x]  # a compiled node's line\n" in str(info.value)


@hr.remote
class Counter:
    def __init__(self, start):
        self.total = start

    def add(self, x):
        self.total += x
        return self.total


def _children() -> int:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return len(f.read().split())


def test_actor_class_bind_makes_the_actor_when_the_dag_first_compiles() -> None:
    from headrace.dag.class_node import ClassNode
    before = _children()
    counter = Counter.bind(10)
    assert isinstance(counter, ClassNode) and "not created yet" in repr(counter)
    with InputNode() as inp:
        dag = counter.add.bind(inp)
    assert _children() == before                      # binding made no process
    with dag.experimental_compile() as compiled:
        assert hr.get([compiled.execute(1), compiled.execute(2)], timeout=30) == [11, 13]
    assert hr.get(dag.execute(3), timeout=30) == 16   # the same actor, uncompiled
    assert "created" in repr(counter)
