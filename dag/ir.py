"""DagIR: the traced, frozen, topologically ordered form of a DAG, and an in-process interpreter.

In: the root ``DAGNode`` (an output node or a ``MultiOutputNode``). Out: ``DagIR`` (``ops`` in
topological order, ``outputs``), printable with ``as_text()``; ``run_local`` evaluates it in this
process (the compiler tests' oracle); ``eval_input`` (one step: ``input_value``) is the one rule
for ``inp``, ``inp[0]``, ``inp.key`` and chains of them, shared by every executor.
Invariants: an op's index is its position in ``ops``; ``deps`` only name earlier ops; argument
templates hold ``NodeArg(i)`` where the user passed a node, constants as given.

  InputNode ─▶ f.bind(inp) ─▶ a.m.bind(...)   ──trace──▶   %0 = input / %1 = f(%0) / %2 = a.m(%1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from .walk import map_leaves
from .nodes import (ClassMethodNode, DAGNode, FunctionNode, InputAttributeNode, InputNode,
                    ItemNode, MultiOutputNode)


class OpKind(Enum):
    INPUT = "input"
    ATTR = "attr"           # a part of the input: inp[0], inp.key
    FUNCTION = "function"   # a remote function
    METHOD = "method"       # an actor method
    ITEM = "item"           # return value `key` of a call with num_returns > 1 (same process)
    FUSED = "fused"         # a chain of ops in one process, run back to back (compiler pass)


@dataclass(frozen=True, slots=True)
class NodeArg:
    """In an argument template: the value of op ``index``."""

    index: int

    def __repr__(self) -> str:
        return f"%{self.index}"


@dataclass(frozen=True, slots=True)
class PrevArg:
    """In a fused chain: the value of the previous op of the chain."""

    def __repr__(self) -> str:
        return "<prev>"


@dataclass(frozen=True, slots=True, eq=False)
class Op:
    """One entry of a DagIR. ``target`` is the function body or actor handle (opaque here)."""

    index: int
    kind: OpKind
    name: str
    site: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    deps: tuple[int, ...] = ()          # invariant: distinct, each < index
    target: Any = field(default=None, repr=False)
    method: str | None = None
    actor: Any = None                   # the actor's key (METHOD ops): same key, same process
    key: int | str | None = None        # ATTR: the argument or attribute
    access: str | None = None           # ATTR: "item" or "attr"
    parts: tuple[Op, ...] = ()          # FUSED: the chain, first to last
    num_returns: int = 1                # calls: > 1 returns a tuple of that many (ITEM ops)

    def line(self) -> str:
        """This op as one line of ``as_text()``."""
        return op_line(self)


def op_line(op: Any) -> str:
    """One line of ``as_text()`` for an ``Op`` or anything with its fields (a ``TaskSpec``)."""
    if op.kind is OpKind.INPUT:
        return f"%{op.index} = input"
    if op.kind is OpKind.ATTR or op.kind is OpKind.ITEM:
        sub = f".{op.key}" if op.access == "attr" else f"[{op.key!r}]"
        return f"%{op.index} = %{op.deps[0]}{sub}"
    returns = f"  -> {op.num_returns} values" if op.num_returns > 1 else ""
    return f"%{op.index} = {op.name}({format_args(op.args, op.kwargs)}){returns}"


def format_args(args: tuple[Any, ...], kwargs: tuple[tuple[str, Any], ...]) -> str:
    parts = [_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs]
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True, eq=False)
class DagIR:
    """A traced DAG: ``ops`` in topological order and the indices of its ``outputs``."""

    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    multi: bool                 # a MultiOutputNode: execute() returns a list
    root_site: str = ""

    @property
    def input_ops(self) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.kind is OpKind.INPUT)

    def consumers(self) -> dict[int, list[int]]:
        """For each op, the ops that read its value, in order."""
        out: dict[int, list[int]] = {op.index: [] for op in self.ops}
        for op in self.ops:
            for dep in op.deps:
                out[dep].append(op.index)
        return out

    def as_text(self) -> str:
        lines = [op.line() for op in self.ops]
        outs = ", ".join(f"%{i}" for i in self.outputs)
        lines.append(f"return ({outs})" if self.multi else f"return {outs}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_text()


def trace(root: DAGNode, *, unused: bool = False) -> DagIR:
    """Turn the nodes reachable from ``root`` into a DagIR (each node once, in bind order, so
    ``%i`` is the i-th value bound and ``as_text()`` lists the ops in the order they run).

    With ``unused``, calls bound inside the InputNode's ``with`` block that no output depends
    on are traced too (after the others), so that validation can refuse them by name; running
    a DAG uncompiled skips them, as Ray does.
    """
    if not isinstance(root, DAGNode):
        raise TypeError(f"trace() expects a DAG node, got {type(root).__name__}")
    seen: set[int] = set()
    order = _postorder(root, seen)
    if unused:
        for node in [n for n in order if isinstance(n, InputNode)]:
            for bound in node._bound:
                if id(bound) not in seen:
                    order += _postorder(bound, seen)
    # Bind order (Ray's rule: an actor runs its methods in the order they were bound). It is a
    # topological order too: a node's arguments exist before it does, so were bound earlier.
    order.sort(key=lambda n: n._uid)
    index: dict[int, int] = {}
    parts: dict[tuple[int, Any, str], int] = {}     # (parent, key, access) of ATTR ops: one op
    ops: list[Op] = []
    for node in order:
        if isinstance(node, MultiOutputNode):
            continue
        if isinstance(node, InputAttributeNode):
            same = (index[id(node._args[0])], node._key, node._access)
            if same in parts:           # inp.k written twice is one value
                index[id(node)] = parts[same]
                continue
            parts[same] = len(ops)
        i = index[id(node)] = len(ops)
        ops.append(_op(node, i, index))
    outs = root._args if isinstance(root, MultiOutputNode) else (root,)
    return DagIR(tuple(ops), tuple(index[id(n)] for n in outs),
                 isinstance(root, MultiOutputNode), root._site)


def _postorder(root: DAGNode, seen: set[int]) -> list[DAGNode]:
    """Nodes in dependency order, without recursion (deep chains do not hit the stack limit);
    ``seen`` nodes are left out (and the new ones added to it)."""
    order: list[DAGNode] = []
    stack: list[tuple[DAGNode, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for up in reversed(node._upstream()):
            if id(up) not in seen:
                stack.append((up, False))
    return order


def _op(node: DAGNode, i: int, index: dict[int, int]) -> Op:
    args = _template(node._args, index)
    kwargs = tuple((k, _template(v, index)) for k, v in node._kwargs.items())
    deps = tuple(dict.fromkeys(index[id(n)] for n in node._upstream()))
    common = {"index": i, "name": node._name, "site": node._site, "deps": deps}
    if isinstance(node, InputNode):
        return Op(kind=OpKind.INPUT, **common)
    if isinstance(node, InputAttributeNode):
        return Op(kind=OpKind.ATTR, key=node._key, access=node._access, **common)
    if isinstance(node, ItemNode):
        return Op(kind=OpKind.ITEM, key=node._index, access="item", **common)
    if isinstance(node, FunctionNode):
        return Op(kind=OpKind.FUNCTION, args=args, kwargs=kwargs, target=node.body,
                  num_returns=node.num_returns, **common)
    if isinstance(node, ClassMethodNode):
        node.resolve_actor()                # bound on a ClassNode: its actor is made now
        return Op(kind=OpKind.METHOD, args=args, kwargs=kwargs, target=node.actor,
                  method=node.method, actor=node.actor_key, num_returns=node.num_returns,
                  **common)
    raise TypeError(f"cannot trace a {type(node).__name__} (bound at {node._site})")


def _template(obj: Any, index: dict[int, int]) -> Any:
    return map_leaves(obj, lambda node: NodeArg(index[id(node)]),
                      lambda x: isinstance(x, DAGNode))


def is_arg(obj: Any) -> bool:
    """A leaf of an argument template: ``NodeArg`` or ``PrevArg``."""
    return type(obj) is NodeArg or type(obj) is PrevArg


def fill(template: Any, values: Any, prev: Any = None) -> Any:
    """The template with each ``NodeArg(i)`` replaced by ``values[i]`` (and ``PrevArg``)."""
    return map_leaves(template, lambda a: values[a.index] if type(a) is NodeArg else prev,
                      is_arg)


def input_value(op: Op, parent: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value of an INPUT or ATTR op for ``execute(*args, **kwargs)``.

    ``parent`` is the value of an ATTR op's parent when that parent is itself an ATTR op.
    """
    if op.kind is OpKind.INPUT:
        if len(args) == 1 and not kwargs:
            return args[0]
        raise TypeError(
            f"the DAG passes its InputNode (bound at {op.site}) on as one value, so execute() "
            f"takes exactly one positional argument, but it got {len(args)} positional and "
            f"{len(kwargs)} keyword arguments.\n\nPass one value, or bind inp[0], inp[1] or "
            "inp.key to take several.")
    key = op.key
    if parent is not _WHOLE:
        return parent[key] if op.access == "item" else getattr(parent, key)
    if isinstance(key, int):
        if -len(args) <= key < len(args):
            return args[key]
        raise TypeError(f"the DAG reads positional argument {key} (inp[{key}], bound at "
                        f"{op.site}), but execute() got {len(args)} positional arguments")
    if key in kwargs:
        return kwargs[key]
    if len(args) == 1:
        return args[0][key] if op.access == "item" else getattr(args[0], key)
    raise TypeError(f"the DAG reads the keyword argument {key!r} ({op.name}, bound at "
                    f"{op.site}), but execute() got {sorted(kwargs) or 'no keyword arguments'}")


