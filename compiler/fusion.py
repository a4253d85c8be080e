"""Fusion: a chain of calls that live in one process becomes one FUSED op, run back to back.

In: a validated ``DagIR``. Out: a ``DagIR`` where each maximal chain A -> B -> ... is one op, when
B reads only A, A feeds only B, A is not an output, and both run in the same process (methods of
one actor, with no other method of it bound between them, so bind order holds; or remote
functions, which then share one worker process).
Invariants: results are unchanged (``run_local`` gives the same values); a FUSED op takes the
first op's arguments, and each later part reads the previous part's value through ``PrevArg``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..dag.ir import DagIR, NodeArg, Op, OpKind, PrevArg, renumber
from ..dag.walk import map_leaves

CALLS = frozenset({OpKind.FUNCTION, OpKind.METHOD, OpKind.FUSED})


def home(op: Op) -> Any:
    """Where a call runs: ("actor", key) for methods, ("fn",) for functions (any worker)."""
    first = op.parts[0] if op.parts else op
    return ("actor", first.actor) if first.kind is OpKind.METHOD else ("fn",)


def fuse_chains(ir: DagIR) -> DagIR:
    """Merge every chain of calls that can run back to back in one process into one op."""
    consumers = ir.consumers()
    outputs = set(ir.outputs)
    chains: dict[int, list[Op]] = {}        # last op of a chain -> the chain, first to last
    latest: dict[Any, int] = {}             # actor home -> its op bound last so far
    for op in ir.ops:
        if op.kind not in CALLS:
            continue
        where, before = home(op), latest.get(home(op))
        if where[0] == "actor":
            latest[where] = op.index
        if len(op.deps) == 1 and op.deps[0] in chains:
            prev = ir.ops[op.deps[0]]
            # NOTE: an actor runs its methods in bind order: a chain fuses only where no other
            # method of that actor was bound between its links
            if consumers[prev.index] == [op.index] and prev.index not in outputs \
                    and home(prev) == where and (where[0] != "actor" or before == prev.index):
                chain = chains.pop(prev.index)
                chain.append(op)
                chains[op.index] = chain
                continue
        chains[op.index] = [op]
    ops = [op if op.kind not in CALLS else _fused(chains[op.index])
           for op in ir.ops if op.kind not in CALLS or op.index in chains]
    return renumber(ops, ir.outputs, ir.multi, ir.root_site)


def _fused(chain: list[Op]) -> Op:
    if len(chain) == 1:
        return chain[0]
    first, last = chain[0], chain[-1]
    parts = [first] + [replace(op, args=_prev(op.args, chain[i].index),
                               kwargs=_prev(op.kwargs, chain[i].index), deps=())
                       for i, op in enumerate(chain[1:])]
    names = [op.method if op.kind is OpKind.METHOD else op.name for op in chain]
    label = first.name.rsplit(".", 1)[0] + "." if first.kind is OpKind.METHOD else ""
    return Op(index=last.index, kind=OpKind.FUSED, name=f"{label}[{', '.join(names)}]",
              site=last.site, args=first.args, kwargs=first.kwargs, deps=first.deps,
              actor=first.actor, parts=tuple(parts), num_returns=last.num_returns)


def _prev(template: Any, index: int) -> Any:
    return map_leaves(template, lambda a: PrevArg() if a.index == index else a,
                      lambda x: type(x) is NodeArg)
