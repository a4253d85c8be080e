"""``dag.execute()`` without compiling: every op of the DagIR as an ordinary task or actor call.

In: a traced ``DagIR`` and the execute() arguments. Out: an ``ObjectRef`` per output (a list for a
``MultiOutputNode``). This is the reference the compiled path is tested against: the same
functions and methods, called through ``.remote()`` with refs as arguments (resolved by the
runtime before each call, nested ones too: a node nested in a list means its value), so no value
passes through the driver.
"""

from __future__ import annotations

from typing import Any

from ...dag.ir import DagIR, OpKind, eval_input, fill, is_used_whole
from ..api import put
from ..refs.ref import resolving_nested_refs


def run_with_tasks(ir: DagIR, args: tuple, kwargs: dict) -> Any:
    from ..remote import RemoteFunction
    values: dict[int, Any] = {}
    for op in ir.ops:
        if op.kind is OpKind.INPUT:
            if is_used_whole(ir, op.index):
                values[op.index] = eval_input(ir.ops, op, args, kwargs, values)
        elif op.kind is OpKind.ATTR:
            values[op.index] = eval_input(ir.ops, op, args, kwargs, values)
        elif op.kind is OpKind.ITEM:        # the call gave one ref per return value
            values[op.index] = values[op.deps[0]][op.key]
        else:
            call_args = fill(op.args, values)
            call_kwargs = dict(fill(op.kwargs, values))
            if op.kind is OpKind.FUNCTION:
                call = RemoteFunction(op.target.fn, {"num_returns": op.num_returns},
                                      op.target).remote
            else:
                call = getattr(op.target, op.method).options(
                    num_returns=op.num_returns).remote
            with resolving_nested_refs():
                values[op.index] = call(*call_args, **call_kwargs)
    outs = [_as_ref(values[i]) for i in ir.outputs]
    return outs if ir.multi else outs[0]


def _as_ref(value: Any) -> Any:
    from ..refs.ref import Ref
    return value if isinstance(value, Ref) else put(value)
