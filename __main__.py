"""``python -m headrace``: the main job, a real multi-stage pipeline on the embedded runtime.

Stage 1 (remote functions, in parallel on the worker pool) makes noisy signals; stage 2 (an actor
holding state) smooths each one; stage 3 (remote functions) scores them; the driver gathers all.
Then the same three stages are bound into a DAG and run both ways, uncompiled (ordinary tasks
and actor calls per execution) and compiled (dedicated processes linked by shared-memory
channels), with per-execution latency for both. Last, it times the primitive hops (task and actor
round trips, a 100 MB numpy round trip). No arguments; ``--quick`` runs fewer iterations.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import headrace as hr
from headrace.channels import native


@hr.remote
def make_signal(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 8 * np.pi, n)
    return np.sin(t) + rng.normal(0, 0.3, n)


@hr.remote
class Smoother:
    """Keeps a running count of what it smoothed (actor state survives across calls)."""

    def __init__(self, width: int) -> None:
        self.kernel = np.ones(width) / width
        self.seen = 0

    def smooth(self, signal: np.ndarray) -> np.ndarray:
        self.seen += 1
        return np.convolve(signal, self.kernel, mode="same")

    def count(self) -> int:
        return self.seen


@hr.remote
def score(raw: np.ndarray, smooth: np.ndarray) -> dict:
    if raw.size > 100_000:          # the first pipeline: its workers' output reaches us
        print(f"scoring {raw.size} samples")
    return {"noise_removed": float(np.std(raw - smooth)), "peak": float(smooth.max())}


@hr.remote
def ping(x: int) -> int:
    return x


@hr.remote
class Echo:
    def echo(self, x):
        return x


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _line(name: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    median = statistics.median(samples)
    return f"  {name:<34} median {median * 1e6:9.1f} us   p99 {p99 * 1e6:9.1f} us"


def compiled_pipeline(n: int) -> None:
    """make_signal -> Smoother.smooth -> score as one DAG: uncompiled, then compiled."""
    with hr.InputNode() as inp:
        raw = make_signal.bind(inp, 20_000)
        dag = score.bind(raw, Smoother.remote(25).smooth.bind(raw))
    uncompiled = [hr.get(dag.execute(seed), timeout=60) for seed in range(4)]
    first = "" if native.ready() else \
        ", the first time after an install: it waits for the one-off compile of native code"
    t0 = time.perf_counter()
    with dag.experimental_compile() as compiled:
        opened = time.perf_counter() - t0
        same = [hr.get(compiled.execute(seed), timeout=60) for seed in range(4)]
        print(f"\ncompiled DAG (compiled and started in {opened * 1e3:.0f} ms{first}; results "
              f"{'match' if same == uncompiled else 'DIFFER from'} the uncompiled run):")
        print("  " + compiled.plan.as_text().replace("\n", "\n  "))
        print("\nper-execution latency, 20,000-sample signals through the 3 stages:")
        print(_line("uncompiled: dag.execute(seed)",
                    _timed(lambda: hr.get(dag.execute(3), timeout=60), max(20, n // 10))))
        print(_line("compiled:   compiled.execute(seed)",
                    _timed(lambda: hr.get(compiled.execute(3), timeout=60), n)))
        t0 = time.perf_counter()      # execute() keeps max_inflight_executions in flight
        window = [compiled.execute(seed) for seed in range(n)]
        hr.get(window, timeout=120)
        print(f"  compiled, {n} executions submitted without waiting: "
              f"{n / (time.perf_counter() - t0):,.0f} executions/s")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    n = 50 if quick else 500
    t0 = time.perf_counter()
    info = hr.init(log_to_driver=True)
    print(f"headrace {hr.__version__}: local runtime with {info['num_cpus']} worker processes "
          f"(started in {(time.perf_counter() - t0) * 1e3:.0f} ms)")

    t0 = time.perf_counter()
    smoother = Smoother.remote(25)
    signals = [make_signal.remote(seed, 200_000) for seed in range(8)]
    smoothed = [smoother.smooth.remote(s) for s in signals]      # refs in, resolved first
    scores = [score.remote(raw, sm) for raw, sm in zip(signals, smoothed, strict=True)]
    results = hr.get(scores, timeout=60)
    elapsed = time.perf_counter() - t0
    print(f"\npipeline: 8 signals x 200,000 samples through make_signal -> Smoother.smooth -> "
          f"score in {elapsed * 1e3:.0f} ms (actor smoothed {hr.get(smoother.count.remote())})")
    for i, r in enumerate(results):
        print(f"  signal {i}: noise removed {r['noise_removed']:.3f}, peak {r['peak']:.3f}")

    compiled_pipeline(n)

    echo = Echo.remote()
    hr.get(echo.echo.remote(0), timeout=30)
    hr.get(ping.remote(0), timeout=30)
    array = np.zeros(100_000_000 // 8)
    big = hr.put(array)
    print("\nper-call timings:")
    print(_line("task round trip (ping.remote)", _timed(lambda: hr.get(ping.remote(1)), n)))
    print(_line("actor call round trip (echo)", _timed(lambda: hr.get(echo.echo.remote(1)), n)))
    print(_line("100 MB ref to an actor and back",
                _timed(lambda: hr.get(echo.echo.remote(big)), 10 if quick else 30)))
    print(_line("100 MB put, to an actor, get back",
                _timed(lambda: hr.get(echo.echo.remote(hr.put(array))), 10 if quick else 30)))
    hr.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
