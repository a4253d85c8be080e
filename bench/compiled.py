"""The compiled suite: headrace compiled DAGs side by side with Ray Compiled Graphs and Ray actors.

Cases (one run; rounds alternate between implementations, STYLE 8). Where a case says so, the
same graph also runs uncompiled, as ordinary actor calls passing refs along (``headrace-actors``,
``ray-actors``): what compiling buys in each framework.

- ``rt_1actor``: execute an int through one actor that returns it, and get it.
- ``chain_3actor``: the same through three actors in a chain (four processes on two cores).
- ``pipelined_1actor`` / ``pipelined_3actor``: keep 10 executions in flight; µs per execution.
- ``echo_1mb`` / ``echo_100mb``: a numpy array through one actor and back.
- ``echo_arrow``: a 100,000-row pyarrow Table (two columns) through one actor and back.
- ``multi_args_8actor``: Ray's microbenchmark "multi-args": 8 actors, actor i reads argument i
  of ``execute(*[1 MiB array] * 8)``, 10 executions in flight; ``floor-memcpy`` copies the 8
  arguments once per execution, as any framework must.
- ``teardown``: ``teardown()`` of a compiled 1-actor DAG.
- ``idle_cpu``: CPU (cores) burnt by the DAG's processes over 1 s, 10 ms after the last
  execution (reported in the ``gbps`` column as cores; lower is better).
- ``compile_1000``: trace + lower a 1,000-node DAG (headrace only: it is pure).

Ray Compiled Graphs actors spin while their graph is compiled, so each implementation's graph
is compiled just before its round and torn down after it (untimed hooks): no peer's spinning
steals the cores from another's round. Ray is imported lazily; without it, rows say so.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import common
from .common import Record, Target, alternate, missing, progress, summarize

SUITE = "compiled"
TIMEOUT_S = 60.0
INFLIGHT = 10
MULTI_ARGS = 8          # Ray's microbenchmark "multi-args": 8 actors, a 1 MiB array each


@dataclass
class Counts:
    rounds: int
    per_round: int
    warmup: int
    budget_s: float


FULL = Counts(rounds=4, per_round=2000, warmup=300, budget_s=3.0)
QUICK = Counts(rounds=2, per_round=500, warmup=100, budget_s=1.0)


class Echo:
    """The actor of every case (headrace and Ray each wrap it with their own ``remote``)."""

    def echo(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()

    def nbytes(self, x: Any) -> int:
        return int(x.nbytes)


class Graphs:
    """Builds one graph per case for one framework (headrace or Ray), compiled on demand."""

    def __init__(self, name: str, hr_mod: Any, input_node: Any, cls: Any,
                 multi_output: Any) -> None:
        self.name, self.mod, self.InputNode = name, hr_mod, input_node
        self.MultiOutputNode = multi_output
        self.cls = cls
        self.actors = [cls.remote() for _ in range(3)]
        self.pids = self.mod.get([a.pid.remote() for a in self.actors], timeout=TIMEOUT_S)
        self.compiled: Any = None

    def dag(self, shape: int | str) -> Any:
        """A chain of ``shape`` actors; ``"fan2"``: two actors fed the input, two outputs;
        ``"args8"``: Ray's multi-args case, 8 actors, actor i reads argument i."""
        if shape == "args8":
            while len(self.actors) < MULTI_ARGS:
                self.actors.append(self.cls.remote())
        with self.InputNode() as inp:
            if shape == "fan2":
                return self.MultiOutputNode([a.echo.bind(inp) for a in self.actors[:2]])
            if shape == "args8":
                return self.MultiOutputNode([a.nbytes.bind(inp[i]) for i, a in
                                             enumerate(self.actors[:MULTI_ARGS])])
            node = inp
            for a in self.actors[:shape]:
                node = a.echo.bind(node)
        return node

    def hooks(self, shape: int | str) -> tuple[Callable[[], None], Callable[[], None]]:
        def before() -> None:
            common.settle()         # the other implementation's processes are quiet again
            self.compiled = self.dag(shape).experimental_compile()

        def after() -> None:
            self.compiled.teardown()
            self.compiled = None
        return before, after

    def one(self, value: Any) -> Callable[[], object]:
        get = self.mod.get
        return lambda: get(self.compiled.execute(value), timeout=TIMEOUT_S)

    def multi_args(self, args: list[Any]) -> Callable[[], object]:
        """``INFLIGHT`` executions of ``execute(*args)`` submitted, then every output read."""
        get = self.mod.get

        def op() -> object:
            refs = [self.compiled.execute(*args) for _ in range(INFLIGHT)]
            return [get(r, timeout=TIMEOUT_S) for r in refs]
        return op

    def pipelined(self) -> Callable[[], object]:
        get = self.mod.get

        def op() -> object:
            refs = [self.compiled.execute(i) for i in range(INFLIGHT)]
            return [get(r, timeout=TIMEOUT_S) for r in refs]
        return op

    def actor_chain(self, n_actors: int, value: Any, in_flight: int) -> Callable[[], object]:
        """The same graph without compiling: ordinary actor calls passing refs along."""
        get = self.mod.get

        def op() -> object:
            refs = []
            for _ in range(in_flight):
                ref = value
                for a in self.actors[:n_actors]:
                    ref = a.echo.remote(ref)
                refs.append(ref)
            return get(refs, timeout=TIMEOUT_S)
        return op


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by every thread of ``pids`` (schedstat: ns, not 10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


def idle_cpu(g: Graphs) -> Record:
    """Cores used by the graph's actors over 1 s, starting 10 ms after the last execution."""
    g.compiled = g.dag(3).experimental_compile()
    try:
        for i in range(200):
            g.mod.get(g.compiled.execute(i), timeout=TIMEOUT_S)
        time.sleep(0.01)
        c0, t0 = _cpu_s(g.pids), time.monotonic()
        time.sleep(1.0)
        cores = (_cpu_s(g.pids) - c0) / (time.monotonic() - t0)
    finally:
        g.compiled.teardown()
        g.compiled = None
    return Record("idle_cpu", g.name, None, None, cores, 1, f"{cores:.4f} cores")


def teardown_time(g: Graphs, n: int) -> list[float]:
    out = []
    for _ in range(n):
        compiled = g.dag(1).experimental_compile()
        g.mod.get(compiled.execute(1), timeout=TIMEOUT_S)
        t0 = time.perf_counter()
        compiled.teardown()
        out.append(time.perf_counter() - t0)
    return out


_ACTORS = {"headrace": "headrace-actors", "ray-cg": "ray-actors"}


def compile_1000(n: int) -> list[float]:
    from headrace.compiler import lower
    from headrace.dag import ClassMethodNode, InputNode, trace
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with InputNode() as inp:
            node = inp
            for i in range(1000):
                node = ClassMethodNode(None, f"a{i % 8}", f"a{i % 8}", "echo", 1, (node,), {},
                                       site="bench")
        lower(trace(node))
        out.append(time.perf_counter() - t0)
    return out


def _headrace() -> Graphs:
    import headrace as hr
    hr.init(num_cpus=2, ignore_reinit_error=True)
    return Graphs("headrace", hr, hr.InputNode, hr.remote(Echo), hr.MultiOutputNode)


def _ray() -> Graphs:
    import ray
    from ray.dag import InputNode, MultiOutputNode
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             ignore_reinit_error=True)
    return Graphs("ray-cg", ray, InputNode, ray.remote(Echo), MultiOutputNode)


