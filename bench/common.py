"""Timing helpers shared by the suites: alternating rounds, median/p99, host facts, result files.

In: zero-argument callables, one per implementation, each doing one operation of a case.
Out: ``Record``s (one per case and implementation), printed as progress lines and written to
``bench/results/<suite>.json`` (a list of records), ``<suite>.host.json`` and ``<suite>.md``.
Invariants (STYLE 8): every implementation is warmed up first; rounds alternate between them,
rotating who goes first, so that drift hits all of them; a missing or failing peer gets a row with
a note instead of crashing the run; ratios are always taken within one run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VERSIONED = ("headrace", "numpy", "cloudpickle", "pyzmq", "pyarrow", "ray", "dask", "distributed")


@dataclass
class Record:
    """One row of a suite's results: a case measured for one implementation."""

    case: str
    impl: str
    median_us: float | None
    p99_us: float | None
    gbps: float | None = None
    n: int = 0
    note: str | None = None


@dataclass
class Target:
    """A goal from the issue, judged on this run's figures (``passed`` None: not judgeable)."""

    name: str
    passed: bool | None
    detail: str


def quantile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of ``samples`` (``q`` in [0, 1]); the p99 of 100 samples is the max."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(case: str, impl: str, samples_s: Sequence[float], *, nbytes: int | None = None,
              note: str | None = None) -> Record:
    """Turn per-operation seconds into a Record; ``nbytes`` per operation gives GB/s."""
    med = statistics.median(samples_s)
    gbps = nbytes / med / 1e9 if nbytes and med > 0 else None
    return Record(case, impl, med * 1e6, quantile(samples_s, 0.99) * 1e6, gbps, len(samples_s),
                  note)


def missing(case: str, impl: str, note: str) -> Record:
    """A row for an implementation that could not be measured (not installed, failed, skipped)."""
    return Record(case, impl, None, None, None, 0, note)


def alternate(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int, warmup: int,
              round_budget_s: float,
              hooks: dict[str, tuple[Callable[[], None], Callable[[], None]]] | None = None,
              ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every callable in alternating rounds.

    Args:
        fns: Implementation name -> one operation of the case.
        rounds: Rounds; each round runs every implementation once, the first one rotating.
        per_round: Operations per implementation and round, at most.
        warmup: Untimed operations per implementation before the first round.
        round_budget_s: An implementation stops its round early after this many seconds
            (it always does at least one operation), so slow peers cannot stretch the run.
        hooks: Implementation name -> (before, after), called untimed around each of its rounds
            (the warm-up included): e.g. to wake a peer process that must not spin while the
            other implementations run. A hook that raises fails the implementation.

    Returns:
        (seconds per operation for each implementation, error text for those that raised).
        An implementation that raises is dropped from later rounds and keeps no samples.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, str] = {}

    def run(name: str, count: int, timed: bool) -> None:
        fn, clock, start = fns[name], time.perf_counter, time.perf_counter()
        for _ in range(count):
            t0 = clock()
            fn()
            t1 = clock()
            if timed:
                samples[name].append(t1 - t0)
                if t1 - start > round_budget_s:
                    return

    names, hooks = list(fns), hooks or {}
    for r in range(-1, rounds if names else -1):              # round -1 is the warm-up
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue
            before, after = hooks.get(name, (_nothing, _nothing))
            try:
                before()
                try:
                    run(name, warmup if r < 0 else per_round, timed=r >= 0)
                finally:
                    after()
            except Exception as exc:  # noqa: BLE001 - a failing peer becomes a row, not a crash
                errors[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
                samples[name] = []
    return samples, errors


def _nothing() -> None:
    pass


def settle(max_s: float = 2.0, busy_below: float = 0.1, window_s: float = 0.05) -> float:
    """Wait (untimed) until the host is quiet: its CPUs were busy less than ``busy_below`` of a
    ``window_s`` window, or ``max_s`` passed. Returns the last window's busy fraction.

    A peer's processes can keep spinning for a while after its teardown (Ray CG's do); a round
    that starts right then measures the peer's leftovers, not the implementation.
    """
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]                # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    deadline = time.monotonic() + max_s
    busy = 1.0
    while time.monotonic() < deadline:
        b0, t0 = ticks()
        time.sleep(window_s)
        b1, t1 = ticks()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < busy_below:
            break
    return busy


def progress(suite: str, rec: Record) -> None:
    """Print the one-line progress report of a record."""
    if rec.median_us is None:
        line = f"{rec.note}"
    else:
        line = f"median {rec.median_us:.1f} us p99 {rec.p99_us:.1f} us (n={rec.n})"
        if rec.gbps is not None:
            line += f", {rec.gbps:.2f} GB/s"
    print(f"[{suite}] {rec.case} {rec.impl}: {line}", flush=True)


