"""Per-process schedules: the READ / COMPUTE / WRITE steps each process runs per execution.

In: a fused ``DagIR``, its placement and its channels. Out: one ``ProcessPlan`` per process.
Invariants (why no schedule can deadlock): every process runs its ops in the DAG's one global
topological order, executions one after another, and every ring holds at least one execution.
That order is bind order (``trace`` numbers ops so), so an actor runs its methods in the order
they were bound, as in Ray: pipeline schedules (F F F, then B B B on one actor) depend on it.
A process blocked reading waits for a writer that is strictly earlier in (execution, op) order;
one blocked writing waits for a reader a whole ring behind, earlier still. Waits only ever point
to earlier positions, so they cannot form a cycle. The driver writes inputs and reads outputs;
it drains outputs before it would block on an input (DESIGN 4), so it is never in a cycle either.
"""

from __future__ import annotations

from ..dag.ir import DagIR, OpKind
from ..exceptions import InternalError
from .plan import DRIVER, ChannelSpec, ProcessPlan, Step, StepKind
from .placement import input_needs


def schedule(ir: DagIR, placement: dict[int, str], channels: tuple[ChannelSpec, ...]
             ) -> tuple[ProcessPlan, ...]:
    """The steps of every process, in the order of first appearance in the DAG."""
    writes = {c.op: c.id for c in channels if c.op >= 0}
    inputs = {proc: c.id for c in channels if c.op < 0 for proc in c.readers}
    needs = input_needs(ir, placement)
    plans = []
    for proc in dict.fromkeys(placement.values()):
        steps: list[Step] = []
        if proc in inputs:
            steps.append(Step(StepKind.READ, -1, inputs[proc]))
        local = set(needs[proc])
        read: set[int] = set()
        for op in ir.ops:
            if op.index in local:
                steps.append(Step(StepKind.COMPUTE, op.index))
            if placement.get(op.index) != proc:
                continue
            for dep in op.deps:
                if dep in writes and placement.get(dep) != proc and dep not in read:
                    read.add(dep)
                    steps.append(Step(StepKind.READ, dep, writes[dep]))
            steps.append(Step(StepKind.COMPUTE, op.index))
            if op.index in writes:
                steps.append(Step(StepKind.WRITE, op.index, writes[op.index]))
        first = ir.ops[next(s.op for s in steps if s.kind is StepKind.COMPUTE and
                            ir.ops[s.op].kind not in (OpKind.INPUT, OpKind.ATTR))]
        label = first.name.split(".")[0] if proc.startswith("actor:") else first.name
        plans.append(ProcessPlan(proc, label, _actor_key(ir, placement, proc), tuple(steps)))
    return tuple(plans)


def _actor_key(ir: DagIR, placement: dict[int, str], proc: str) -> object:
    if not proc.startswith("actor:"):
        return None
    op = ir.ops[next(i for i, p in placement.items() if p == proc)]
    return (op.parts[0] if op.parts else op).actor


def verify(processes: tuple[ProcessPlan, ...], channels: tuple[ChannelSpec, ...]) -> None:
    """Invariants of a schedule (run when HEADRACE_CHECKS is set): raises InternalError."""
    for proc in processes:
        last = -2
        for step in proc.steps:
            spec = channels[step.channel] if step.channel >= 0 else None
            if step.kind is StepKind.COMPUTE:
                if step.op <= last:
                    _bug(f"{proc.key} computes %{step.op} after %{last}")
                last = step.op
            elif step.kind is StepKind.READ and (spec is None or proc.key not in spec.readers):
                _bug(f"{proc.key} reads ch{step.channel} but is not one of its readers")
            elif step.kind is StepKind.WRITE and (spec is None or spec.writer != proc.key):
                _bug(f"{proc.key} writes ch{step.channel} but is not its writer")
    for spec in channels:
        if spec.writer != DRIVER and not any(p.key == spec.writer for p in processes):
            _bug(f"ch{spec.id} is written by {spec.writer}, which is not in the plan")


def _bug(what: str) -> None:
    raise InternalError(f"bad schedule: {what}; this is a bug in headrace; please report it")
