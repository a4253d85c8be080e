"""The soak suite: many executions in a row, watching memory, fds and shm segments for leaks.

Phases (one ``hr.init``, two actors, run one after another; every result is checked):

- ``chain_2actor``: 1,000,000 executions of a compiled chain ``b.inc(a.inc(i))``; expect ``i + 2``.
- ``array_100kb``: 50,000 executions of a compiled chain ``b.echo(a.echo(arr))`` with a 100 KB
  float64 array whose first and last elements are the execution index; the whole array is
  compared with what was sent.
- ``actor_calls``: 200,000 ordinary actor calls ``(a, b)[i % 2].inc.remote(i)``; expect ``i + 1``.

Executions go in batches of ``BATCH`` (submitted together, then got in order), so several are in
flight. At 0 %, 5 %, ..., 100 % of each phase the suite samples every process it started (the
driver, both actors and the idle pool workers: VmRSS and its anon/shmem parts, open fds), the
number of its children, and the ``/dev/shm/headrace-<pid>-*`` segments owned by those processes
(segments of other headrace users on the host, e.g. a concurrent test run, are counted apart and
not judged). The 5 % sample is the baseline: the first 5 % of a phase is its warm-up. Growth is
the 100 % sample minus the baseline. Latency is per execution, from its submit to its value
(batched, so it includes waiting behind the rest of the batch).

No peer: this is a leak and correctness soak of headrace alone, so STYLE 8's ratios do not apply.
``--quick`` runs a fifth of every phase.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import common
from .common import Record, Target

SUITE = "soak"
TIMEOUT_S = 30.0
BATCH = 8
STEPS = 20                          # samples every 100 / STEPS percent
BASELINE_STEP = 1                   # the 5 % sample is the baseline (the first 5 % is warm-up)
ARRAY_BYTES = 100_000
RSS_LIMIT_MB = 2.0
MAX_ERRORS = 100                    # a phase stops after this many errors (a dead DAG, say)
JUDGED = ("driver", "actor-a", "actor-b")   # the processes the targets hold to; workers idle
FULL = {"chain_2actor": 1_000_000, "array_100kb": 50_000, "actor_calls": 200_000}
QUICK_DIVISOR = 5


class Stage:
    """The actor of every phase."""

    def inc(self, x: int) -> int:
        return x + 1

    def echo(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Phase:
    """One phase's outcome: counts, per-execution latency (s) and the sampled curve."""

    name: str
    n: int
    done: int = 0
    wrong: int = 0
    errors: int = 0
    first_problem: str | None = None
    wall_s: float = 0.0
    latency_s: Any = None               # np.ndarray, NaN where not measured
    samples: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if self.first_problem is None:
            self.first_problem = text[:200]


# --- sampling (/proc and /dev/shm only: no psutil) ---

