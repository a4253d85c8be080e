"""The channels suite: two processes ping-ponging over headrace channels and their floors.

Cases and implementations, all measured in one run (STYLE 8):

- ``roundtrip_int``: the parent sends an int, an echo child sends it back: ``headrace-shm-auto``,
  ``-block``, ``-spin``, ``headrace-socket``, ``mp-pipe``, ``semaphore-floor`` (an int in shared
  memory and two POSIX semaphores) and ``spin-floor`` (two int64 words in shared memory, both
  sides spinning on them).
- ``roundtrip_1mb``: the same with a 1 MB uint8 array each way (GB/s counts both ways).
- ``oneway_100mb``: the parent sends a 100 MB array, the child reads it (zero-copy where the
  channel can), touches one byte and acknowledges with an int; ``memcpy`` (``np.copyto`` into a
  preallocated, pre-faulted array) is the reference bandwidth.
- ``idle_cpu``: a child reader blocked for 1 s in ``read(timeout_s=1)`` on an idle channel; its
  CPU seconds (``getrusage`` in the child) over that second, in cores (auto, block and spin).

  parent ──A: value──▶ echo child ──B: value (or an ack)──▶ parent      one child per impl
         ◀─control pipe: park / go / idle / stop─▶                      (spawned, kept up)

Every child is started once and kept up while rounds alternate between the implementations, but
only the one being timed runs: between its rounds a child is parked in a blocking ``recv`` on its
control pipe, so a spinning child never steals one of the (two) cores from the others.
"""

from __future__ import annotations

import faulthandler
import functools
import itertools
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import common
from .common import Record, Target, alternate, missing, progress, summarize

SUITE = "channels"
INT_VALUE = 12345
MB_BYTES = 1_000_000
BIG_BYTES = 100_000_000
SLOT_BYTES = 2 << 20                # a 1 MB array (and its frame) fits a slot; 100 MB spills
TIMEOUT_S = 60.0                    # bound on the parent's waits: a hang becomes a failed row
WATCHDOG_S = 600.0                  # a case running longer dumps the stacks and exits (backstop)
IDLE_S = 1.0
PARK = -1                           # the floors' in-band "park" value (the channels send None)
SHM_SYNCS = {"headrace-shm-auto": "auto", "headrace-shm-block": "block",
             "headrace-shm-spin": "spin"}
HEADRACE = (*SHM_SYNCS, "headrace-socket")
CASES: dict[str, tuple[str, ...]] = {
    "roundtrip_int": (*HEADRACE, "mp-pipe", "semaphore-floor", "spin-floor"),
    "roundtrip_1mb": (*HEADRACE, "mp-pipe"),
    "oneway_100mb": (*HEADRACE, "mp-pipe", "memcpy"),
}
#: (case, impl) -> the implementation its target compares it with (besides mp-pipe).
FLOOR = {("roundtrip_int", "headrace-shm-block"): "semaphore-floor",
         ("roundtrip_int", "headrace-shm-spin"): "spin-floor",
         ("roundtrip_int", "headrace-shm-auto"): "headrace-shm-spin",
         **{("oneway_100mb", impl): "memcpy" for impl in (*HEADRACE, "mp-pipe")}}


@dataclass(frozen=True)
class Counts:
    """Iteration counts: the int and 1 MB round trips, and the 100 MB one-way case."""

    rounds: int
    per_round: int
    mb_per_round: int
    warmup: int
    budget_s: float
    big_rounds: int
    big_per_round: int


FULL = Counts(rounds=10, per_round=300, mb_per_round=100, warmup=50, budget_s=1.0,
              big_rounds=6, big_per_round=2)
QUICK = Counts(rounds=3, per_round=100, mb_per_round=30, warmup=20, budget_s=0.3,
               big_rounds=2, big_per_round=2)


@dataclass
class ChannelRecord(Record):
    """A Record plus the idle reader's CPU use (``idle_cpu`` rows only; None elsewhere)."""

    cores: float | None = None


