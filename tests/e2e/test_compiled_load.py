"""Compiled DAGs under load: many threads, teardown mid-run, an actor restart, random graphs."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headrace as hr
from headrace import InputNode, MultiOutputNode
from headrace.dag import run_local, trace
from headrace.exceptions import ActorDiedError, ChannelClosedError


def _explode():
    raise ValueError("cannot rebuild this value")


class Fussy:
    """Pickles fine, but cannot be rebuilt in another process."""

    def __reduce__(self):
        return (_explode, ())


class Mixer:
    def __init__(self, k: int = 0) -> None:
        self.k = k

    def fussy(self, x):
        return Fussy() if x < 0 else x

    def mix(self, x, *more, scale=1):
        return (x + sum(more)) * scale + self.k

    def nap(self, x, delay_s=0.0):
        time.sleep(delay_s)
        return x

    def pid(self):
        return os.getpid()


RemoteMixer = hr.remote(Mixer)


@pytest.fixture(scope="module")
def mixers():
    return [RemoteMixer.remote(k) for k in (1, 10, 100)]


def test_one_dag_driven_from_four_threads_gives_each_its_own_results(mixers) -> None:
    a, b, _ = mixers
    with InputNode() as inp:
        dag = b.mix.bind(a.mix.bind(inp))       # x + 11
    errors: list[BaseException] = []
    with dag.experimental_compile(max_inflight_executions=4) as compiled:
        def drive(base: int) -> None:
            try:
                for i in range(150):
                    x = base + i
                    if i % 3:
                        assert hr.get(compiled.execute(x), timeout=30) == x + 11
                    else:                   # two in flight from this thread, read backwards
                        refs = [compiled.execute(x), compiled.execute(-x)]
                        assert hr.get(refs[::-1], timeout=30) == [-x + 11, x + 11]
            except BaseException as exc:    # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        threads = [threading.Thread(target=drive, args=(t * 10_000,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert compiled.stats()["completed"] == 4 * 200


@pytest.mark.deadline_s(60)
def test_teardown_from_another_thread_under_load_ends_every_caller(mixers) -> None:
    a, b, c = mixers
    with InputNode() as inp:
        dag = c.mix.bind(b.mix.bind(a.mix.bind(inp)))
    compiled = dag.experimental_compile()
    outcomes: list[str] = []
    started = threading.Event()

    def drive() -> None:
        n = 0
        try:
            while True:
                refs = [compiled.execute(n + k) for k in range(5)]
                assert hr.get(refs, timeout=30) == [n + k + 111 for k in range(5)]
                n += 5
                started.set()
        except ChannelClosedError:
            outcomes.append("closed")
        except BaseException as exc:        # noqa: BLE001 - anything else is the failure
            outcomes.append(repr(exc))
    threads = [threading.Thread(target=drive) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(30)
    time.sleep(0.05)
    t0 = time.monotonic()
    compiled.teardown()
    assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert outcomes == ["closed"] * 3
    assert hr.get([m.mix.remote(1) for m in mixers], timeout=30) == [2, 11, 101]
    with dag.experimental_compile() as again:  # the same actors compile again at once
        assert hr.get(again.execute(0), timeout=30) == 111


@pytest.mark.deadline_s(90)
def test_an_actor_restarted_after_a_crash_fails_the_dag_then_compiles_again() -> None:
    phoenix = RemoteMixer.options(max_restarts=1).remote(5)
    pid = hr.get(phoenix.pid.remote(), timeout=30)
    with InputNode() as inp:
        dag = phoenix.mix.bind(phoenix.nap.bind(inp, 0.5))
    compiled = dag.experimental_compile()
    assert hr.get(compiled.execute(1), timeout=30) == 6
    pending = compiled.execute(2)
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError):
        hr.get(pending, timeout=10)
    with pytest.raises(ActorDiedError):
        compiled.execute(3)
    deadline = time.monotonic() + 5             # a death tears the DAG down by itself
    while not compiled.stats()["closed"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert compiled.stats()["closed"]
    compiled.teardown()                         # and a teardown after that is a no-op
    assert hr.get(phoenix.pid.remote(), timeout=30) != pid     # restarted: a new process
    with dag.experimental_compile() as again:
        assert hr.get([again.execute(i) for i in range(3)], timeout=30) == [5, 6, 7]


def test_a_value_that_cannot_be_rebuilt_is_an_error_of_that_execution_only(mixers) -> None:
    a, b, _ = mixers
    with InputNode() as inp:
        dag = b.mix.bind(a.fussy.bind(inp))
    with dag.experimental_compile() as compiled:
        refs = [compiled.execute(Fussy()), compiled.execute(1), compiled.execute(-1),
                compiled.execute(2)]
        with pytest.raises(hr.TaskError, match="could not be deserialized.*cannot rebuild"):
            hr.get(refs[0], timeout=30)             # the actor could not read its input
        assert hr.get(refs[1], timeout=30) == 11
        with pytest.raises(hr.TaskError, match="could not be deserialized.*cannot rebuild"):
            hr.get(refs[2], timeout=30)             # b could not read a's output
        assert hr.get(refs[3], timeout=30) == 12    # nothing shifted, nothing broke
    with InputNode() as inp:
        dag = a.fussy.bind(inp)
    with dag.experimental_compile() as compiled:
        with pytest.raises(hr.TaskError, match="Mixer.fussy .*could not be deserialized on "
                                               "the driver.*cannot rebuild"):
            hr.get(compiled.execute(-1), timeout=30)
        assert hr.get(compiled.execute(5), timeout=30) == 5


@hr.remote
def ramp(n):
    return np.arange(n, dtype=np.float64)


def _ours(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"headrace-{pid}-")]


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while _ours(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _ours(pid) == []


def test_function_hosts_are_reused_and_leave_no_segment_behind() -> None:
    with InputNode() as inp:
        dag = ramp.bind(inp)
    compiled = dag.experimental_compile(buffer_size_bytes=4096)
    before = set(os.listdir("/dev/shm"))
    big = hr.get(compiled.execute(500_000), timeout=30)        # 4 MB: a spill of the host's
    (spill,) = [n for n in set(os.listdir("/dev/shm")) - before
                if n.startswith("headrace-") and int(n.split("-")[1]) != os.getpid()]
    host_pid = int(spill.split("-")[1])
    compiled.teardown()
    assert big[-1] == 499_999.0 and big.sum() == 499_999 * 500_000 / 2   # still mapped
    del big                                 # the last view: the reader unlinks the spill
    gc.collect()
    assert _gone(host_pid)
    with dag.experimental_compile(buffer_size_bytes=4096) as again:   # the same host process
        assert hr.get(again.execute(3), timeout=30).tolist() == [0.0, 1.0, 2.0]
        hr.get(again.execute(500_000), timeout=30)             # read and dropped: kept idle
        assert _ours(host_pid) != []
        os.kill(host_pid, signal.SIGKILL)   # a killed host cannot unlink: the driver does
        assert _gone(host_pid)


# Random graphs of actor methods: each node mixes 1-3 earlier values (or the input), with an
# optional constant scale; every sink is an output. Compiled results must equal run_local's.
nodes = st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(-1, 30), min_size=1,
                                                       max_size=3),
                           st.none() | st.integers(-3, 3)), min_size=1, max_size=8)


@given(spec=nodes, inputs=st.lists(st.integers(-1000, 1000), min_size=1, max_size=4))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_graphs_compile_to_the_results_of_the_local_oracle(mixers, spec, inputs) -> None:
    local = {m._record.aid: Mixer(k) for m, k in zip(mixers, (1, 10, 100), strict=True)}
    with InputNode() as inp:
        built: list = []
        used: set[int] = set()
        for actor, parents, scale in spec:
            args = []
            for p in parents:
                if 0 <= p < len(built):
                    args.append(built[p])
                    used.add(p)
                else:
                    args.append(inp)
            kwargs = {} if scale is None else {"scale": scale}
            built.append(mixers[actor].mix.bind(*args, **kwargs))
        sinks = [n for i, n in enumerate(built) if i not in used]
        dag = sinks[0] if len(sinks) == 1 else MultiOutputNode(sinks)
    ir = trace(dag)
    with dag.experimental_compile() as compiled:
        refs = [compiled.execute(x) for x in inputs]
        got = [hr.get(r, timeout=30) for r in refs]     # a list of refs per multi-output
    want = [run_local(ir, x, call=lambda op: getattr(local[op.actor], op.method))
            for x in inputs]
    assert got == want
