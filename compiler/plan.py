"""The Plan: what the runtime needs to run a compiled DAG, as frozen, picklable, printable data.

In: the compiler passes' results. Out: ``Plan`` (processes with their READ / COMPUTE / WRITE
steps, channel specs, outputs, options), ``plan.as_text()`` for bug reports.
Invariants: nothing live sits in a Plan (no handles, sockets, segments): functions travel as
cloudpickled bytes, actors as their keys; every process runs its steps once per execution, in
order; a channel has one writer and its readers in a fixed order (a reader's index is its place).

  driver ─WRITE input─▶ [ch0] ─READ─▶ actor:a  COMPUTE %1 ─WRITE─▶ [ch1] ─READ─▶ driver (output 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..dag.ir import OpKind, op_line

DRIVER = "driver"       # the process key of the driver: writes the input, reads the outputs


class ChannelKind(Enum):
    LOCAL = "local"     # both ends in one process: handed over, never serialized
    SHM = "shm"
    SOCKET = "socket"


class StepKind(Enum):
    READ = "READ"
    COMPUTE = "COMPUTE"
    WRITE = "WRITE"


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    op: int                 # COMPUTE/WRITE: the op computed or written; READ: the op it carries
    channel: int = -1       # READ/WRITE: the channel


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel: the value of ``op`` (-1: the execute() arguments) from writer to readers."""

    id: int
    kind: ChannelKind
    op: int
    writer: str
    readers: tuple[str, ...]        # invariant: distinct; reader i opens endpoint i
    slot_bytes: int
    capacity: int
    host: str = ""                  # the writer's host ("": the driver's)

    def line(self, parts: tuple[int, ...] | None = None) -> str:
        """One line of the plan; ``parts``: the input ops a split input channel carries."""
        what = f"%{self.op}" if self.op >= 0 else "input" if parts is None else \
            "input " + (",".join(f"%{i}" for i in parts) or "-")
        where = f"  from host {self.host}" if self.host else ""
        return (f"ch{self.id} {self.kind.value:<6} {what:<6} {self.writer} -> "
                f"{', '.join(self.readers)}  ({_size(self.slot_bytes)} x {self.capacity}){where}")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """An op as a process runs it: its callable travels as bytes (``fn_blob``) or a method name."""

    index: int
    kind: OpKind
    name: str
    site: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    deps: tuple[int, ...] = ()
    method: str | None = None
    fn_blob: bytes | None = None
    key: int | str | None = None
    access: str | None = None
    parts: tuple[TaskSpec, ...] = ()
    num_returns: int = 1

    def line(self) -> str:
        return op_line(self)


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    """One process of the plan: an actor's (``actor`` is its key) or a function host's."""

    key: str
    label: str
    actor: Any
    steps: tuple[Step, ...]

    def reads(self) -> tuple[int, ...]:
        return tuple(s.channel for s in self.steps if s.kind is StepKind.READ)


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """Compile options (DESIGN 2), checked."""

    max_inflight_executions: int = 10
    buffer_size_bytes: int = 1 << 20
    submit_timeout_s: float | None = 10.0      # None: execute() may wait for ever (Ray: 10 s)
    max_buffered_results: int | None = None     # None: as many as memory allows
    channel: str = "auto"
    sync: str = "auto"
    profile: bool | str = False             # True, or the trace file's path


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: tuple[TaskSpec, ...]             # by op index
    processes: tuple[ProcessPlan, ...]
    channels: tuple[ChannelSpec, ...]
    input_channel: int                      # -1 when no process or several read the input
    #: several readers: per reader, its channel and the INPUT/ATTR ops the driver evaluates
    input_splits: tuple[tuple[int, tuple[int, ...]], ...]
    outputs: tuple[int, ...]                # op index of each output
    output_channels: tuple[int, ...]        # per output: its channel, -1: the driver computes it
    multi: bool
    options: PlanOptions
    #: process key -> its host, for processes off the driver's host (a Dask cluster's)
    hosts: tuple[tuple[str, str], ...] = ()

    def process_of(self, key: str) -> ProcessPlan:
        return next(p for p in self.processes if p.key == key)

    def as_text(self) -> str:
        o = self.options
        lines = [f"plan: {len(self.tasks)} ops, {len(self.processes)} processes, "
                 f"{len(self.channels)} channels (max_inflight_executions="
                 f"{o.max_inflight_executions}, sync={o.sync})"]
        hosts = dict(self.hosts)
        for proc in self.processes:
            where = f" on host {hosts[proc.key]}" if proc.key in hosts else ""
            lines.append(f"process {proc.key} ({proc.label}){where}")
            lines += [f"  {_step_text(self, s)}" for s in proc.steps]
        lines.append("channels")
        splits = dict(self.input_splits)
        lines += [f"  {c.line(splits.get(c.id))}" for c in self.channels]
        outs = ", ".join(f"%{i}" + (f" <- ch{c}" if c >= 0 else " (driver)")
                         for i, c in zip(self.outputs, self.output_channels, strict=True))
        lines.append(f"return ({outs})" if self.multi else f"return {outs}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_text()


def _step_text(plan: Plan, step: Step) -> str:
    if step.kind is StepKind.COMPUTE:
        task = plan.tasks[step.op]
        return f"COMPUTE {task.line()}  @ {task.site}"
    if step.op >= 0:
        what = f"%{step.op}"
    else:
        parts = dict(plan.input_splits).get(step.channel)
        what = "input" if parts is None else \
            "input " + (",".join(f"%{i}" for i in parts) or "-")
    return f"{step.kind.value:<7} ch{step.channel} {what}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)
