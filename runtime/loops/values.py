"""What compiled-DAG processes exchange besides user values (kept free of heavy imports).

``OpFailure`` is an execution's value where an op raised: it travels through channels like any
value and becomes a ``TaskError`` on the driver. ``PackedArgs`` and ``InputParts`` are what an
input channel carries (all the arguments; the parts one reader uses). ``FunctionHost`` is the actor class of a
process that runs only remote-function ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...dag.ir import eval_input


@dataclass(frozen=True, slots=True)
class OpFailure:
    """Op ``name`` (bound at ``site``) raised; ``info`` is the protocol's ``ErrorInfo``."""

    name: str
    site: str
    info: Any


@dataclass(frozen=True, slots=True)
class PackedArgs:
    """The input channel's value when execute() got other than exactly one positional
    argument (one positional argument travels as itself)."""

    args: tuple
    kwargs: dict


class InputParts(dict):
    """A split input channel's value: the parts of execute()'s arguments its readers use, by
    op index (an ``OpFailure`` where evaluating the part failed on the driver). A dict: it
    pickles as fast as one."""

    __slots__ = ()


class FunctionHost:
    """The actor class of a process that runs only remote-function ops of compiled DAGs."""

    def __repr__(self) -> str:
        return "<FunctionHost>"


def eval_part(task: Any, tasks: tuple[Any, ...], values: dict[int, Any], arguments: Any) -> Any:
    """The value of INPUT/ATTR op ``task`` (a ``TaskSpec``) given execute()'s arguments (one
    positional argument as itself, else ``PackedArgs``); an ``OpFailure`` if that raises. In a
    process's loop, or on the driver for the parts it sends each reader (``InputParts``)."""
    if type(arguments) is OpFailure:
        return arguments
    if task.deps and type(values.get(task.deps[0])) is OpFailure:
        return values[task.deps[0]]         # inp[0].x after inp[0] failed: that failure
    try:
        if type(arguments) is PackedArgs:
            args, kwargs = arguments.args, arguments.kwargs
        else:
            args, kwargs = (arguments,), {}
        return eval_input(tasks, task, args, kwargs, values)
    except Exception as exc:                # noqa: BLE001 - bad execute() arguments
        from ..wire.errors import error_info    # NOTE: loads cloudpickle: only on a failure
        return OpFailure(task.name, task.site, error_info(exc, task.name, os.getpid()))