#: ``input_value``'s ``parent`` for an ATTR op that reads the execute() arguments themselves.
_WHOLE = object()


def eval_input(ops: Sequence[Any], op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               values: Mapping[int, Any]) -> Any:
    """The value of INPUT or ATTR op ``op`` for ``execute(*args, **kwargs)``: the one place
    that follows ``inp[0].x``-style chains (every executor calls it). ``values`` holds the ops
    computed already; a parent missing from it is computed here. ``ops`` are ``Op``s or
    ``TaskSpec``s, by index."""
    if op.kind is OpKind.INPUT:
        return input_value(op, _WHOLE, args, kwargs)
    parent = ops[op.deps[0]]
    if parent.kind is OpKind.INPUT:
        base = _WHOLE
    elif parent.index in values:
        base = values[parent.index]
    else:
        base = eval_input(ops, parent, args, kwargs, values)
    return input_value(op, base, args, kwargs)


def run_local(ir: DagIR, *args: Any,
              call: Callable[[Op], Callable[..., Any]] | None = None, **kwargs: Any) -> Any:
    """Evaluate ``ir`` in this process, op by op; ``call(op)`` gives the callable for an op.

    By default a FUNCTION op calls its body's ``fn`` and a METHOD op calls the method of the
    handle's ``instance`` (test doubles have one; live actors do not: pass ``call``).
    """
    call = call or _local_callable
    values: dict[int, Any] = {}
    for op in ir.ops:
        if op.kind is not OpKind.INPUT or is_used_whole(ir, op.index):
            values[op.index] = _run_op(ir.ops, op, values, args, kwargs, call)
    outs = [values[i] for i in ir.outputs]
    return outs if ir.multi else outs[0]


