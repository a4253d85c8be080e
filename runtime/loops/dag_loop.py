"""The per-process loop of a compiled DAG: read inputs, call, write outputs, once per execution.

In: a ``Plan``, this process's key in it, and its channel endpoints (from the driver, through an
ordinary actor call). Out: a thread running the process's steps until a channel closes.
Invariants: steps run in plan order, one execution at a time; a user exception becomes that
execution's value (``OpFailure``), passed on to every op that depends on it and to the outputs, so
the next execution runs normally; a value that cannot be written (unpicklable) becomes an
``OpFailure`` too; a closed channel (teardown, a dead peer) ends the loop quietly.

  [input ch] ─READ─▶ values[%i] ─COMPUTE fn(*args)─▶ values[%j] ─WRITE─▶ [ch of %j] ─▶ readers
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from ...compiler.plan import Plan, StepKind, TaskSpec
from ...dag.ir import NodeArg, OpKind, PrevArg, fill, split_returns
from ...exceptions import ChannelClosedError, ValueDecodeError
from .values import InputParts, OpFailure, eval_part
from ..wire.errors import error_info

log = logging.getLogger(__name__)
_READ, _COMPUTE, _WRITE, _INPUT = 0, 1, 2, 3


def start_loop(worker: Any, plan: Plan, key: str, ends: dict[int, Any],
               trace_dir: str | None = None) -> str:
    """Start this process's loop for ``plan`` on a thread of its own; returns the thread name.

    With ``trace_dir`` (``profile=True``), every step is timed and the spans are written there
    when the loop ends.
    """
    recorder = None
    if trace_dir is not None:
        from .profiling import Recorder
        recorder = Recorder(plan.process_of(key).label)
    steps = _compile_steps(worker, plan, key, ends, recorder)
    name = f"headrace-dag-{key}"
    done = None if recorder is None else lambda: recorder.dump(trace_dir, key)
    thread = threading.Thread(target=_run, args=(steps, ends, done), name=name, daemon=True)
    thread.start()
    return name


def _compile_steps(worker: Any, plan: Plan, key: str, ends: dict[int, Any],
                   recorder: Any = None) -> list[tuple]:
    """The process's steps as tuples the loop dispatches on without lookups."""
    out: list[tuple] = []
    input_site = next((t.site for t in plan.tasks if t.kind is OpKind.INPUT), "?")
    splits = dict(plan.input_splits)
    for step in plan.process_of(key).steps:
        if step.kind is StepKind.READ:
            source = plan.tasks[step.op] if step.op >= 0 else None
            parts = splits.get(step.channel, ())
            out.append((_READ, _timed(recorder, ends[step.channel].read, f"read ch{step.channel}",
                                      "read"), step.op,
                        ("input", input_site) if source is None else
                        (source.name, source.site),
                        # a split ring of one part carries that part as itself
                        parts[0] if source is None and len(parts) == 1 else -1))
        elif step.kind is StepKind.WRITE:
            task = plan.tasks[step.op]
            out.append((_WRITE, _timed(recorder, ends[step.channel].write,
                                       f"write ch{step.channel}", "write"), step.op, task))
        else:
            task = plan.tasks[step.op]
            if task.kind in (OpKind.INPUT, OpKind.ATTR):
                out.append((_INPUT, task, plan.tasks))
            elif task.kind is OpKind.ITEM:
                out.append((_COMPUTE, _item(task.deps[0], task.key), task))
            else:
                out.append((_COMPUTE, _timed(recorder, _callable(worker, task), task.name,
                                             "compute"), task))
    return out


def _timed(recorder: Any, fn: Callable[..., Any], name: str, category: str
           ) -> Callable[..., Any]:
    if recorder is None:
        return fn
    # the first timed step of the loop starts each execution
    return recorder.timed(fn, name, category, first=not recorder.kinds)