def host_facts() -> dict[str, object]:
    """CPU model, core counts, Python, OS and library versions of this host."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def case_table(records: Sequence[Record], base: str = "headrace") -> list[str]:
    """Markdown lines of one case: median, p99, GB/s and ratios against ``base``."""
    ref = next((r for r in records if r.impl == base and r.median_us), None)
    lines = [f"| impl | median µs | p99 µs | GB/s | impl / {base} | {base} / impl | n | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        ok = ref is not None and r.median_us
        lines.append(
            f"| {r.impl} | {_fmt(r.median_us)} | {_fmt(r.p99_us)} | {_fmt(r.gbps, 2)} "
            f"| {_fmt(r.median_us / ref.median_us, 2) if ok else '–'} "
            f"| {_fmt(ref.median_us / r.median_us, 2) if ok else '–'} | {r.n} | {r.note or ''} |")
    return lines


LEGEND = ("Ratios below 1.0 in the `headrace / impl` column mean headrace is faster. "
           "Compare ratios, not microseconds, across hosts.")


def write_results(suite: str, records: Sequence[Record], host: dict[str, object],
                  targets: Sequence[Target], *, quick: bool,
                  table: Callable[[Sequence[Record]], list[str]] = case_table,
                  legend: str | None = None, extra: dict[str, object] | None = None) -> Path:
    """Write ``<suite>.json``, ``<suite>.host.json`` and ``<suite>.md``; return the .md path.

    ``table`` turns the records of one case into its Markdown lines (default: ``case_table``);
    ``legend`` replaces the sentence that explains its ratio columns. ``extra`` (JSON-able data
    that is no Record, e.g. the soak's sampled curve) makes ``<suite>.json`` an object,
    ``{"records": [...], **extra}``, instead of the list of records (``latest.json`` keeps
    records and targets only).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    (RESULTS_DIR / f"{suite}.json").write_text(
        json.dumps({"records": rows, **extra} if extra else rows, indent=1) + "\n",
        encoding="utf-8")
    (RESULTS_DIR / f"{suite}.host.json").write_text(
        json.dumps({**host, "quick": quick}, indent=1) + "\n", encoding="utf-8")
    versions = ", ".join(f"{k} {v}" for k, v in host["versions"].items() if v)  # type: ignore
    md = [f"# bench: {suite}{' (--quick)' if quick else ''}", "",
          (f"- host: {host['cpu']}, {host['cores']} cores ({host['usable_cores']} usable), "
           f"{host['platform']}"),
          f"- python {host['python']}; {versions}",
          f"- run: {host['date_utc']}. {legend or LEGEND}", "",
          "## Targets", "", "| target | result | detail |", "|---|---|---|"]
    for t in targets:
        verdict = "n/a" if t.passed is None else ("PASS" if t.passed else "FAIL")
        md.append(f"| {t.name} | {verdict} | {t.detail} |")
    for case in dict.fromkeys(r.case for r in records):
        md += ["", f"## {case}", "", *table([r for r in records if r.case == case])]
    path = RESULTS_DIR / f"{suite}.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    _write_latest(suite, records, {**host, "quick": quick}, targets)
    return path


def _write_latest(suite: str, records: Sequence[Record], host: dict[str, object],
                  targets: Sequence[Target]) -> None:
    """Fold this suite's newest run into ``latest.json`` (every suite, with its targets) and
    rebuild ``latest.md`` from the suites' Markdown files."""
    latest_json = RESULTS_DIR / "latest.json"
    try:
        latest = json.loads(latest_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        latest = {}
    latest[suite] = {"host": host, "records": [asdict(r) for r in records],
                     "targets": [asdict(t) for t in targets]}
    latest_json.write_text(json.dumps(dict(sorted(latest.items())), indent=1) + "\n",
                           encoding="utf-8")
    md = ["# bench: latest run of every suite", "",
          "Each suite's newest run (`python -m bench [suite]`); figures in `latest.json`.", ""]
    for name in sorted(latest):
        part = RESULTS_DIR / f"{name}.md"
        if part.exists():       # one heading level down: each suite is a section
            md += ["#" + line if line.startswith("#") else line
                   for line in part.read_text(encoding="utf-8").splitlines()] + [""]
    (RESULTS_DIR / "latest.md").write_text("\n".join(md), encoding="utf-8")


def stop_all(suite: str, stops: Sequence[Callable[[], object]]) -> None:
    """Call ``stops`` last first; one that raises is reported and the others still run."""
    for stop in reversed(stops):
        try:
            stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"[{suite}] stop failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def case_records(suite: str, case: str, names: Sequence[str], samples: dict[str, list[float]],
                 notes: dict[str, str], *, nbytes: int | None = None) -> list[Record]:
    """One record per implementation of ``case`` (a missing one where ``notes`` says why or
    nothing was measured), each printed as it is made."""
    out = []
    for name in names:
        note = notes.get(name)
        rec = missing(case, name, note or "not measured") if note or not samples.get(name) \
            else summarize(case, name, samples[name], nbytes=nbytes)
        progress(suite, rec)
        out.append(rec)
    return out
