"""``lower``: a DagIR through every compiler pass to a Plan (DESIGN 3).

In: a traced ``DagIR``, user compile options, the runtime's ``is_alive(actor_key)``.
Out: a frozen ``Plan``. Pure: nothing here opens a process, a socket or a segment.

  DagIR ─validate─▶ DagIR ─fuse_chains─▶ DagIR ─place─▶ {op: process}
        ─plan_channels─▶ ChannelSpecs ─schedule─▶ ProcessPlans ─▶ Plan
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _config
from ..dag.ir import DagIR, Op, OpKind
from .fusion import fuse_chains
from .placement import place, plan_channels
from .plan import Plan, TaskSpec
from .scheduling import schedule, verify
from .validation import check_options, validate


def lower(ir: DagIR, options: dict[str, Any] | None = None,
          is_alive: Callable[[Any], bool] | None = None,
          host_of: Callable[[str], str] | None = None) -> Plan:
    """Compile ``ir`` to a Plan.

    ``host_of``: the host of a process (by key; "" for the driver's host), where the runtime
    spans several (a Dask cluster); channels between hosts are socket channels.

    Raises:
        DAGCompileError: the DAG cannot run (the message names the node and its bind site).
        TypeError, ValueError: a bad compile option.
    """
    opts = check_options(options or {})
    fused = fuse_chains(validate(ir, is_alive))
    placement = place(fused)
    hosts = {key: h for key in set(placement.values()) if (h := host_of(key) if host_of else "")}
    channels, input_channel, input_splits, output_channels = plan_channels(fused, placement, opts,
                                                                           hosts)
    processes = schedule(fused, placement, channels)
    if _config.CHECKS:
        verify(processes, channels)
    return Plan(tuple(task_spec(op) for op in fused.ops), processes, channels, input_channel,
                input_splits, fused.outputs, output_channels, fused.multi, opts,
                tuple(sorted(hosts.items())))


def task_spec(op: Op) -> TaskSpec:
    """An op as a process needs it: the function as bytes, no handle."""
    blob = op.target.blob if op.kind is OpKind.FUNCTION else None
    return TaskSpec(op.index, op.kind, op.name, op.site, op.args, op.kwargs, op.deps,
                    op.method, blob, op.key, op.access,
                    tuple(task_spec(p) for p in op.parts), op.num_returns)