def judge(records: list[Record]) -> list[Target]:
    by = {(r.case, r.impl): r for r in records}

    def ratio(case: str) -> float | None:
        a, b = by.get((case, "headrace")), by.get((case, "ray-cg"))
        if a is None or b is None or not a.median_us or not b.median_us:
            return None
        return a.median_us / b.median_us

    targets = []
    for case, limit in (("rt_1actor", 0.12), ("chain_3actor", 0.12), ("echo_1mb", 0.15),
                        ("echo_100mb", 0.5), ("echo_arrow", 0.3)):
        r = ratio(case)
        targets.append(Target(f"{case} median <= {limit}x Ray CG", None if r is None
                              else r <= limit, "ray not measured" if r is None else f"{r:.2f}x"))
    for case, times in (("pipelined_1actor", 5), ("pipelined_3actor", 5),
                        ("multi_args_8actor", 2)):
        r = ratio(case)
        targets.append(Target(f"{case} throughput >= {times}x Ray CG", None if r is None
                              else 1 / r >= times, "not measured" if r is None
                              else f"{1 / r:.2f}x Ray's executions/s"))
    idle = by.get(("idle_cpu", "headrace"))
    targets.append(Target("idle CPU 10 ms after the last execution: 0.0 cores",
                          None if idle is None else idle.gbps < 0.005,
                          "not measured" if idle is None else f"{idle.gbps:.4f} cores"))
    floor, multi = by.get(("multi_args_8actor", "floor-memcpy")), by.get(("multi_args_8actor",
                                                                           "headrace"))
    if floor and multi and floor.median_us and multi.median_us:
        targets.append(Target("multi_args_8actor vs copying its arguments once (reference)", None,
                              f"{multi.median_us / floor.median_us:.2f}x the copy's time"))
    for case, bare in (("rt_1actor", "floor-shm-channels"), ("chain_3actor", "floor-shm-chain"),
                       ("echo_1mb", "floor-shm-channels")):
        floor, ours, ray = (by.get((case, n)) for n in (bare, "headrace", "ray-cg"))
        if floor and ours and ray and floor.median_us and ours.median_us and ray.median_us:
            vs_ray, vs_floor = floor.median_us / ray.median_us, ours.median_us / floor.median_us
            targets.append(Target(
                f"{case}: bare shm rings of the same shape vs Ray CG (reference)", None,
                f"{vs_ray:.2f}x (headrace {vs_floor:.2f}x the bare rings)"))
    comp = by.get(("compile_1000", "headrace"))
    targets.append(Target("compile 1,000 nodes < 0.5 s", None if comp is None
                          else comp.median_us < 5e5,
                          "not measured" if comp is None else f"{comp.median_us / 1e6:.3f} s"))
    return targets


