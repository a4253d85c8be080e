"""Placement and channel planning: which process runs each op, and which channels link them.

In: a fused ``DagIR`` and ``PlanOptions``. Out: ``place`` -> {op index: process key};
``plan_channels`` -> ``ChannelSpec``s, the input channel and each output's channel.
Invariants: a method runs on its actor's process (``actor:<key>``); every other call gets a
process of its own (``fn:<index>``, a chain of functions was fused into one op before); a value
crossing processes has one channel, written once and read by every process that needs it (the
driver too, for outputs); values used inside one process are handed over, never serialized.
"""

from __future__ import annotations

from ..dag.ir import DagIR, Op, OpKind
from .fusion import CALLS
from .plan import DRIVER, ChannelKind, ChannelSpec, PlanOptions

_KIND = {"auto": ChannelKind.SHM, "shm": ChannelKind.SHM, "socket": ChannelKind.SOCKET}


def process_key(op: Op) -> str:
    first = op.parts[0] if op.parts else op
    return f"actor:{first.actor}" if first.kind is OpKind.METHOD else f"fn:{op.index}"


def place(ir: DagIR) -> dict[int, str]:
    """The process of every call op and of ITEM ops (their call's); INPUT and ATTR ops run
    wherever they are read."""
    placement: dict[int, str] = {}
    for op in ir.ops:
        if op.kind in CALLS:
            placement[op.index] = process_key(op)
        elif op.kind is OpKind.ITEM:
            placement[op.index] = placement[op.deps[0]]
    return placement


def input_needs(ir: DagIR, placement: dict[int, str]) -> dict[str, list[int]]:
    """For each process, the INPUT/ATTR ops it computes from the execute() arguments."""
    needs: dict[str, set[int]] = {proc: set() for proc in placement.values()}
    for op in ir.ops:
        if op.index in placement:
            needs[placement[op.index]].update(
                d for d in op.deps if ir.ops[d].kind in (OpKind.INPUT, OpKind.ATTR))
    for found in needs.values():    # an ATTR of an ATTR needs its parent computed too
        for i in list(found):
            op = ir.ops[i]
            while op.kind is OpKind.ATTR and ir.ops[op.deps[0]].kind is OpKind.ATTR:
                op = ir.ops[op.deps[0]]
                found.add(op.index)
    return {proc: sorted(found) for proc, found in needs.items()}


def plan_channels(ir: DagIR, placement: dict[int, str], options: PlanOptions,
                  hosts: dict[str, str] | None = None) -> tuple[tuple[ChannelSpec, ...], int, tuple[tuple[int, tuple[int, ...]], ...],
                             tuple[int, ...]]:
    """Channels for every value that crosses processes.

    The input goes to the processes that read it as execute()'s arguments, on one channel, when
    they all use the same parts of it; otherwise it is split: a channel per set of readers
    that use the same parts, carrying only those parts (the INPUT/ATTR ops), which the driver
    evaluates (``inp[i]`` of a 1 MiB array per actor moves 1 MiB to each, not all to all).

    ``hosts`` gives the host of each process off the driver's host (the rest share the
    driver's): a channel whose readers are all on its writer's host is shared memory (unless
    the options say "socket"), one that crosses hosts is a socket channel.

    Returns:
        The channel specs, the shared input channel's id (-1 if none or split), the split input
        channels with the input ops each carries, and each output's channel id (-1 for an
        output the driver computes itself: the input or a part of it).
    """
    hosts = hosts or {}
    readers: dict[int, list[str]] = {}
    for op in ir.ops:
        if op.index not in placement:
            continue
        for dep in op.deps:
            src = placement.get(dep)
            if src is not None and src != placement[op.index] and \
                    placement[op.index] not in readers.setdefault(dep, []):
                readers[dep].append(placement[op.index])
    for out in ir.outputs:
        if out in placement and DRIVER not in readers.setdefault(out, []):
            readers[out].append(DRIVER)
    specs: list[ChannelSpec] = []
    by_op: dict[int, int] = {}
    needs = input_needs(ir, placement)
    fed = {proc for procs in readers.values() for proc in procs}
    # NOTE: a call on constants only (f.bind(5)) runs once per execution, after that execution
    # arrives: its process reads the input too, even if it does not use it
    sources = {placement[op.index] for op in ir.ops if op.index in placement and not op.deps}
    input_readers = [p for p in dict.fromkeys(placement.values())
                     if needs[p] or p not in fed or p in sources]
    input_id = -1
    splits: list[tuple[int, tuple[int, ...]]] = []
    groups: dict[tuple[int, ...], list[str]] = {}     # readers that use the same parts
    for proc in input_readers:
        groups.setdefault(tuple(needs[proc]), []).append(proc)
    if len(groups) == 1:
        input_id = len(specs)
        specs.append(_spec(input_id, -1, DRIVER, input_readers, options, hosts))
    for parts, procs in groups.items() if len(groups) > 1 else ():
        splits.append((len(specs), parts))
        specs.append(_spec(len(specs), -1, DRIVER, procs, options, hosts))
    for op in ir.ops:
        if readers.get(op.index):
            by_op[op.index] = len(specs)
            specs.append(_spec(len(specs), op.index, placement[op.index],
                               readers[op.index], options, hosts))
    outs = tuple(by_op.get(i, -1) for i in ir.outputs)
    return tuple(specs), input_id, tuple(splits), outs


def _spec(i: int, op: int, writer: str, readers: list[str], options: PlanOptions,
          hosts: dict[str, str]) -> ChannelSpec:
    host = hosts.get(writer, "")
    crosses = any(hosts.get(r, "") != host for r in readers)
    if crosses and options.channel == "shm":
        raise ValueError(f"channel='shm' cannot link {writer} (on "
                         f"{host or 'the driver host'}) to "
                         f"{', '.join(r for r in readers if hosts.get(r, '') != host)} on another "
                         "host: shared memory stays on one host.\n\nUse channel='auto' (shared "
                         "memory inside a host, sockets between hosts) or channel='socket'.")
    kind = ChannelKind.SOCKET if crosses else _KIND[options.channel]
    return ChannelSpec(i, kind, op, writer, tuple(readers), options.buffer_size_bytes,
                       options.max_inflight_executions, host)
