"""The runtime suite: actor and task round trips, a 100 MB put/echo/get, and import time.

Cases and implementations, all measured in one run with every runtime started once and kept up
while rounds alternate between them (STYLE 8):

- ``actor_call``: call an actor method returning 1 and get it: headrace, ray, dask, mp-pipe.
- ``task``: submit a function returning 1 and get it: headrace, ray, dask, mp-pipe.
- ``put_get_100mb``: put a 100 MB array, pass the ref to an actor that returns it, get it back:
  headrace, ray; memcpy (``np.copyto`` into a preallocated array) is the reference bandwidth.
- ``import_headrace``: ``python -c "import headrace"`` minus ``python -c pass``, fresh processes.
- ``fresh_actor_calls``: calls 2, 3, ... of a fresh actor (made, and called once, untimed before
  each round): what a short-lived actor or a benchmark's first calls see. headrace, ray.
- ``nested_actor_call``: the driver calls actor A, which calls actor B and gets its value: the
  row is the whole round trip (three processes busy at once: on 2 cores they share them).
  headrace, ray.
- ``nested_in_actor``: the same nested call timed inside actor A (A calls B and gets the value,
  ``per_round`` times in a row, and returns the times): the issue's "A calls B" round trip,
  judged against ``actor_call``. headrace, ray.
- ``mixed_get``: ``get([compiled_ref, actor_ref])`` next to each part alone (headrace only: Ray
  cannot mix them); ``two_dags_get``: ``get`` over refs of two compiled DAGs, and each alone,
  with the floor of the same shape: two child processes echoing over bare shm rings, both
  written then both read ("floor-both"), and one alone ("floor-one").

``mp-pipe`` (a child process echoing over ``multiprocessing.Pipe``) is the floor for round trips.
Ray and Dask are imported lazily; a missing one gets rows saying "not installed".
"""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import common
from .common import Record, Target, alternate, missing, progress, summarize

SUITE = "runtime"
NUM_CPUS = 2
BIG_BYTES = 100_000_000
TIMEOUT_S = 60.0                      # bound on every single get: a hang becomes a failed row
CASES: dict[str, tuple[str, ...]] = {
    "actor_call": ("headrace", "ray", "dask", "mp-pipe"),
    "task": ("headrace", "ray", "dask", "mp-pipe"),
    "put_get_100mb": ("headrace", "ray", "memcpy"),
    "fresh_actor_calls": ("headrace", "ray"),
    "nested_actor_call": ("headrace", "ray"),
    "nested_in_actor": ("headrace", "ray"),
    "mixed_get": ("compiled+actor", "compiled", "actor"),
    "two_dags_get": ("dag1+dag2", "dag1", "dag2", "floor-both", "floor-one"),
}


@dataclass(frozen=True)
class Counts:
    """Iteration counts: small round trips, the 100 MB case, and fresh-interpreter imports."""

    rounds: int
    per_round: int
    warmup: int
    budget_s: float
    big_rounds: int
    big_per_round: int
    imports: int


FULL = Counts(rounds=10, per_round=300, warmup=50, budget_s=1.5, big_rounds=8, big_per_round=3,
              imports=10)
QUICK = Counts(rounds=4, per_round=100, warmup=20, budget_s=0.5, big_rounds=4, big_per_round=2,
               imports=5)


class Echo:
    """The actor of every runtime (wrapped by each one's ``remote``)."""

    def ping(self) -> int:
        return 1

    def echo(self, x: Any) -> Any:
        return x


class Relay:
    """Actor A of ``nested_actor_call``: calls actor B (its ``down``) and waits for it."""

    def __init__(self, down: Any, runtime: str) -> None:
        import importlib
        self.down, self.get = down, importlib.import_module(runtime).get

    def nested(self) -> int:
        return self.get(self.down.ping.remote(), timeout=TIMEOUT_S)

    def timed(self, n: int) -> list[float]:
        """Seconds of each of ``n`` nested calls in a row, timed here in A."""
        import time
        out = []
        for _ in range(n):
            start = time.perf_counter()
            self.get(self.down.ping.remote(), timeout=TIMEOUT_S)
            out.append(time.perf_counter() - start)
        return out