def _plot(records: list[Record]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by = {(r.case, r.impl): r for r in records}
    cases = [c for c in dict.fromkeys(r.case for r in records)
             if (c, "headrace") in by and (c, "ray-cg") in by
             and by[c, "headrace"].median_us and by[c, "ray-cg"].median_us]
    ratios = [by[c, "headrace"].median_us / by[c, "ray-cg"].median_us for c in cases]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(cases, ratios, color="#3b7dd8")
    ax.axvline(1.0, color="grey", linestyle="--")
    ax.set_xlabel("headrace median / Ray Compiled Graphs median (lower is faster)")
    for y, r in enumerate(ratios):
        ax.text(r, y, f" {r:.2f}x", va="center")
    fig.tight_layout()
    fig.savefig(common.RESULTS_DIR / f"{SUITE}.png", dpi=100)
    plt.close(fig)


def run(quick: bool = False) -> list[Record]:
    """Run the suite; write ``bench/results/compiled.{json,host.json,md,png}``."""
    counts = QUICK if quick else FULL
    host = common.host_facts()
    print(f"[{SUITE}] {host['cpu']}, {host['cores']} cores{', quick' if quick else ''}",
          flush=True)
    graphs: dict[str, Graphs] = {}
    notes: dict[str, str] = {}
    for name, make in (("headrace", _headrace), ("ray-cg", _ray)):
        try:
            graphs[name] = make()
        except Exception as exc:        # noqa: BLE001 - a missing peer becomes a row
            notes[name] = f"not available: {type(exc).__name__}: {exc}"[:160]
    records: list[Record] = []
    small, mb = 1, np.ones(1 << 17)
    args8 = [np.full(1 << 17, float(i)) for i in range(MULTI_ARGS)]     # distinct 1 MiB arrays
    big = np.ones(100_000_000 // 8)
    try:
        import pyarrow as pa
        table = pa.table({"a": np.arange(100_000), "b": np.ones(100_000)})
    except ImportError:
        table = None
    # case -> (actors, the compiled op, bytes moved, executions per op, the value with which
    # ordinary actor calls run the same graph (None: no uncompiled row))
    cases: dict[str, tuple[int, Callable[[Graphs], Callable[[], object]], int | None, int,
                           Any]] = {
        "rt_1actor": (1, lambda g: g.one(small), None, 1, small),
        "chain_3actor": (3, lambda g: g.one(small), None, 1, small),
        "fanout_2actor": ("fan2", lambda g: g.one(small), None, 1, None),
        "pipelined_1actor": (1, lambda g: g.pipelined(), None, INFLIGHT, small),
        "pipelined_3actor": (3, lambda g: g.pipelined(), None, INFLIGHT, small),
        "echo_1mb": (1, lambda g: g.one(mb), mb.nbytes, 1, mb),
        "echo_100mb": (1, lambda g: g.one(big), big.nbytes, 1, None),
        "echo_arrow": (1, lambda g: g.one(table), None, 1, None),
        "multi_args_8actor": ("args8", lambda g: g.multi_args(args8), None, INFLIGHT, None),
    }
    floors = _floors(mb, big)               # what one process to another costs at the least
    copy_args = _copy_floor(args8)
    try:
        for case, (n_actors, make_op, nbytes, per_op, plain) in cases.items():
            if case == "echo_arrow" and table is None:
                continue
            heavy = case == "echo_100mb"
            fns = {name: make_op(g) for name, g in graphs.items()}
            hooks = {name: g.hooks(n_actors) for name, g in graphs.items()}
            if plain is not None:           # the same graph as ordinary actor calls
                for name, g in graphs.items():
                    label = _ACTORS[name]
                    fns[label] = g.actor_chain(n_actors, plain, per_op)
                    hooks[label] = (common.settle, lambda: None)
            for label, peer in floors.items():
                if _FLOOR_OPS.get(case) in peer.ops:
                    fns[label] = peer.ops[_FLOOR_OPS[case]]
                    hooks[label] = (peer.resume, peer.park)
            if case == "multi_args_8actor":
                fns["floor-memcpy"] = copy_args
            samples, errors = alternate(
                fns, rounds=counts.rounds, per_round=20 if heavy else counts.per_round // per_op,
                warmup=2 if heavy else counts.warmup // per_op,
                round_budget_s=counts.budget_s * (3 if heavy else 1), hooks=hooks)
            for name in ("headrace", "ray-cg", *(_ACTORS.values() if plain is not None else ()),
                         *(f for f in (*floors, "floor-memcpy") if f in fns)):
                if name in _ACTORS.values() and name not in fns:
                    continue                # its framework is missing: its -cg row says so
                note = notes.get(name) or errors.get(name)
                got = [s / per_op for s in samples.get(name, [])]
                rec = missing(case, name, note) if note or not got else \
                    summarize(case, name, got, nbytes=nbytes)
                if per_op > 1 and rec.median_us:
                    rec.note = f"{1e6 / rec.median_us:,.0f} executions/s"
                records.append(rec)
                progress(SUITE, rec)
        for name, g in graphs.items():
            records.append(summarize("teardown", name, teardown_time(g, 5 if quick else 10)))
            progress(SUITE, records[-1])
        for g in graphs.values():
            records.append(idle_cpu(g))
            progress(SUITE, records[-1])
        records.append(summarize("compile_1000", "headrace", compile_1000(3 if quick else 5)))
        progress(SUITE, records[-1])
    finally:
        for peer in floors.values():
            peer.stop()
        _stop(graphs)
    path = common.write_results(SUITE, records, host, judge(records), quick=quick,
                                table=lambda rs: common.case_table(rs, base="ray-cg"),
                                legend="Ratios: `impl / ray-cg` below 1.0 means faster than "
                                       "Ray Compiled Graphs. idle_cpu is in cores (GB/s column).")
    _plot(records)
    print(f"[{SUITE}] wrote {path}", flush=True)
    return records


#: The floor rows: a round trip over two shm channels (no runtime, no DAG), and over mp.Pipe.
_FLOOR_OPS = {"rt_1actor": "roundtrip_int", "echo_1mb": "roundtrip_1mb",
              "chain_3actor": "chain_int"}


def _copy_floor(args: list[np.ndarray]) -> Callable[[], object]:
    """``floor-memcpy`` of multi-args: its arguments copied once per execution (as any
    framework must, into memory its readers share), ``INFLIGHT`` executions to slots of their
    own, as the rings hold them."""
    dst = np.empty((INFLIGHT, len(args), *args[0].shape), args[0].dtype)

    def op() -> None:
        for k in range(INFLIGHT):
            for i, a in enumerate(args):
                np.copyto(dst[k, i], a)
    return op


def _floors(mb: np.ndarray, big: np.ndarray) -> dict[str, Any]:
    """Echo children of ``bench.channels`` (parked between their rounds), by row name."""
    from .channels import _chain_peer, _channel_peer, _make_shm, _pipe_peer
    floors: dict[str, Any] = {}
    from headrace import _config
    # the rings of a compiled DAG, as the DAG opens them (its spin window), with nothing else
    shm = _make_shm("auto", _config.DAG_SPIN_US)
    for label, start in (("floor-shm-channels", lambda: _channel_peer(None, shm, mb, big)),
                         ("floor-mp-pipe", lambda: _pipe_peer(None, mb, big)),
                         ("floor-shm-chain", lambda: _chain_peer(shm, 3))):
        try:
            floors[label] = start()
            floors[label].park()
        except Exception as exc:        # noqa: BLE001 - no floor row, not a crashed suite
            print(f"[{SUITE}] {label} not measured: {type(exc).__name__}: {exc}", flush=True)
    return floors


def _remove_ray_semaphores(wait_s: float = 5.0) -> None:
    """Ray CG leaves the named semaphores of its channels (``/dev/shm/sem.hdr<pid>-*``,
    ``sem.obj<pid>-*``) behind after shutdown; remove those whose process has exited."""
    pattern = re.compile(r"sem\.(?:hdr|obj)(\d+)-")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            names = os.listdir("/dev/shm")
        except OSError:
            return
        owners = {n: int(m.group(1)) for n in names if (m := pattern.match(n))}
        alive = {pid for pid in set(owners.values()) if os.path.exists(f"/proc/{pid}")}
        for name, pid in owners.items():
            if pid not in alive:
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass
        if not alive or time.monotonic() >= deadline:
            return
        time.sleep(0.1)         # Ray's processes are still exiting


def _stop(graphs: dict[str, Graphs]) -> None:
    if "ray-cg" in graphs:
        import ray
        ray.shutdown()
        _remove_ray_semaphores()
    if "headrace" in graphs:
        import headrace as hr
        hr.shutdown()
