"""Why a compiled DAG's pipeline does not move: which stage holds it, and what the OS says of it.

In: a Plan, its open channels (their ``progress()`` counters) and the processes' records. Out: the
text of ``SubmitTimeoutError`` (``describe_stall``) and ``os_state(pid)``.
Invariants: reads only counters and /proc, never waits; a channel that cannot report progress
(socket) makes its ends unknown, and then every process of the DAG is listed.

A stage holds the pipeline when it has consumed inputs of more executions than it has written
outputs for (it is computing, or stuck in user code), or when input is waiting for it unread.
"""

from __future__ import annotations

from typing import Any

from ...compiler.plan import Plan, StepKind

_MASK = 0xFFFFFFFF
_STATES = {
    "R": "running", "S": "sleeping (waiting in user code, a lock or I/O)",
    "D": "in uninterruptible I/O", "T": "stopped by a signal (SIGSTOP?): SIGCONT resumes it",
    "t": "stopped by a debugger", "Z": "exited (a zombie)", "X": "exited",
    "I": "idle",
}


def os_state(pid: int | None) -> str:
    """What /proc says of ``pid``: running, sleeping, stopped, exited..."""
    if pid is None:
        return "not started"
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            code = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "gone"
    return _STATES.get(code, f"in state {code!r}")


def describe_stall(plan: Plan, channels: dict[int, Any], records: dict[str, Any]) -> str:
    """One line per stage that holds the pipeline (every stage if none can be singled out)."""
    # NOTE: a process's first input and first output stand for all of them (it takes and
    # writes one value per channel per execution); counters wrap, so only differences count
    took: dict[str, int] = {}          # per process: values taken off its first input
    wrote: dict[str, int] = {}         # per process: values written to its first output
    waiting: dict[str, bool] = {}      # per process: every input has a value it has not taken
    unknown = False
    for spec in plan.channels:
        ch = channels.get(spec.id)
        counts = ch.progress() if ch is not None else None
        if counts is None:
            unknown = True
            continue
        written, consumed = counts
        wrote.setdefault(spec.writer, written)
        for key, seq in zip(spec.readers, consumed, strict=True):
            took.setdefault(key, seq)
            waiting[key] = waiting.get(key, True) and (written - seq) & _MASK != 0
    lines = []
    for proc in plan.processes:
        key = proc.key
        busy = key in took and key in wrote and 0 < (took[key] - wrote[key]) & _MASK < 1 << 31
        if not (busy or waiting.get(key) or unknown):
            continue
        record = records.get(key)
        pid = record.proc.pid if record is not None and record.proc is not None else None
        doing = "is inside a call (it took its input and has not written its output)" if busy \
            else "has input waiting that it has not taken" if waiting.get(key) else \
            "may hold it (its channels cannot report progress)"
        ops = ", ".join(f"{plan.tasks[s.op].name} bound at {plan.tasks[s.op].site}"
                        for s in proc.steps if s.kind is StepKind.COMPUTE)
        lines.append(f"  - {proc.label} (pid {pid}; runs {ops}): {os_state(pid)}; it {doing}")
    return "\n".join(lines) or "  (no stage has work pending; the driver's output reads lag)"
