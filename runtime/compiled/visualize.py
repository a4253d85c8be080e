"""``compiled.visualize()``: a Plan as Graphviz DOT (processes as clusters, channels as edges).

In: a ``Plan`` and Ray's arguments (``filename``, ``format``, ``view``, ``return_dot``,
``channel_details``). Out: the DOT source; unless ``return_dot``, also the files Ray's (graphviz's
``render``) writes: the source at ``filename`` and the drawing at ``filename.<format>``, drawn by
Graphviz's ``dot`` program (``format="dot"`` needs no Graphviz: the source is the drawing).
``format="ascii"`` gives the plan as text instead, as Ray gives its ASCII drawing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings

from ...compiler.plan import DRIVER, Plan, StepKind

_FORMATS = ("dot", "png", "svg", "pdf", "jpeg", "jpg", "gif", "ascii")


def to_dot(plan: Plan, channel_details: bool = False) -> str:
    lines = ["digraph compiled_dag {", "  rankdir=LR;", '  node [shape=box, fontsize=10];',
             f'  "{DRIVER}" [shape=doublecircle, label="driver"];']
    hosts = dict(plan.hosts)
    for i, proc in enumerate(plan.processes):
        where = f" on host {hosts[proc.key]}" if proc.key in hosts else ""
        lines.append(f'  subgraph cluster_{i} {{ label="{_q(proc.key)} ({_q(proc.label)})'
                     f'{_q(where)}";')
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
            label = spec.line() if channel_details else f"ch{spec.id} {spec.kind.value}"
            lines.append(f'  "{_q(src)}" -> "{_q(dst)}" [label="{_q(label)}"];')
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


def render(plan: Plan, filename: str, format: str, view: bool, return_dot: bool,
           channel_details: bool) -> str:
    """``visualize()``'s work: see the module docstring."""
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if format == "ascii":
        if channel_details:
            raise ValueError("channel_details=True does not apply to format='ascii'; "
                             "the text lists every channel already")
        text = plan.as_text()
        if view:
            print(text)
        return text
    source = to_dot(plan, channel_details)
    if return_dot:
        return source
    with open(filename, "w") as f:             # graphviz's render() writes the source too
        f.write(source)
    target = f"{filename}.{format}"
    if format == "dot":
        shutil.copyfile(filename, target)
    else:
        exe = shutil.which("dot")
        if exe is None:
            raise ImportError(      # Ray's type: its drawing needs the graphviz package
                f"visualize(format={format!r}) needs Graphviz's `dot` program, which is not on "
                f"PATH; the DOT source is in {filename}.\n\nInstall Graphviz (e.g. `apt install "
                "graphviz`), or call visualize(format='dot') or visualize(return_dot=True).")
        subprocess.run([exe, f"-T{format}", "-o", target], input=source.encode(), check=True,
                       timeout=60)
    if view:
        _open(target)
    return source


def _open(path: str) -> None:
    opener = shutil.which("xdg-open") or shutil.which("open")
    if opener is None:
        warnings.warn(f"visualize(view=True): no viewer (xdg-open) here; the drawing is in "
                      f"{os.path.abspath(path)}", RuntimeWarning, stacklevel=3)
        return
    subprocess.Popen([opener, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