# children ------------------------------------------------------------------------------------
def _parked(control: Any, idle: Callable[[float], tuple[float, float]] | None) -> bool:
    """Park on ``control`` until told "go" (True) or "stop" (False); serve "idle" requests."""
    control.send("parked")
    while (cmd := control.recv()) != "stop":
        if cmd == "go":
            return True
        control.send(idle(cmd[1]) if idle else "no idle measurement here")
    return False


def _idle_read(reader: Any, seconds: float) -> tuple[float, float]:
    """CPU and wall seconds of this process over one ``read`` that times out after ``seconds``."""
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        reader.read(timeout_s=seconds)
    except TimeoutError:
        pass
    ru1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    return ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, t1 - t0


def _channel_child(a: Any, b: Any, control: Any) -> None:
    """Headrace channels' child: echo A onto B, ack a big array with one of its bytes."""
    idle = functools.partial(_idle_read, a)
    while True:
        v = a.read()
        if v is None:
            if not _parked(control, idle):
                return
        elif type(v) is np.ndarray and v.nbytes > SLOT_BYTES:
            ack = int(v[-1])
            del v                       # give the zero-copy view back before the ack
            b.write(ack)
        else:
            b.write(v)


def _relay_child(a: Any, b: Any, control: Any) -> None:
    """One link of a chain of channels: relay A onto B; the park value (None) goes on down the
    chain before this link parks, so that every link parks."""
    while True:
        v = a.read()
        b.write(v)
        if v is None and not _parked(control, None):
            return


def _pipe_child(conn: Any) -> None:
    """mp-pipe's child: echo, ack a big array with one of its bytes, stop on None or EOF."""
    try:
        while (v := conn.recv()) is not None:
            conn.send(int(v[-1]) if type(v) is np.ndarray and v.nbytes > SLOT_BYTES else v)
    except EOFError:
        pass


def _semaphore_child(words: Any, sem_a: Any, sem_b: Any, control: Any) -> None:
    """semaphore-floor's child: wait on A, copy word 0 to word 1, post B."""
    w, ppid = np.frombuffer(words, np.int64), os.getppid()
    while True:
        if not sem_a.acquire(timeout=1.0):
            if os.getppid() != ppid:
                return
            continue
        v = w[0]
        if v == PARK:
            if not _parked(control, None):
                return
            continue
        w[1] = v
        sem_b.release()


def _spin_child(words: Any, control: Any) -> None:
    """spin-floor's child: spin until word 0 changes, copy it to word 1."""
    w, ppid, last, n = np.frombuffer(words, np.int64), os.getppid(), 0, 0
    while True:
        v = w[0]
        if v == last:
            n += 1
            if n & 0xFFFFF == 0 and os.getppid() != ppid:
                return
            continue
        last = v
        if v == PARK:
            if not _parked(control, None):
                return
            continue
        w[1] = v


# the parent's side ---------------------------------------------------------------------------
@dataclass
class Peer:
    """One implementation: its echo child, one operation per case, and how to park it."""

    proc: Any
    control: Any                            # mp-pipe's child has none: this is its data pipe
    ops: dict[str, Callable[[], object]]
    park_value: Callable[[], None] | None   # sends the in-band "park" value; None: never parks
    closers: list[Callable[[], None]] = field(default_factory=list)
    stop_msg: Any = "stop"

    def park(self) -> None:
        if self.park_value is not None:
            self.park_value()
            self._answer("parked")

    def resume(self) -> None:
        if self.park_value is not None:
            self.control.send("go")

    def idle(self, seconds: float) -> tuple[float, float]:
        """CPU and wall seconds of the (parked) child blocked ``seconds`` in a read."""
        self.control.send(("idle", seconds))
        return self._answer(None)

    def stop(self) -> None:
        try:
            self.control.send(self.stop_msg)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        for close in self.closers:
            close()

    def _answer(self, want: Any) -> Any:
        if not self.control.poll(TIMEOUT_S):
            raise TimeoutError(f"child {self.proc.pid} did not answer in {TIMEOUT_S} s")
        got = self.control.recv()
        if want is not None and got != want:
            raise RuntimeError(f"child {self.proc.pid} answered {got!r}, not {want!r}")
        return got