def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a /proc scan)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def _proc(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssShmem (kB) and open fds of ``pid``; None if it is gone."""
    keys = {"VmRSS:": "rss_kb", "RssAnon:": "anon_kb", "RssShmem:": "shmem_kb"}
    out = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                key = line.split(None, 1)[0]
                if key in keys:
                    out[keys[key]] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return out


def _segments(owners: set[int]) -> tuple[int, int]:
    """(segments ``/dev/shm/headrace-<pid>-*`` owned by ``owners``, all headrace segments)."""
    ours = total = 0
    for name in os.listdir("/dev/shm"):
        if not name.startswith("headrace-"):
            continue
        total += 1
        owner = name.split("-")[1]
        if owner.isdigit() and int(owner) in owners:
            ours += 1
    return ours, total


class Sampler:
    """Samples the driver, its labelled children and their shm segments."""

    def __init__(self, actor_pids: dict[str, int]) -> None:
        self.driver = os.getpid()
        self.labels = {self.driver: "driver", **{pid: lbl for lbl, pid in actor_pids.items()}}
        workers = [p for p in _children(self.driver) if p not in self.labels]
        self.labels.update({pid: f"worker-{k}" for k, pid in enumerate(workers, 1)})
        self.seen = set(self.labels)
        self.t0 = time.monotonic()

    def sample(self, pct: float, executions: int) -> dict[str, Any]:
        kids = _children(self.driver)
        self.seen.update(kids)
        for pid in kids:        # a process started mid-run gets a label (and shows up as a leak)
            self.labels.setdefault(pid, f"new-{pid}")
        procs = {lbl: _proc(pid) for pid, lbl in self.labels.items()}
        ours, total = _segments({self.driver, *kids})
        return {"pct": pct, "executions": executions,
                "t_s": round(time.monotonic() - self.t0, 3), "children": len(kids),
                "shm_ours": ours, "shm_all": total, "procs": procs}


# --- phases ---

def _run_phase(phase: Phase, sampler: Sampler, submit: Callable[[int], Any],
               check: Callable[[int, Any], bool], get: Callable[..., Any]) -> None:
    """Run ``phase.n`` executions in batches, checking every value and sampling every 5 %."""
    lat = np.full(phase.n, np.nan)     # allocated and touched before the first sample
    phase.latency_s = lat
    clock = time.perf_counter
    marks = [phase.n * k // STEPS for k in range(STEPS + 1)]
    phase.samples.append(sampler.sample(0.0, 0))
    t_start, i = clock(), 0
    for step in range(1, STEPS + 1):
        while i < marks[step] and phase.errors < MAX_ERRORS:
            end = min(i + BATCH, marks[step])
            refs, starts = [], []
            for j in range(i, end):
                starts.append(clock())
                try:
                    refs.append(submit(j))
                except Exception as exc:    # noqa: BLE001 - counted, the soak goes on
                    refs.append(None)
                    phase.errors += 1
                    phase.problem(f"submit {j}: {type(exc).__name__}: {exc}")
            for j, ref, t0 in zip(range(i, end), refs, starts):
                if ref is None:
                    continue
                try:
                    value = get(ref, timeout=TIMEOUT_S)
                except Exception as exc:    # noqa: BLE001
                    phase.errors += 1
                    phase.problem(f"get {j}: {type(exc).__name__}: {exc}")
                    continue
                lat[j] = clock() - t0
                if not check(j, value):
                    phase.wrong += 1
                    phase.problem(f"wrong value for {j}: {str(value)[:80]}")
                del value
            del refs
            i = end
        phase.done = i
        phase.samples.append(sampler.sample(100.0 * step / STEPS, i))
        if step % 5 == 0:
            drv = phase.samples[-1]["procs"]["driver"]
            print(f"[{SUITE}] {phase.name} {100 * step // STEPS:3d}%: {i:,} executions, "
                  f"{i / max(1e-9, clock() - t_start):,.0f}/s, driver RSS "
                  f"{drv['rss_kb'] / 1024:.1f} MB, wrong {phase.wrong}, errors {phase.errors}",
                  flush=True)
        if phase.errors >= MAX_ERRORS:
            phase.problem(f"stopped after {MAX_ERRORS} errors")
            break
    phase.wall_s = clock() - t_start


def _compiled_phase(hr: Any, phase: Phase, sampler: Sampler, dag: Any,
                    value: Callable[[int], Any], check: Callable[[int, Any], bool]) -> None:
    compiled = dag.experimental_compile()
    try:
        _run_phase(phase, sampler, lambda i: compiled.execute(value(i)), check, hr.get)
    finally:
        compiled.teardown()


def _soak(hr: Any, counts: dict[str, int]) -> tuple[list[Phase], Sampler]:
    from headrace.dag import InputNode

    stage = hr.remote(Stage)
    a, b = stage.remote(), stage.remote()
    pid_a, pid_b = hr.get([a.pid.remote(), b.pid.remote()], timeout=TIMEOUT_S)
    sampler = Sampler({"actor-a": pid_a, "actor-b": pid_b})
    phases = [Phase(name, n) for name, n in counts.items()]
    by = {p.name: p for p in phases}

    def guarded(phase: Phase, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:            # noqa: BLE001 - a failed phase is a row, not a crash
            phase.errors += 1
            phase.problem(f"phase failed: {type(exc).__name__}: {exc}")
            print(f"[{SUITE}] {phase.name}: {phase.first_problem}", flush=True)

    with InputNode() as inp:
        chain = b.inc.bind(a.inc.bind(inp))
    guarded(by["chain_2actor"], lambda: _compiled_phase(
        hr, by["chain_2actor"], sampler, chain, lambda i: i, lambda i, v: v == i + 2))

    # one array per in-flight slot: none is written while an execution may still read it
    pattern = np.arange(ARRAY_BYTES // 8, dtype=np.float64)
    pool = [pattern.copy() for _ in range(BATCH)]

    def array_in(i: int) -> np.ndarray:
        arr = pool[i % BATCH]
        arr[0] = arr[-1] = i
        return arr

    def array_ok(i: int, v: Any) -> bool:
        return (isinstance(v, np.ndarray) and v.shape == pattern.shape and v[0] == i
                and v[-1] == i and np.array_equal(v[1:-1], pattern[1:-1]))

    with InputNode() as inp:
        echo = b.echo.bind(a.echo.bind(inp))
    guarded(by["array_100kb"], lambda: _compiled_phase(
        hr, by["array_100kb"], sampler, echo, array_in, array_ok))

    actors = (a, b)
    guarded(by["actor_calls"], lambda: _run_phase(
        by["actor_calls"], sampler, lambda i: actors[i % 2].inc.remote(i),
        lambda i, v: v == i + 1, hr.get))
    return phases, sampler


def _leftovers(driver: int, seen: set[int], wait_s: float = 5.0) -> tuple[list[int], list[str]]:
    """(still-running children, segments of the run's processes) after shutdown, waiting up to
    ``wait_s`` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        procs = [p for p in _children(driver) if p in seen]
        segs = sorted(n for n in os.listdir("/dev/shm") if n.startswith("headrace-")
                      and n.split("-")[1].isdigit() and int(n.split("-")[1]) in seen)
        if (not procs and not segs) or time.monotonic() >= deadline:
            return procs, segs
        time.sleep(0.1)


# --- judging and writing ---

def _baseline(phase: Phase) -> dict[str, Any] | None:
    return phase.samples[BASELINE_STEP] if len(phase.samples) > BASELINE_STEP + 1 else None


def _growth_mb(phase: Phase, label: str, from_step: int = BASELINE_STEP) -> float | None:
    """RSS of the last sample minus that of sample ``from_step`` (default: the baseline), MB."""
    if _baseline(phase) is None:
        return None
    base = phase.samples[from_step]
    first, last = base["procs"].get(label), phase.samples[-1]["procs"].get(label)
    if not first or not last:
        return None
    return (last["rss_kb"] - first["rss_kb"]) / 1024


def _after_warmup(phase: Phase) -> list[dict[str, Any]]:
    return phase.samples[BASELINE_STEP:] if _baseline(phase) else []


def judge(phases: Sequence[Phase], leftover: tuple[list[int], list[str]]) -> list[Target]:
    rss, fds, segs, bad = [], [], [], []
    rss_ok = fds_ok = segs_ok = True
    for ph in phases:
        after = _after_warmup(ph)
        if not after:
            rss_ok = fds_ok = segs_ok = False
            rss.append(f"{ph.name}: too few samples")
            continue
        growth = {lbl: _growth_mb(ph, lbl) for lbl in JUDGED}
        late = {lbl: _growth_mb(ph, lbl, STEPS // 2) for lbl in JUDGED}
        rss_ok &= all(g is not None and g < RSS_LIMIT_MB for g in growth.values())
        rss.append(f"{ph.name}: " + ", ".join(
            f"{lbl} {'gone' if g is None else f'{g:+.2f} ({late[lbl]:+.2f})'}"
            for lbl, g in growth.items()))
        spans = []
        for lbl in JUDGED:
            vals = [s["procs"][lbl]["fds"] for s in after if s["procs"].get(lbl)]
            fds_ok &= len(vals) == len(after) and min(vals) == max(vals)
            spans.append(f"{lbl} {vals[0]}" + (f"..{max(vals)}" if max(vals) != min(vals)
                                               else "") if vals else f"{lbl} gone")
        kids = {s["children"] for s in after}
        fds_ok &= len(kids) == 1
        fds.append(f"{ph.name}: " + ", ".join(spans) + f"; children {'/'.join(map(str, kids))}")
        ours = [s["shm_ours"] for s in after]
        segs_ok &= min(ours) == max(ours)
        segs.append(f"{ph.name}: {min(ours)}" + (f"..{max(ours)}" if max(ours) != min(ours)
                                                 else ""))
        bad.append(f"{ph.name}: {ph.done:,}/{ph.n:,} checked, {ph.wrong} wrong, "
                   f"{ph.errors} errors" + (f" ({ph.first_problem})" if ph.first_problem else ""))
    all_done = all(ph.done == ph.n and ph.wrong == 0 and ph.errors == 0 for ph in phases)
    procs, left = leftover
    return [
        Target(f"RSS growth after warm-up < {RSS_LIMIT_MB:g} MB per process (driver, actors; "
               f"MB, 100 % minus 5 % sample; in brackets 100 % minus 50 %: growth that has "
               f"stopped is a cache filling up, growth that goes on is a leak)", rss_ok,
               "; ".join(rss)),
        Target("open fds and child processes constant after warm-up", fds_ok, "; ".join(fds)),
        Target("/dev/shm segments of the run constant after warm-up", segs_ok, "; ".join(segs)),
        Target("zero wrong values and zero errors (every result checked)", all_done,
               "; ".join(bad)),
        Target("after hr.shutdown(): no process and no /dev/shm segment left",
               not procs and not left,
               f"{len(procs)} processes {procs[:5]}, {len(left)} segments {left[:5]}"),
    ]


def _records(phases: Sequence[Phase]) -> list[Record]:
    out = []
    for ph in phases:
        lat = ph.latency_s[~np.isnan(ph.latency_s)] if ph.latency_s is not None else []
        if len(lat) == 0:
            out.append(common.missing(ph.name, "headrace", ph.first_problem or "no executions"))
            continue
        ordered = np.sort(lat)
        p99 = ordered[min(len(ordered) - 1, max(0, int(np.ceil(0.99 * len(ordered))) - 1))]
        rate = ph.done / ph.wall_s if ph.wall_s else 0.0
        gbps = ARRAY_BYTES * rate / 1e9 if ph.name == "array_100kb" else None
        out.append(Record(ph.name, "headrace", float(np.median(ordered)) * 1e6, float(p99) * 1e6,
                          gbps, len(lat), f"{rate:,.0f} executions/s over {ph.wall_s:.1f} s; "
                          f"{ph.wrong} wrong, {ph.errors} errors"))
    return out


def _table(phases: dict[str, Phase], records: Sequence[Record]) -> list[str]:
    """A phase's latency row, then its sampled curve."""
    r = records[0]
    ph = phases[r.case]
    fmt = common._fmt               # the suites' one number format
    lines = ["| impl | median µs | p99 µs | GB/s (payload) | n | note |",
             "|---|---:|---:|---:|---:|---|",
             (f"| {r.impl} | {fmt(r.median_us)} | {fmt(r.p99_us)} | {fmt(r.gbps, 3)} | {r.n:,} "
              f"| {r.note or ''} |")]
    if not ph.samples:
        return lines
    labels = list(ph.samples[0]["procs"])
    lines += ["", "RSS in MB per process; fds as " + "/".join(JUDGED) + "; segments: this "
              "run's (all headrace segments on the host). Baseline: the 5 % sample.", "",
              "| % | executions | s | " + " | ".join(labels) + " | fds | children | segments |",
              "|---:|---:|---:|" + "---:|" * len(labels) + "---|---:|---|"]
    for s in ph.samples:
        rss = [fmt(p["rss_kb"] / 1024) if p else "gone" for p in
               (s["procs"].get(lbl) for lbl in labels)]
        fds = "/".join(str(s["procs"][lbl]["fds"]) if s["procs"].get(lbl) else "–"
                       for lbl in JUDGED)
        lines.append(f"| {s['pct']:.0f} | {s['executions']:,} | {s['t_s']:.1f} | "
                     f"{' | '.join(rss)} | {fds} | {s['children']} | "
                     f"{s['shm_ours']} ({s['shm_all']}) |")
    growth = [f"{lbl} {g:+.2f} MB ({_growth_mb(ph, lbl, STEPS // 2):+.2f})" for lbl in labels
              if (g := _growth_mb(ph, lbl)) is not None]
    if growth:
        lines += ["", "RSS growth after warm-up, 100 % − 5 % (in brackets 100 % − 50 %): "
                  + ", ".join(growth) + "."]
    return lines


def _plot(phases: Sequence[Phase]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, len(phases), figsize=(5 * len(phases), 10), squeeze=False,
                             sharex=True)
    for col, ph in enumerate(phases):
        if not ph.samples:
            continue
        pct = [s["pct"] for s in ph.samples]
        labels = list(ph.samples[0]["procs"])
        ax_rss, ax_fds, ax_shm = axes[0][col], axes[1][col], axes[2][col]
        for lbl in labels:
            rss = [s["procs"][lbl]["rss_kb"] / 1024 if s["procs"].get(lbl) else np.nan
                   for s in ph.samples]
            ax_rss.plot(pct, rss, marker=".", label=lbl)
            fds = [s["procs"][lbl]["fds"] if s["procs"].get(lbl) else np.nan
                   for s in ph.samples]
            ax_fds.plot(pct, fds, marker=".", label=lbl)
        ax_shm.plot(pct, [s["shm_ours"] for s in ph.samples], marker=".", label="this run")
        ax_shm.plot(pct, [s["shm_all"] for s in ph.samples], linestyle="--", color="grey",
                    label="all headrace-*")
        ax_shm.plot(pct, [s["children"] for s in ph.samples], marker="x", label="children")
        for ax in (ax_rss, ax_fds, ax_shm):
            ax.axvline(100.0 * BASELINE_STEP / STEPS, color="grey", linewidth=0.5)
            ax.grid(alpha=0.3)
        ax_rss.set_title(f"{ph.name} ({ph.done:,} executions)")
        ax_shm.set_xlabel("progress of the phase (%)")
        if col == 0:
            ax_rss.set_ylabel("RSS (MB)")
            ax_fds.set_ylabel("open fds")
            ax_shm.set_ylabel("shm segments / children")
        ax_rss.legend(fontsize=7)
        ax_fds.legend(fontsize=7)
        ax_shm.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.RESULTS_DIR / f"{SUITE}.png", dpi=90)
    plt.close(fig)


def _curve(phases: Sequence[Phase], leftover: tuple[list[int], list[str]]) -> dict[str, object]:
    return {"baseline": f"the {100 * BASELINE_STEP // STEPS} % sample of each phase",
            "batch": BATCH,
            "phases": [{"name": ph.name, "n": ph.n, "done": ph.done, "wrong": ph.wrong,
                        "errors": ph.errors, "first_problem": ph.first_problem,
                        "wall_s": round(ph.wall_s, 3), "samples": ph.samples}
                       for ph in phases],
            "after_shutdown": {"processes": leftover[0], "segments": leftover[1]}}


def run(quick: bool = False) -> list[Record]:
    """Run the soak; write ``bench/results/soak.{json,host.json,md,png}``.

    Args:
        quick: Run a fifth of every phase (about a minute on 2 cores) instead of the full counts.

    Returns:
        One record per phase (per-execution latency, throughput in the note).
    """
    counts = {k: (n // QUICK_DIVISOR if quick else n) for k, n in FULL.items()}
    host = common.host_facts()
    print(f"[{SUITE}] {host['cpu']}, {host['cores']} cores{', quick' if quick else ''}: "
          + ", ".join(f"{k} {n:,}" for k, n in counts.items()), flush=True)
    import headrace as hr
    t0 = time.monotonic()
    hr.init(num_cpus=2, ignore_reinit_error=True)
    phases: list[Phase] = []
    seen: set[int] = set()
    try:
        phases, sampler = _soak(hr, counts)
        seen = sampler.seen
    finally:
        seen |= set(_children(os.getpid()))
        hr.shutdown()
    leftover = _leftovers(os.getpid(), seen)
    host["soak_wall_s"] = round(time.monotonic() - t0, 1)
    records = _records(phases)
    for rec in records:
        common.progress(SUITE, rec)
    have_plot = importlib.util.find_spec("matplotlib") is not None
    legend = ("No peer: a leak and correctness soak of headrace alone, so there are no ratios. "
              f"Executions in batches of {BATCH}; latency is per execution, submit to value. "
              f"Baseline: the 5 % sample of each phase; growth: 100 % minus 5 %. "
              f"Whole run: {host['soak_wall_s']} s. "
              + ("Curves: soak.png." if have_plot else
                 "matplotlib is not installed: no soak.png this run (pip install matplotlib)."))
    by = {ph.name: ph for ph in phases}
    targets = judge(phases, leftover)
    path = common.write_results(SUITE, records, host, targets, quick=quick,
                                table=lambda rs: _table(by, rs), legend=legend,
                                extra=_curve(phases, leftover))
    if have_plot:
        _plot(phases)
    else:
        print(f"[{SUITE}] matplotlib not installed: no plot", flush=True)
    for t in targets:
        verdict = "n/a" if t.passed is None else ("PASS" if t.passed else "FAIL")
        print(f"[{SUITE}] {verdict} {t.name}: {t.detail}", flush=True)
    print(f"[{SUITE}] wrote {path} ({host['soak_wall_s']} s)", flush=True)
    return records