def _callable(worker: Any, task: TaskSpec) -> Callable[[dict[int, Any]], Any]:
    """A function of the execution's values that runs ``task`` (the user's code, locked)."""
    parts = task.parts or (task,)
    fns = [_target(worker, p) for p in parts]
    # f(%1, %2), the usual case, is decided once here, not per execution
    flat = [tuple(a.index for a in p.args) if all(type(a) is NodeArg for a in p.args) else None
            for p in parts]
    lock = worker.call_lock
    pid = worker.pid
    awaiter = worker._await

    def run(values: dict[int, Any]) -> Any:
        for dep in task.deps:
            if type(values[dep]) is OpFailure:
                return values[dep]          # an upstream failure is this op's value too
        value = None
        for part, fn, indices in zip(parts, fns, flat, strict=True):
            try:
                args = [values[i] for i in indices] if indices is not None else \
                    _args(part.args, values, value)
                kwargs = dict(fill(part.kwargs, values, value)) if part.kwargs else {}
                with lock:
                    value = fn(*args, **kwargs)
                if asyncio.iscoroutine(value):
                    value = awaiter(value)
                if part.num_returns > 1:
                    value = split_returns(value, part.num_returns, part.name)
            except BaseException as exc:    # noqa: BLE001 - the user's error is the value
                return OpFailure(part.name, part.site, error_info(exc, part.name, pid))
        return value
    return run


def _item(source: int, index: int) -> Callable[[dict[int, Any]], Any]:
    """Return value ``index`` of op ``source`` (num_returns > 1); its failure is each one's."""
    def run(values: dict[int, Any]) -> Any:
        value = values[source]
        return value if type(value) is OpFailure else value[index]
    return run


def _args(template: tuple[Any, ...], values: dict[int, Any], prev: Any) -> Any:
    return [values[a.index] if type(a) is NodeArg else prev if type(a) is PrevArg
            else fill(a, values, prev) for a in template]


def _target(worker: Any, task: TaskSpec) -> Callable[..., Any]:
    if task.kind is OpKind.FUNCTION:
        return cloudpickle.loads(task.fn_blob)
    return getattr(worker.instance, task.method)


def _run(steps: list[tuple], ends: dict[int, Any], done: Callable[[], None] | None) -> None:
    # One flat loop on purpose (STYLE 4): it runs once per execution per process.
    values: dict[int, Any] = {}
    arguments: Any = None
    try:
        while True:
            values.clear()      # the last execution's values unpin their slots now
            for step in steps:
                code = step[0]
                if code == _READ:
                    try:
                        value = step[1]()
                    except ValueDecodeError as exc:     # taken, but not rebuilt
                        value = _read_failure(step[3], exc.__cause__ or exc)
                    if step[2] < 0:
                        arguments = value if step[4] < 0 else InputParts(((step[4], value),))
                    else:
                        values[step[2]] = value
                elif code == _COMPUTE:
                    values[step[2].index] = step[1](values)
                elif code == _WRITE:
                    _write(step[1], values[step[2]], step[3])
                else:
                    values[step[1].index] = _input(step[1], step[2], values, arguments)
    except ChannelClosedError:
        pass
    except BaseException:                   # noqa: BLE001 - a bug: say so, then stop
        log.exception("the compiled DAG loop stopped")
    finally:
        for end in ends.values():   # the DAG is over: what nobody read is freed now
            end.abandon()
        if done is not None:
            try:
                done()
            except Exception:               # noqa: BLE001 - the trace is lost, the DAG is not
                log.exception("could not write the compiled DAG's trace")


def _read_failure(source: tuple[str, str], exc: Exception) -> OpFailure:
    """A value that arrived but could not be deserialized: that execution's error."""
    name, site = source
    return OpFailure(name, site, error_info(exc, name, os.getpid(), prefix=(
        f"the value of {name} could not be deserialized in this process: ")))


def _input(task: TaskSpec, tasks: tuple[TaskSpec, ...], values: dict[int, Any],
           arguments: Any) -> Any:
    if type(arguments) is InputParts:       # the driver evaluated this reader's parts
        return arguments[task.index]
    return eval_part(task, tasks, values, arguments)


def _write(write: Callable[[Any], None], value: Any, task: TaskSpec) -> None:
    try:
        write(value)
    except (TypeError, ValueError) as exc:  # it does not pickle, or is too big for the channel
        write(OpFailure(task.name, task.site, error_info(
            exc, task.name, os.getpid(), prefix=f"could not serialize the value of {task.name}: ")))