def _pinned(cpu: int | None, target: Callable[..., None], *args: Any) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    target(*args)


def _spawn(cpu: int | None, target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args, pipe)`` in a spawned child on ``cpu``; return (process, our end)."""
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_pinned, args=(cpu, target, *args, theirs), daemon=True)
    proc.start()
    theirs.close()                      # so that a dead child is an EOFError, not a hang
    return proc, mine


def _channel_peer(cpu: int | None, make: Callable[[], Any], mb: np.ndarray,
                  big: np.ndarray) -> Peer:
    """A headrace channel pair (A out, B back) and its echo child."""
    ch_a, ch_b = make(), make()
    w, r = ch_a.writer(), ch_b.reader(0)
    proc, control = _spawn(cpu, _channel_child, ch_a.reader(0), ch_b.writer())

    def roundtrip(value: Any) -> Any:
        # NOTE: no timeout_s on the timed path: it costs about 0.6 us a call (timeout_ns), a
        # fifth of a spin round trip. A dead child still ends it (the endpoints check their
        # peers every 100 ms); a live but stuck one meets the WATCHDOG_S backstop.
        w.write(value)
        return r.read()
    ops = {"roundtrip_int": lambda: roundtrip(INT_VALUE), "roundtrip_1mb": lambda: roundtrip(mb),
           "oneway_100mb": lambda: roundtrip(big)}
    return Peer(proc, control, ops, lambda: w.write(None, TIMEOUT_S),
                [w.close, r.close, ch_a.close, ch_b.close])


@dataclass
class ChainPeer(Peer):
    """``links`` relay children in a row (channel i to channel i + 1): a chained DAG's shape
    with nothing but its rings. Parks and resumes every link."""

    links: list[Peer] = field(default_factory=list)

    def park(self) -> None:
        self.park_value()                   # None goes down the chain and comes back
        for link in self.links:
            link._answer("parked")

    def resume(self) -> None:
        for link in self.links:
            link.control.send("go")

    def stop(self) -> None:
        for link in self.links:
            link.stop()
        for close in self.closers:
            close()


def _chain_peer(make: Callable[[], Any], n: int) -> Peer:
    """``chain_int``: an int through ``n`` relay children chained by channels, and back."""
    chans = [make() for _ in range(n + 1)]
    links = []
    for i in range(n):
        proc, control = _spawn(None, _relay_child, chans[i].reader(0), chans[i + 1].writer())
        links.append(Peer(proc, control, {}, None))
    w, r = chans[0].writer(), chans[n].reader(0)

    def roundtrip() -> Any:
        w.write(INT_VALUE)
        return r.read()

    def park_value() -> None:
        w.write(None, TIMEOUT_S)
        r.read(TIMEOUT_S)                   # the park value, back from the last link
    return ChainPeer(links[0].proc, links[0].control, {"chain_int": roundtrip}, park_value,
                     [w.close, r.close, *(c.close for c in chans)], links=links)


def _pipe_peer(cpu: int | None, mb: np.ndarray, big: np.ndarray) -> Peer:
    proc, mine = _spawn(cpu, _pipe_child)

    def roundtrip(value: Any) -> Any:
        mine.send(value)
        return mine.recv()
    ops = {"roundtrip_int": lambda: roundtrip(INT_VALUE), "roundtrip_1mb": lambda: roundtrip(mb),
           "oneway_100mb": lambda: roundtrip(big)}
    return Peer(proc, mine, ops, None, [mine.close], stop_msg=None)


def _semaphore_peer(cpu: int | None) -> Peer:
    ctx = mp.get_context("spawn")
    words, sem_a, sem_b = ctx.RawArray("q", 2), ctx.Semaphore(0), ctx.Semaphore(0)
    proc, control = _spawn(cpu, _semaphore_child, words, sem_a, sem_b)
    w, seq = np.frombuffer(words, np.int64), itertools.count(1)

    def roundtrip() -> int:
        w[0] = i = next(seq)
        sem_a.release()
        if not sem_b.acquire(timeout=TIMEOUT_S):
            raise TimeoutError(f"semaphore-floor child did not answer in {TIMEOUT_S} s")
        return int(w[1]) - i

    def park() -> None:
        w[0] = PARK
        sem_a.release()
    return Peer(proc, control, {"roundtrip_int": roundtrip}, park)


def _spin_peer(cpu: int | None) -> Peer:
    words = mp.get_context("spawn").RawArray("q", 2)
    proc, control = _spawn(cpu, _spin_child, words)
    w, seq = np.frombuffer(words, np.int64), itertools.count(1)

    def roundtrip() -> None:
        w[0] = i = next(seq)
        n, deadline = 0, time.monotonic() + TIMEOUT_S
        while w[1] != i:
            n += 1
            if n & 0xFFFF == 0 and time.monotonic() > deadline:
                raise TimeoutError(f"spin-floor child did not answer in {TIMEOUT_S} s")

    def park() -> None:
        w[0] = PARK
    return Peer(proc, control, {"roundtrip_int": roundtrip}, park)


def _make_socket() -> Any:
    from headrace.channels.socket import SocketChannel
    return SocketChannel(n_readers=1, capacity=8)


def _make_shm(sync: str, spin_us: float | None = None) -> Callable[[], Any]:
    """``spin_us``: the "auto" spin window (None: the channels' default)."""
    def make() -> Any:
        from headrace.channels.shm import SPIN_US, ShmChannel
        return ShmChannel(n_readers=1, capacity=8, slot_bytes=SLOT_BYTES, sync=sync,
                          spin_us=SPIN_US if spin_us is None else spin_us)
    return make


class Impls:
    """Starts each implementation once (then parks it), hands out its ops, stops them all."""

    def __init__(self, child_cpu: int | None) -> None:
        self.cpu = child_cpu
        self.mb = np.full(MB_BYTES, 7, np.uint8)
        self.big = np.full(BIG_BYTES, 9, np.uint8)
        self.peers: dict[str, Peer] = {}
        self.ops: dict[tuple[str, str], Callable[[], object]] = {}
        self.notes: dict[str, str] = {}          # impl -> why it has no rows

    def start(self, name: str, starter: Callable[[], Peer | None]) -> None:
        """Start, check one int round trip, park; a failure stops it and leaves a note."""
        peer = None
        try:
            peer = starter()
            if peer is not None:
                peer.ops["roundtrip_int"]()
                peer.park()
                self.peers[name], peer = peer, None
                self.ops.update({(case, name): op for case, op in self.peers[name].ops.items()})
        except ImportError as exc:
            self.notes[name] = f"not available ({exc.name or exc} does not import: {exc})"[:200]
        except Exception as exc:  # noqa: BLE001 - a broken peer becomes a row, not a crash
            self.notes[name] = f"setup failed: {type(exc).__name__}: {exc}"[:200]
        if peer is not None:
            self._stop(name, peer)
        print(f"[{SUITE}] started {name}: {self.notes.get(name, 'ok')}", flush=True)

    def start_all(self) -> None:
        cpu, mb, big = self.cpu, self.mb, self.big
        for name, sync in SHM_SYNCS.items():
            self.start(name, lambda s=sync: _channel_peer(cpu, _make_shm(s), mb, big))
        self.start("headrace-socket", lambda: _channel_peer(cpu, _make_socket, mb, big))
        self.start("mp-pipe", lambda: _pipe_peer(cpu, mb, big))
        self.start("semaphore-floor", lambda: _semaphore_peer(cpu))
        self.start("spin-floor", lambda: _spin_peer(cpu))
        self.start("memcpy", self.memcpy)

    def memcpy(self) -> None:
        dst, big = np.ones_like(self.big), self.big       # ones_like: pre-faulted
        self.ops["oneway_100mb", "memcpy"] = lambda: np.copyto(dst, big)

    def hooks(self) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
        return {name: (peer.resume, peer.park) for name, peer in self.peers.items()
                if peer.park_value is not None}

    def stop(self) -> None:
        for name, peer in reversed(self.peers.items()):
            self._stop(name, peer)

    @staticmethod
    def _stop(name: str, peer: Peer) -> None:
        try:
            peer.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"[{SUITE}] stop {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def measure_case(impls: Impls, case: str, counts: Counts) -> list[Record]:
    """Alternate the implementations of ``case``; one record each, progress printed."""
    big, mb = case == "oneway_100mb", case == "roundtrip_1mb"
    names = CASES[case]
    fns = {n: impls.ops[case, n] for n in names if (case, n) in impls.ops}
    hooks = {n: h for n, h in impls.hooks().items() if n in fns}
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        samples, errors = alternate(
            fns, rounds=counts.big_rounds if big else counts.rounds,
            per_round=(counts.big_per_round if big else counts.mb_per_round if mb
                       else counts.per_round),
            warmup=2 if big else counts.warmup,
            round_budget_s=counts.budget_s * (4 if big else 1), hooks=hooks)
    finally:
        faulthandler.cancel_dump_traceback_later()
    nbytes = BIG_BYTES if big else 2 * MB_BYTES if mb else None
    records = []
    for name in names:
        note = impls.notes.get(name) or errors.get(name)
        rec = (missing(case, name, note) if note or not samples.get(name) else
               summarize(case, name, samples[name], nbytes=nbytes))
        records.append(rec)
        progress(SUITE, rec)
    return records


def measure_idle(impls: Impls) -> list[Record]:
    """CPU of a parked child's reader blocked ``IDLE_S`` in ``read`` (one at a time)."""
    records = []
    for name in SHM_SYNCS:
        peer = impls.peers.get(name)
        rec = ChannelRecord("idle_cpu", name, None, None, None, 0, impls.notes.get(name))
        if peer is not None:
            try:
                cpu_s, wall_s = peer.idle(IDLE_S)
                rec.cores, rec.n = cpu_s / wall_s, 1
                rec.note = (f"{rec.cores:.3f} cores ({cpu_s * 1e3:.1f} ms CPU over "
                            f"{wall_s:.2f} s blocked in read)")
            except Exception as exc:  # noqa: BLE001 - a failure becomes a row
                rec.note = f"failed: {type(exc).__name__}: {exc}"[:200]
        records.append(rec)
        progress(SUITE, rec)
    return records


def judge(records: list[Record]) -> list[Target]:
    """The issue's targets, judged on this run's records."""
    by = {(r.case, r.impl): r for r in records}

    def ratio(case: str, num: str, den: str) -> float | None:
        a, b = by.get((case, num)), by.get((case, den))
        if a is None or b is None or not a.median_us or not b.median_us:
            return None
        return a.median_us / b.median_us

    def target(name: str, r: float | None, limit: float, ref: str) -> Target:
        return Target(name, None if r is None else r <= limit,
                      "not measured" if r is None else f"{r:.2f}x {ref}")

    targets = [
        target(f"{impl} roundtrip_int median <= {limit}x {ref}",
               ratio("roundtrip_int", impl, ref), limit, ref)
        for impl, ref, limit in (("headrace-shm-block", "semaphore-floor", 1.2),
                                 ("headrace-shm-spin", "spin-floor", 5),
                                 ("headrace-shm-auto", "headrace-shm-spin", 2))]
    idle = by.get(("idle_cpu", "headrace-shm-auto"))
    cores = getattr(idle, "cores", None)
    targets.append(Target("headrace-shm-auto idle reader uses 0.0 cores (< 0.01)",
                          None if cores is None else cores < 0.01,
                          "not measured" if cores is None else f"{cores:.4f} cores"))
    for case in ("roundtrip_int", "roundtrip_1mb", "oneway_100mb"):
        for impl in ("headrace-shm-auto", "headrace-shm-spin", "headrace-socket"):
            targets.append(target(f"{impl} {case} median <= 0.5x mp-pipe",
                                  ratio(case, impl, "mp-pipe"), 0.5, "mp-pipe"))
    for impl in HEADRACE:
        r = ratio("oneway_100mb", "memcpy", impl)          # = impl GB/s / memcpy GB/s
        targets.append(Target(f"{impl} oneway_100mb GB/s >= 0.7x memcpy", None if r is None
                              else r >= 0.7, "not measured" if r is None else f"{r:.2f}x memcpy"))
    return targets


def _ref_cell(r: Record, by: dict[str, Record]) -> str:
    ref = by.get(FLOOR.get((r.case, r.impl), ""))
    if ref is None or not ref.median_us or not r.median_us:
        return "–"
    if ref.impl == "memcpy":
        return f"{ref.median_us / r.median_us:.2f}x memcpy GB/s"
    return f"{r.median_us / ref.median_us:.2f}x {ref.impl}"


def case_table(records: list[Record]) -> list[str]:
    """Markdown lines of one case: figures, ratio to mp-pipe, ratio to the impl's floor."""
    if records and records[0].case == "idle_cpu":
        lines = ["| impl | cores | note |", "|---|---:|---|"]
        return lines + [f"| {r.impl} | {common._fmt(getattr(r, 'cores', None), 4)} "
                        f"| {r.note or ''} |" for r in records]
    by = {r.impl: r for r in records}
    pipe = by.get("mp-pipe")
    lines = ["| impl | median µs | p99 µs | GB/s | impl / mp-pipe | vs floor or peer | n | note |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in records:
        ok = pipe is not None and pipe.median_us and r.median_us
        lines.append(
            f"| {r.impl} | {common._fmt(r.median_us)} | {common._fmt(r.p99_us)} "
            f"| {common._fmt(r.gbps, 2)} "
            f"| {common._fmt(r.median_us / pipe.median_us, 2) if ok else '–'} "
            f"| {_ref_cell(r, by)} | {r.n} | {r.note or ''} |")
    return lines


LEGEND = ("`impl / mp-pipe` is the ratio of medians (below 1.0: faster than a multiprocessing "
          "Pipe); `vs floor or peer` compares the impl with what its target names (the floors "
          "for round trips, memcpy GB/s for the 100 MB case). Compare ratios, not microseconds, "
          "across hosts. The parent and the children are pinned to two different CPUs, so every "
          "impl crosses cores the same way (unpinned, a blocking pair lands on one CPU or two "
          "at random, and wake-ups differ five-fold between the two).")


def run(quick: bool = False) -> list[Record]:
    """Run the suite, print progress, write ``bench/results/channels.{json,host.json,md}``.

    Args:
        quick: Use the QUICK counts (well under a minute on 2 cores) instead of FULL.

    Returns:
        The records written to ``channels.json``.
    """
    counts = QUICK if quick else FULL
    host = common.host_facts()
    usable = sorted(os.sched_getaffinity(0))
    parent_cpu, child_cpu = (usable[0], usable[1]) if len(usable) > 1 else (None, None)
    host["placement"] = (f"parent on CPU {parent_cpu}, every child on CPU {child_cpu}"
                         if child_cpu is not None else "one usable CPU: not pinned")
    print(f"[{SUITE}] {host['cpu']}, {host['cores']} cores, python {host['python']}, "
          f"{host['placement']}{', quick' if quick else ''}", flush=True)
    impls = Impls(child_cpu)
    records: list[Record] = []
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        impls.start_all()
        for case in CASES:
            records += measure_case(impls, case, counts)
        records += measure_idle(impls)
    finally:
        impls.stop()
        os.sched_setaffinity(0, usable)
    records = [r if isinstance(r, ChannelRecord) else ChannelRecord(**asdict(r))
               for r in records]
    legend = f"{LEGEND} Placement: {host['placement']}."
    path = common.write_results(SUITE, records, host, judge(records), quick=quick,
                                table=case_table, legend=legend)
    print(f"[{SUITE}] wrote {path.parent / SUITE}.json and {path}", flush=True)
    return records
