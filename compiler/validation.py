"""Checks a DagIR can be compiled, and the compile options; every error names node and bind site.

In: a ``DagIR``, an ``is_alive(actor_key)`` predicate (the runtime's), user options.
Out: the same DagIR (``validate``), ``PlanOptions`` (``check_options``), or ``DAGCompileError``.
Invariants: pure (no processes, sockets or shm); networkx is loaded here, on first compile,
never at ``import headrace``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..dag.context import DAGContext
from ..dag.nodes import DAGNode
from ..dag.ir import DagIR, NodeArg, Op, OpKind, is_used_whole
from ..exceptions import DAGCompileError
from .plan import PlanOptions


def validate(ir: DagIR, is_alive: Callable[[Any], bool] | None = None) -> DagIR:
    """Check ``ir``: acyclic, one InputNode, every op reaches an output, live actors, constants
    that pickle. Returns ``ir`` unchanged."""
    import networkx as nx
    graph = nx.DiGraph()
    graph.add_nodes_from(op.index for op in ir.ops)
    graph.add_edges_from((dep, op.index) for op in ir.ops for dep in op.deps)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise DAGCompileError(f"the DAG has a cycle through {[ir.ops[a].name for a, _ in cycle]}"
                              "; this is a bug in headrace (bind() cannot make cycles)")
    for op in ir.ops:       # first: a node hidden in an object hides the input too
        _check_op(op, is_alive)
    _check_input(ir)
    reach = set(ir.outputs)
    for out in ir.outputs:
        reach |= nx.ancestors(graph, out)
    for op in ir.ops:
        if op.index not in reach:
            raise DAGCompileError(
                f"node {op.name!r} (bound at {op.site}) is not an output and no output depends "
                "on it, so its result and any exception it raises would be lost.\n\n"
                f"Return it from the DAG, e.g. MultiOutputNode([..., {op.name}]), or remove "
                "the bind() call. (Every call bound inside a `with InputNode()` block is part "
                "of that DAG: build each DAG in a block of its own.)")
    return ir


def _check_input(ir: DagIR) -> None:
    inputs = ir.input_ops
    if len(inputs) > 1:
        sites = ", ".join(op.site for op in inputs)
        raise DAGCompileError(
            f"the DAG uses {len(inputs)} different InputNodes (made at {sites}); a compiled DAG "
            "has exactly one.\n\nCreate one `with InputNode() as inp:` and bind every node "
            "that needs the input to that `inp` (inp[0], inp.key for parts of it).")
    if not inputs:
        raise DAGCompileError(
            f"the DAG ending at {ir.root_site} has no InputNode, so execute() would have "
            "nothing to start an execution with.\n\nBind the first node to an input: "
            "`with InputNode() as inp: dag = f.bind(inp)`.")
    whole = is_used_whole(ir, inputs[0].index)
    parts = [op for op in ir.ops if op.kind is OpKind.ATTR and op.deps[0] == inputs[0].index]
    if whole and parts:     # Ray refuses this too: inp is one argument, inp[0] picks among many
        user = next((op for op in ir.ops
                     if inputs[0].index in op.deps and op.kind is not OpKind.ATTR), None)
        where = f"{user.name!r} (bound at {user.site})" if user else "an output"
        raise DAGCompileError(
            f"the DAG uses its InputNode whole (in {where}) and parts of it ({parts[0].name}, "
            f"bound at {parts[0].site}): execute() would have to take one argument and "
            "several at once.\n\nUse one form (Ray's rule too): either pass one value and "
            "bind `inp` itself, or bind only inp[0], inp[1], inp.key, ...")


def _check_op(op: Op, is_alive: Callable[[Any], bool] | None) -> None:
    parts = op.parts or (op,)
    for part in parts:
        if part.kind is OpKind.METHOD and is_alive is not None and not is_alive(part.actor):
            raise DAGCompileError(
                f"node {part.name!r} (bound at {part.site}) calls an actor that is no longer "
                "alive, so the DAG could never run.\n\nCreate a new actor and bind its method "
                "instead.")
        for where, value in _constants(part):
            try:
                hidden = _hidden_nodes(value)
            except Exception as exc:            # noqa: BLE001 - any pickling failure
                raise DAGCompileError(
                    f"node {part.name!r} (bound at {part.site}): {where} is a "
                    f"{type(value).__name__} that cannot be pickled ({exc}), so it cannot be "
                    "sent to the process that runs the node.\n\nPass a picklable value, or "
                    "create the object inside the function or actor.") from exc
            if hidden:
                raise DAGCompileError(
                    f"node {part.name!r} (bound at {part.site}): {where} is a "
                    f"{type(value).__name__} holding the DAG node {hidden[0]._name!r} (bound at "
                    f"{hidden[0]._site}) inside it, where the compiler cannot see it: nodes are "
                    "found as arguments and inside lists, tuples and dicts only.\n\nPass the "
                    "node itself (or in a list or dict) and build the "
                    f"{type(value).__name__} inside the function or method.")


def _hidden_nodes(value: Any) -> list[Any]:
    """The DAG nodes inside ``value`` (an object the argument walker does not open), found by
    pickling it as cloudpickle would; raises what pickling raises."""
    import io

    import cloudpickle      # NOTE: not at import time: `import headrace` stays light
    found: list[Any] = []

    class _Scan(cloudpickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, DAGNode):
                found.append(obj)
                return len(found)           # not pickled: it would refuse
            return None
    _Scan(io.BytesIO(), protocol=5).dump(value)
    return found


def _constants(op: Op) -> list[tuple[str, Any]]:
    found = [(f"argument {i}", a) for i, a in enumerate(op.args)]
    found += [(f"keyword argument {k!r}", v) for k, v in op.kwargs]
    return [(where, v) for where, v in found if not _only_nodes(v)]


def _only_nodes(value: Any) -> bool:
    return isinstance(value, NodeArg) or value is None or isinstance(value, (int, float, str))


_OPTION_TYPES: dict[str, Any] = {
    "max_inflight_executions": int, "buffer_size_bytes": int,
    "submit_timeout_s": (int, float, type(None)),
    "max_buffered_results": (int, type(None)), "channel": str, "sync": str, "profile": (bool, str),
}
_CHOICES = {"channel": ("auto", "shm", "socket"), "sync": ("auto", "spin", "block")}


#: Ray's spelling of our options (``dag.experimental_compile(_max_inflight_executions=...)``).
RAY_ALIASES = {"_max_inflight_executions": "max_inflight_executions",
               "_submit_timeout": "submit_timeout_s", "_buffer_size_bytes": "buffer_size_bytes",
               "_max_buffered_results": "max_buffered_results"}


def _from_ray(options: dict[str, Any]) -> dict[str, Any]:
    """Ray's option names as ours; Ray's GPU options refused where they would need a GPU."""
    out = {k: v for k, v in options.items() if k not in RAY_ALIASES and k not in _RAY_ONLY}
    for ray_name, ours in RAY_ALIASES.items():
        if ray_name in options:
            if ours in options and options[ours] != options[ray_name]:
                raise TypeError(f"compile options {ray_name}={options[ray_name]!r} and "
                                f"{ours}={options[ours]!r} disagree; {ray_name} is Ray's name "
                                f"for {ours}: pass one of them")
            out[ours] = options[ray_name]
    if not isinstance(options.get("enable_asyncio", False), bool):
        raise TypeError(f"compile option enable_asyncio must be a bool, got "
                        f"{options['enable_asyncio']!r}")
    gpu = {k: options[k] for k in ("_overlap_gpu_communication", "_default_communicator")
           if k in options and options[k] not in (None, False, "create")}
    if gpu:
        raise ValueError(f"compile option(s) {', '.join(f'{k}={v!r}' for k, v in gpu.items())} "
                         "need GPUs and a GPU communicator; headrace's compiled DAGs move "
                         "values through shared memory and sockets on CPUs.\n\nLeave them out "
                         "(or at their defaults: False, 'create').")
    return out


#: Ray options that change nothing here (execute_async always works; no GPU transport).
_RAY_ONLY = ("enable_asyncio", "_overlap_gpu_communication", "_default_communicator")


def _context_defaults() -> dict[str, Any]:
    """The options ``DAGContext.get_current()`` sets (Ray's process-wide defaults)."""
    ctx = DAGContext.get_current()
    if ctx.overlap_gpu_communication:
        raise ValueError("DAGContext.get_current().overlap_gpu_communication is True, which "
                         "needs GPUs; headrace's compiled DAGs move values through shared "
                         "memory and sockets on CPUs.\n\nSet it back to False.")
    return {"submit_timeout_s": ctx.submit_timeout, "buffer_size_bytes": ctx.buffer_size_bytes,
            "max_inflight_executions": ctx.max_inflight_executions,
            "max_buffered_results": ctx.max_buffered_results}


def check_options(options: dict[str, Any]) -> PlanOptions:
    """The compile options as ``PlanOptions``; a clear ``ValueError``/``TypeError`` otherwise.
    Ray's names are accepted too (``RAY_ALIASES``, ``enable_asyncio``)."""
    options = {**_context_defaults(), **_from_ray(options)}
    unknown = sorted(set(options) - set(_OPTION_TYPES))
    if unknown:
        raise TypeError(f"unknown compile option(s) {', '.join(map(repr, unknown))}; valid "
                        f"options are {', '.join(sorted(_OPTION_TYPES))}")
    for name, value in options.items():
        if not isinstance(value, _OPTION_TYPES[name]) or (
                isinstance(value, bool) and name != "profile"):
            raise TypeError(f"compile option {name} must be {_type_name(_OPTION_TYPES[name])}, "
                            f"got {type(value).__name__}: {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"compile option {name} must be one of {_CHOICES[name]}, "
                             f"got {value!r}")
    opts = PlanOptions(**options)
    if opts.profile == "":
        raise ValueError("compile option profile must be True, False or a file path, got ''")
    if opts.max_inflight_executions < 1:
        raise ValueError(f"max_inflight_executions must be >= 1, got "
                         f"{opts.max_inflight_executions}")
    if opts.buffer_size_bytes < 64:
        raise ValueError(f"buffer_size_bytes must be >= 64, got {opts.buffer_size_bytes}")
    if opts.submit_timeout_s is not None and not opts.submit_timeout_s >= 0:      # NaN too
        raise ValueError(f"submit_timeout_s must be >= 0, got {opts.submit_timeout_s}")
    if opts.max_buffered_results is not None and opts.max_buffered_results < 0:
        raise ValueError(f"max_buffered_results must be >= 0 or None, got "
                         f"{opts.max_buffered_results}")
    return opts


def _type_name(types: Any) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)
