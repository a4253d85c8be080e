"""``compiled.visualize()``: a Plan as Graphviz DOT (processes as clusters, channels as edges).

In: a ``Plan``, an optional path and format. Out: the DOT source; with a path, the file too
(``dot``: the source itself; ``png``/``svg``: rendered by Graphviz's ``dot`` program).
"""

from __future__ import annotations

import shutil
import subprocess

from ..compiler.plan import DRIVER, Plan, StepKind

_FORMATS = ("dot", "png", "svg")


def to_dot(plan: Plan) -> str:
    lines = ["digraph compiled_dag {", "  rankdir=LR;", '  node [shape=box, fontsize=10];',
             f'  "{DRIVER}" [shape=doublecircle, label="driver"];']
    for i, proc in enumerate(plan.processes):
        lines.append(f'  subgraph cluster_{i} {{ label="{_q(proc.key)} ({_q(proc.label)})";')
        for step in proc.steps:
            if step.kind is StepKind.COMPUTE:
                task = plan.tasks[step.op]
                lines.append(f'    "{_q(proc.key)}/%{task.index}" '
                             f'[label="%{task.index} {_q(task.name)}\\n{_q(task.site)}"];')
        lines.append("  }")
    for spec in plan.channels:
        src = DRIVER if spec.writer == DRIVER else f"{spec.writer}/%{spec.op}"
        for reader in spec.readers:
            dst = DRIVER if reader == DRIVER else _first_use(plan, reader, spec.op)
            lines.append(f'  "{_q(src)}" -> "{_q(dst)}" '
                         f'[label="ch{spec.id} {spec.kind.value}"];')
    for proc in plan.processes:         # values handed over inside one process
        for step in proc.steps:
            if step.kind is not StepKind.COMPUTE:
                continue
            for dep in plan.tasks[step.op].deps:
                if any(s.kind is StepKind.COMPUTE and s.op == dep for s in proc.steps):
                    lines.append(f'  "{_q(proc.key)}/%{dep}" -> "{_q(proc.key)}/%{step.op}" '
                                 '[style=dashed, label="local"];')
    lines.append("}")
    return "\n".join(lines)


def _first_use(plan: Plan, proc_key: str, op: int) -> str:
    proc = plan.process_of(proc_key)
    for step in proc.steps:
        if step.kind is StepKind.COMPUTE and (op < 0 or op in plan.tasks[step.op].deps):
            return f"{proc_key}/%{step.op}"
    return proc_key


def _q(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def render(plan: Plan, path: str | None, format: str) -> str:
    """The DOT source; writes ``path`` when given (rendering png/svg with ``dot``)."""
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    source = to_dot(plan)
    if path is None:
        return source
    if format == "dot":
        with open(path, "w") as f:
            f.write(source)
        return source
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError(
            f"visualize(format={format!r}) needs Graphviz's `dot` program, which is not on "
            "PATH.\n\nInstall Graphviz (e.g. `apt install graphviz`), or call "
            "visualize(path, format='dot') and render the file elsewhere.")
    subprocess.run([exe, f"-T{format}", "-o", path], input=source.encode(), check=True,
                   timeout=60)
    return source