def is_used_whole(ir: DagIR, index: int) -> bool:
    """Whether the value of op ``index`` is used as such (by a call or as an output), not only
    as the parent of ATTR ops (``inp[0]`` needs no single-argument ``inp``)."""
    return index in ir.outputs or any(
        index in op.deps for op in ir.ops if op.kind is not OpKind.ATTR)


def _run_op(ops: tuple[Op, ...], op: Op, values: dict[int, Any], args: tuple[Any, ...],
            kwargs: dict[str, Any], call: Callable[[Op], Callable[..., Any]]) -> Any:
    if op.kind is OpKind.INPUT or op.kind is OpKind.ATTR:
        return eval_input(ops, op, args, kwargs, values)
    if op.kind is OpKind.ITEM:
        return values[op.deps[0]][op.key]
    if op.kind is OpKind.FUSED:
        value = None
        for part in op.parts:
            value = call(part)(*fill(part.args, values, value),
                               **dict(fill(part.kwargs, values, value)))
        return split_returns(value, op.num_returns, op.name)
    value = call(op)(*fill(op.args, values), **dict(fill(op.kwargs, values)))
    return split_returns(value, op.num_returns, op.name)


def split_returns(value: Any, num_returns: int, name: str) -> Any:
    """A call's value as its ITEM ops read it: itself, or (``num_returns > 1``) a tuple of that
    many values; ValueError if it is not an iterable of that length (Ray's rule too)."""
    if num_returns == 1:
        return value
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(f"{name} was declared with num_returns={num_returns} but returned a "
                         f"{type(value).__name__}, which is not iterable") from None
    if len(values) != num_returns:
        raise ValueError(f"{name} was declared with num_returns={num_returns} but returned "
                         f"{len(values)} values")
    return values


def _local_callable(op: Op) -> Callable[..., Any]:
    if op.kind is OpKind.FUNCTION:
        return op.target.fn
    return getattr(op.target.instance, op.method)


def renumber(ops: list[Op], outputs: tuple[int, ...], multi: bool, site: str) -> DagIR:
    """A DagIR of ``ops`` (each with its old index) with indices 0..n-1 again."""
    new = {op.index: i for i, op in enumerate(ops)}

    def move(template: Any) -> Any:
        return map_leaves(template, lambda a: NodeArg(new[a.index]),
                          lambda x: type(x) is NodeArg)

    def moved(op: Op, index: int | None) -> Op:
        return replace(op, index=op.index if index is None else index,
                       args=move(op.args), kwargs=move(op.kwargs),
                       deps=tuple(new[d] for d in op.deps),
                       parts=tuple(moved(p, None) for p in op.parts))
    return DagIR(tuple(moved(op, i) for i, op in enumerate(ops)),
                 tuple(new[i] for i in outputs), multi, site)