def one() -> int:
    """The task of every runtime."""
    return 1


def _ring_echo(inp: Any, out: Any) -> None:
    """shm-floor's child: echo values from one shm ring to another until None."""
    while (value := inp.read()) is not None:
        out.write(value)


def _pipe_child(conn: Any) -> None:
    """mp-pipe's child: answer "ping" with 1, call a function sent to it, stop on None."""
    while (msg := conn.recv()) is not None:
        conn.send(1 if msg == "ping" else msg())


class Impls:
    """Starts each implementation once, hands out one operation per case, stops them all."""

    def __init__(self, big: np.ndarray) -> None:
        self.big = big
        self.ops: dict[tuple[str, str], Callable[[], object]] = {}
        self.notes: dict[str, str] = {}          # impl -> why it has no rows
        self.stops: list[Callable[[], None]] = []
        #: (case, impl) -> (before, after) around each of its rounds
        self.hooks: dict[tuple[str, str], tuple[Callable[[], None], Callable[[], None]]] = {}
        #: (case, impl) -> a call that times ``n`` operations inside a worker, returning seconds
        self.inner: dict[tuple[str, str], Callable[[int], list[float]]] = {}

    def start(self, name: str, starter: Callable[[], None]) -> None:
        """Run ``starter``; an ImportError means "not installed", anything else "setup failed"."""
        try:
            starter()
        except ImportError as exc:
            self.notes[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # noqa: BLE001 - a broken peer becomes a row, not a crash
            self.notes[name] = f"setup failed: {type(exc).__name__}: {exc}"[:200]
        print(f"[{SUITE}] started {name}: {self.notes.get(name, 'ok')}", flush=True)

    def stop(self) -> None:
        common.stop_all(SUITE, self.stops)

    def mp_pipe(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_pipe_child, args=(child,), daemon=True)
        proc.start()

        def call(msg: Any) -> Any:
            parent.send(msg)
            if not parent.poll(TIMEOUT_S):
                raise TimeoutError("mp-pipe child did not answer")
            return parent.recv()

        def stop() -> None:
            parent.send(None)
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self.stops.append(stop)
        assert call("ping") == 1
        self.ops["actor_call", "mp-pipe"] = lambda: call("ping")
        self.ops["task", "mp-pipe"] = lambda: call(one)

    def shm_floor(self) -> None:
        """Two child processes echoing over bare shm rings (no runtime): the floor of a get
        over two producers ("floor-both": write both, read both) next to one ("floor-one")."""
        from headrace.channels.shm import ShmChannel
        ctx = mp.get_context("spawn")
        ends, procs = [], []
        for _ in range(2):
            to, back = ShmChannel(1, 8, 4096), ShmChannel(1, 8, 4096)
            procs.append(ctx.Process(target=_ring_echo, args=(to.reader(0), back.writer()),
                                     daemon=True))
            procs[-1].start()
            ends.append((to, to.writer(), back, back.reader(0)))

        def trip(which: tuple[int, ...]) -> None:
            for k in which:
                ends[k][1].write(1)
            for k in which:
                ends[k][3].read(timeout_s=TIMEOUT_S)

        def stop() -> None:
            for _, w, _, _ in ends:
                w.write(None, timeout_s=5)
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
            for to, _, back, _ in ends:
                to.close()
                back.close()
        self.stops.append(stop)
        trip((0, 1))
        self.ops["two_dags_get", "floor-both"] = lambda: trip((0, 1))
        self.ops["two_dags_get", "floor-one"] = lambda: trip((0,))

    def headrace(self) -> None:
        import headrace as hr
        hr.init(num_cpus=NUM_CPUS, log_to_driver=False)
        self.stops.append(hr.shutdown)
        actor, fn, big = hr.remote(Echo).remote(), hr.remote(one), self.big
        assert hr.get(actor.ping.remote(), timeout=TIMEOUT_S) == 1

        def put_get() -> None:
            out = hr.get(actor.echo.remote(hr.put(big)), timeout=TIMEOUT_S)
            assert out.nbytes == big.nbytes
        self.ops["actor_call", "headrace"] = lambda: hr.get(actor.ping.remote(), timeout=TIMEOUT_S)
        self.ops["task", "headrace"] = lambda: hr.get(fn.remote(), timeout=TIMEOUT_S)
        self.ops["put_get_100mb", "headrace"] = put_get
        self._fresh_actor("headrace", hr, hr.kill)
        self._nested("headrace", hr, actor)
        self._headrace_mixed(hr, actor)

    def _fresh_actor(self, name: str, mod: Any, kill: Callable[[Any], None]) -> None:
        """Each round calls a new actor that has answered one call already."""
        cls, held = mod.remote(Echo), []

        def before() -> None:
            held.append(cls.remote())
            mod.get(held[-1].ping.remote(), timeout=TIMEOUT_S)

        def after() -> None:
            kill(held.pop())
        self.ops["fresh_actor_calls", name] = lambda: mod.get(held[-1].ping.remote(),
                                                              timeout=TIMEOUT_S)
        self.hooks["fresh_actor_calls", name] = (before, after)

    def _nested(self, name: str, mod: Any, down: Any) -> None:
        relay = mod.remote(Relay).remote(down, name)
        assert mod.get(relay.nested.remote(), timeout=TIMEOUT_S) == 1
        self.ops["nested_actor_call", name] = lambda: mod.get(relay.nested.remote(),
                                                              timeout=TIMEOUT_S)
        self.inner["nested_in_actor", name] = lambda n: mod.get(relay.timed.remote(n),
                                                                timeout=TIMEOUT_S)

    def _headrace_mixed(self, hr: Any, actor: Any) -> None:
        """get() over refs of several producers, and each producer alone (same run)."""
        dags = []
        for _ in range(2):
            with hr.InputNode() as inp:
                dag = hr.remote(Echo).remote().echo.bind(inp)
            dags.append(dag.experimental_compile())
        self.stops.append(lambda: [d.teardown() for d in dags])
        one, two = dags
        get = hr.get
        self.ops["mixed_get", "compiled+actor"] = lambda: get(
            [one.execute(1), actor.ping.remote()], timeout=TIMEOUT_S)
        self.ops["mixed_get", "compiled"] = lambda: get(one.execute(1), timeout=TIMEOUT_S)
        self.ops["mixed_get", "actor"] = lambda: get(actor.ping.remote(), timeout=TIMEOUT_S)
        self.ops["two_dags_get", "dag1+dag2"] = lambda: get([one.execute(1), two.execute(2)],
                                                           timeout=TIMEOUT_S)
        self.ops["two_dags_get", "dag1"] = lambda: get(one.execute(1), timeout=TIMEOUT_S)
        self.ops["two_dags_get", "dag2"] = lambda: get(two.execute(2), timeout=TIMEOUT_S)

    def ray(self) -> None:
        import ray
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
        self.stops.append(ray.shutdown)
        actor, fn, big = ray.remote(Echo).remote(), ray.remote(one), self.big
        assert ray.get(actor.ping.remote(), timeout=TIMEOUT_S) == 1

        def put_get() -> None:
            out = ray.get(actor.echo.remote(ray.put(big)), timeout=TIMEOUT_S)
            assert out.nbytes == big.nbytes
        self.ops["actor_call", "ray"] = lambda: ray.get(actor.ping.remote(), timeout=TIMEOUT_S)
        self.ops["task", "ray"] = lambda: ray.get(fn.remote(), timeout=TIMEOUT_S)
        self.ops["put_get_100mb", "ray"] = put_get
        self._fresh_actor("ray", ray, ray.kill)
        self._nested("ray", ray, actor)

    def dask(self) -> None:
        from dask.distributed import Client, LocalCluster
        cluster = LocalCluster(processes=True, n_workers=NUM_CPUS, threads_per_worker=1,
                               dashboard_address=None)
        client = Client(cluster)
        self.stops.append(lambda: (client.close(), cluster.close()))
        actor = client.submit(Echo, actor=True).result(timeout=TIMEOUT_S)
        assert actor.ping().result(timeout=TIMEOUT_S) == 1
        self.ops["actor_call", "dask"] = lambda: actor.ping().result(timeout=TIMEOUT_S)
        self.ops["task", "dask"] = lambda: client.submit(one, pure=False).result(TIMEOUT_S)

    def memcpy(self) -> None:
        dst, big = np.empty_like(self.big), self.big
        self.ops["put_get_100mb", "memcpy"] = lambda: np.copyto(dst, big)


def measure_inner(impls: Impls, case: str, names: tuple[str, ...], counts: Counts,
                  ) -> list[Record]:
    """Rounds of ``per_round`` operations timed inside a worker, the impls taking turns."""
    samples: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(counts.rounds + 1):               # round 0 warms up, untimed
        for name in names if r % 2 else reversed(names):
            fn = impls.inner.get((case, name))
            if fn is None or name in errors:
                continue
            try:
                got = fn(counts.warmup if r == 0 else counts.per_round)
            except Exception as exc:  # noqa: BLE001 - a failing impl becomes a row
                errors[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
                continue
            if r:
                samples[name].extend(got)
    return [missing(case, n, impls.notes.get(n) or errors.get(n) or "not measured")
            if impls.notes.get(n) or errors.get(n) or not samples[n]
            else summarize(case, n, samples[n]) for n in names]


def measure_import(n: int) -> Record:
    """``import headrace`` in a fresh interpreter minus an empty one, paired and alternated."""
    with tempfile.TemporaryDirectory() as cwd:     # away from any source tree on sys.path
        def launch(code: str) -> Callable[[], object]:
            return lambda: subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True)
        samples, errors = alternate({"headrace": launch("import headrace"), "pass": launch("pass")},
                                    rounds=n, per_round=1, warmup=1, round_budget_s=float("inf"))
    if errors:
        return missing("import_headrace", "headrace", next(iter(errors.values())))
    diffs = [a - b for a, b in zip(samples["headrace"], samples["pass"], strict=True)]
    return summarize("import_headrace", "headrace", diffs, note="minus `python -c pass`")


def judge(records: list[Record]) -> list[Target]:
    """The issue's targets, judged on this run's records."""
    by = {(r.case, r.impl): r for r in records}

    def ratio(case: str, num: str, den: str, *, gbps: bool = False) -> float | None:
        a, b = by.get((case, num)), by.get((case, den))
        if a is None or b is None or a.median_us is None or b.median_us is None:
            return None
        return a.gbps / b.gbps if gbps and a.gbps and b.gbps else a.median_us / b.median_us

    targets = []
    for case, bound in (("actor_call", 0.2), ("task", 0.05)):     # issue 14: tasks 0.05x
        r = ratio(case, "headrace", "ray")
        targets.append(Target(f"headrace {case} median <= {bound:g}x ray's", None if r is None
                              else r <= bound, "ray not measured" if r is None else f"{r:.3f}x"))
    r = ratio("fresh_actor_calls", "headrace", "ray")
    fresh = by.get(("fresh_actor_calls", "headrace"))
    ok = r is not None and fresh is not None and fresh.p99_us is not None
    targets.append(Target("fresh actor, calls 2+: median <= 0.05x ray's, p99 <= 0.5 ms",
                          r <= 0.05 and fresh.p99_us <= 500 if ok else None,
                          f"{r:.3f}x, p99 {fresh.p99_us / 1e3:.2f} ms" if ok else "not measured"))
    for impl in ("headrace", "ray"):
        inner, call = by.get(("nested_in_actor", impl)), by.get(("actor_call", impl))
        ok = inner is not None and call is not None and inner.median_us and call.median_us
        if ok:
            r = inner.median_us / call.median_us
            detail = (f"{impl}: A calls B {inner.median_us:.1f} us (timed in A) / driver call "
                      f"{call.median_us:.1f} us = {r:.2f}x")
        targets.append(Target(f"{impl} nested actor call (A calls B) <= 2x the driver's call"
                              if impl == "headrace" else "ray nested actor call (reference)",
                              (r <= 2 if impl == "headrace" else None) if ok else None,
                              detail if ok else "not measured"))
        whole = by.get(("nested_actor_call", impl))
        if whole and call and whole.median_us and call.median_us:
            x = whole.median_us / call.median_us
            targets.append(Target(f"{impl} whole nested trip (driver -> A -> B) (reference)",
                                  None, f"{whole.median_us:.1f} us = {x:.2f}x the driver's call"))
    hn, rn = by.get(("nested_actor_call", "headrace")), by.get(("nested_actor_call", "ray"))
    if hn and rn and hn.median_us and rn.median_us:
        targets.append(Target("nested actor call round trip vs ray's (reference)", None,
                              f"{hn.median_us / rn.median_us:.2f}x"))
    r = ratio("put_get_100mb", "headrace", "memcpy", gbps=True)
    targets.append(Target("headrace put_get_100mb GB/s >= 0.5x memcpy GB/s", None if r is None
                          else r >= 0.5, "not measured" if r is None else f"{r:.2f}x memcpy"))
    for case, both, parts in (("mixed_get", "compiled+actor", ("compiled", "actor")),
                              ("two_dags_get", "dag1+dag2", ("dag1", "dag2"))):
        slower = max((by[case, p].median_us for p in parts
                      if (case, p) in by and by[case, p].median_us), default=None)
        whole = by.get((case, both))
        r = whole.median_us / slower if whole and whole.median_us and slower else None
        fb, fo = by.get((case, "floor-both")), by.get((case, "floor-one"))
        floor = f" (bare shm rings, same shape: {fb.median_us / fo.median_us:.2f}x)" \
            if fb and fo and fb.median_us and fo.median_us else ""
        targets.append(Target(f"{case}: get over both <= 1.2x the slower part alone",
                              None if r is None else r <= 1.2,
                              "not measured" if r is None else f"{r:.2f}x{floor}"))
    imp = by.get(("import_headrace", "headrace"))
    ok = imp is not None and imp.median_us is not None
    targets.append(Target("import headrace < 0.3 s", imp.median_us < 3e5 if ok else None,
                          f"{imp.median_us / 1e6:.3f} s" if ok else "not measured"))
    return targets


def run(quick: bool = False) -> list[Record]:
    """Run the suite, print progress, write ``bench/results/runtime.{json,host.json,md}``.

    Args:
        quick: Use the QUICK counts (about half a minute on 2 cores) instead of FULL.

    Returns:
        The records written to ``runtime.json``.
    """
    counts = QUICK if quick else FULL
    host = common.host_facts()
    print(f"[{SUITE}] {host['cpu']}, {host['cores']} cores, python {host['python']}"
          f"{', quick' if quick else ''}", flush=True)
    impls = Impls(np.full(BIG_BYTES // 8, 1.0))
    records: list[Record] = []
    try:
        for name, starter in (("mp-pipe", impls.mp_pipe), ("memcpy", impls.memcpy),
                              ("shm-floor", impls.shm_floor),
                              ("dask", impls.dask), ("headrace", impls.headrace),
                              ("ray", impls.ray)):
            impls.start(name, starter)
        for case, names in CASES.items():
            if any((case, n) in impls.inner for n in names):
                for rec in measure_inner(impls, case, names, counts):
                    records.append(rec)
                    progress(SUITE, rec)
                continue
            big = case == "put_get_100mb"
            fns = {n: impls.ops[case, n] for n in names if (case, n) in impls.ops}
            hooks = {n: impls.hooks[case, n] for n in names if (case, n) in impls.hooks}
            samples, errors = alternate(
                fns, rounds=counts.big_rounds if big else counts.rounds,
                per_round=counts.big_per_round if big else counts.per_round,
                warmup=2 if big else counts.warmup,
                round_budget_s=counts.budget_s * (4 if big else 1), hooks=hooks)
            records += common.case_records(SUITE, case, names, samples,
                                           {**errors, **impls.notes},
                                           nbytes=BIG_BYTES if big else None)
    finally:
        impls.stop()
    records.append(measure_import(counts.imports))
    progress(SUITE, records[-1])
    mem = next((r for r in records if r.impl == "memcpy" and r.gbps), None)
    for r in records:
        if r.case == "put_get_100mb" and r.impl != "memcpy" and r.gbps and mem:
            r.note = f"{r.gbps / mem.gbps:.2f}x memcpy GB/s"
    path = common.write_results(SUITE, records, host, judge(records), quick=quick)
    print(f"[{SUITE}] wrote {path.parent / SUITE}.json and {path}", flush=True)
    return records
