"""The crash catalogue: each fault, for an ordinary actor call and for a compiled 3-actor chain,
with a ``get(timeout=None)`` pending. Each case checks the error type, that it came within its
bound, what still works afterwards, and (here and in no_leaks) that no process or segment is left.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import headrace as hr
from headrace.channels.segments import owned_segments

from .targets import TARGETS, Chain, Pending, Stage, Target, wait_gone

pytestmark = [pytest.mark.usefixtures("runtime"), pytest.mark.deadline_s(60)]

#: A death, teardown or shutdown reaches a pending get within this (DESIGN 2.2: < 1 s).
DEATH_BOUND_S = 1.0


@hr.remote
def echo(x: Any) -> Any:
    return x


@pytest.fixture(params=sorted(TARGETS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(kind: str) -> Iterator[Callable[..., Target]]:
    made: list[Target] = []

    def build(**options: Any) -> Target:
        made.append(TARGETS[kind](**options))
        return made[-1]
    yield build
    for target in made:
        target.close()


def runtime_works() -> bool:
    return hr.get(echo.remote(7), timeout=10) == 7


def test_user_exception_is_that_calls_error_and_the_next_value_is_right(make) -> None:
    t = make()
    bad, good = t.submit(("raise", 1)), t.submit(5)
    out, _ = Pending(bad).result(10)
    assert isinstance(out, hr.TaskError) and isinstance(out, ValueError)
    assert "bad input [1]" in str(out)
    assert hr.get(good, timeout=10) == t.expected(5)
    assert hr.get(t.submit(6), timeout=10) == t.expected(6)


def test_unpicklable_argument_is_refused_at_submit_and_nothing_shifts(make, kind) -> None:
    t = make()
    where = r"execute\(\)" if kind == "chain" else r"Stage\.run\.remote\(\)"
    with pytest.raises(TypeError, match=rf"argument 0 of {where} cannot be serialized: lock|"
                                        rf"argument 'x' \(position 0\) of {where} cannot be "
                                        "serialized: lock"):
        t.submit(threading.Lock())
    if kind == "chain":     # a keyword its input does not read: refused first (Ray's rule)
        with pytest.raises(ValueError, match=r"got keyword arguments \['y'\], but the DAG "):
            t.compiled.execute(1, y=threading.Lock())
    assert hr.get(t.submit(1), timeout=10) == t.expected(1)


def test_unpicklable_result_is_that_calls_error_and_the_next_value_is_right(make) -> None:
    t = make()
    out, _ = Pending(t.submit(("lock",))).result(10)
    assert isinstance(out, hr.TaskError) and isinstance(out, TypeError)
    assert "serialize" in str(out)
    assert hr.get(t.submit(2), timeout=10) == t.expected(2)


def test_os_exit_fails_the_pending_get_with_actor_died(make) -> None:
    t = make()
    pid = t.mid_pid()
    start = time.monotonic()
    out, at = Pending(t.submit(("exit",))).result(10)
    assert isinstance(out, hr.ActorDiedError), out
    assert "exited with code 3" in str(out) and str(pid) in str(out)
    assert at - start < DEATH_BOUND_S + 0.5          # the call itself runs first
    assert wait_gone(pid) and t.survivors_work() and runtime_works()


def test_sigkill_mid_call_fails_the_pending_get_within_the_bound(make) -> None:
    t = make()
    pid = t.mid_pid()
    _sigkill_ends(pid, Pending(t.submit(("sleep", 30, 1))))
    assert wait_gone(pid) and t.survivors_work() and runtime_works()


def _sigkill_ends(pid: int, pending: Pending) -> None:
    """SIGKILL ``pid`` while ``pending``'s call runs: the get ends with ActorDiedError within
    the bound."""
    time.sleep(0.3)                                  # the call is running now
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    out, at = pending.result(10)
    assert isinstance(out, hr.ActorDiedError) and "SIGKILL" in str(out), out
    assert at - killed < DEATH_BOUND_S


@hr.remote
class _Log:
    """Records the calls it ran, in order (a restarted process starts a fresh log)."""

    def __init__(self):
        self.seen = []

    def add(self, i, pause=0.0):
        time.sleep(pause)
        self.seen.append(i)
        return i

    def pid(self):
        return os.getpid()

    def log(self):
        return self.seen


def test_sigkill_with_task_retries_runs_the_cut_off_calls_again_nothing_lost_or_shifted() -> None:
    """max_task_retries: calls running or queued when the process is SIGKILLed come back, each
    with its own value, in order, and the restarted process ran them in that order."""
    a = _Log.options(max_restarts=1, max_task_retries=-1).remote()
    pid = hr.get(a.pid.remote(), timeout=10)
    refs = [a.add.remote(i, 0.05) for i in range(20)]
    time.sleep(0.3)                                 # some done, one running, the rest queued
    os.kill(pid, signal.SIGKILL)
    assert hr.get(refs, timeout=30) == list(range(20))
    assert wait_gone(pid)
    assert hr.get(a.pid.remote(), timeout=10) != pid
    again = hr.get(a.log.remote(), timeout=10)     # what the restarted process ran, in order
    assert 0 < len(again) < 20 and again == list(range(20 - len(again), 20)), again
    hr.kill(a)


def test_sigkill_of_one_producer_ends_a_get_waiting_on_several(kind) -> None:
    """A get over an actor call and a compiled chain waits on both at once (one waiter): the
    death of either one's process ends it within the bound, and the other keeps working."""
    targets = {name: TARGETS[name]() for name in sorted(TARGETS)}
    try:
        victim = targets[kind]
        pid = victim.mid_pid()
        refs = [t.submit(("sleep", 30 if name == kind else 1.5, 1))
                for name, t in targets.items()]
        _sigkill_ends(pid, Pending(refs))
        (other, ref), = [(n, r) for n, r in zip(targets, refs, strict=True) if n != kind]
        # mid answers ("sleep", s, 1) with 2; in the chain, the last stage adds 1
        assert hr.get(ref, timeout=30) == {"call": 2, "chain": 3}[other]
    finally:
        for t in targets.values():
            t.close()
    assert wait_gone(pid) and runtime_works()


def _wait_stopped(pid: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:         # a thread that just ended
                continue
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} did not stop within {within_s} s")


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"pid {pid} state {f.read().rsplit(')', 1)[1].split()[0]}"
    except OSError as exc:
        return f"pid {pid}: {exc}"


def test_sigstop_meets_a_deadline_and_everything_resumes_on_sigcont(make, kind) -> None:
    t = make(submit_timeout_s=1.0, max_inflight_executions=2) if kind == "chain" else make()
    pid = t.mid_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        # NOTE: a signal lands asynchronously: a thread spinning on the other core may run a
        # few more microseconds, long enough to pass execution 0 through. Wait for every
        # thread to be stopped (this race was the rare flake of this test).
        _wait_stopped(pid)
        refs = [t.submit(0)]
        stopped = time.monotonic()
        if kind == "chain":         # execute() meets submit_timeout_s, naming the stopped stage
            with pytest.raises(hr.SubmitTimeoutError) as info:
                for i in range(1, 10):
                    refs.append(t.submit(i))
            assert isinstance(info.value, TimeoutError)
            assert f"pid {pid}" in str(info.value) and "stopped by a signal" in str(info.value)
            assert "submit_timeout_s" in str(info.value)
        else:                       # get meets its own timeout
            with pytest.raises(hr.GetTimeoutError):
                hr.get(refs[0], timeout=1.0)
        assert 0.9 < time.monotonic() - stopped < 3.0
        pending = Pending(refs[0])
        time.sleep(0.3)
        # timeout=None keeps waiting, as documented (the message says when and how it ended,
        # and what the OS says of the stopped stage: a rare flake here is not understood yet)
        assert pending.is_waiting(), (pending._out, f"stopped at {stopped}, now "
                                      f"{time.monotonic()}", _proc_state(pid))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert pending.result(10)[0] == t.expected(0)
    assert hr.get(refs, timeout=10) == [t.expected(i) for i in range(len(refs))]
    assert hr.get(t.submit(100), timeout=10) == t.expected(100)


def test_exception_in_init_names_init_not_os_exit(make, kind) -> None:
    if kind == "chain":
        with pytest.raises(hr.ActorDiedError) as info:
            make(fail_init=True)
        error = info.value
    else:
        error, _ = Pending(make(fail_init=True).submit(1)).result(30)
    assert isinstance(error, hr.ActorDiedError), error
    assert "its __init__ raised ValueError: the mid stage cannot start" in str(error)
    assert "os._exit" not in str(error) and "Fix the error in __init__" in str(error)
    assert runtime_works()


def test_actor_killed_between_executions_fails_the_next_one(make) -> None:
    t = make()
    assert hr.get(t.submit(1), timeout=10) == t.expected(1)
    pid = t.mid_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    start = time.monotonic()
    with pytest.raises(hr.ActorDiedError):
        hr.get(t.submit(2), timeout=10)
    assert time.monotonic() - start < DEATH_BOUND_S + 0.5
    assert t.survivors_work() and runtime_works()


def test_end_from_another_thread_during_load_fails_every_caller_and_no_value_is_wrong(
        make, kind) -> None:
    """Chain: teardown() from another thread; call: hr.kill() of the actor from another thread."""
    t = make()
    wrong: list[tuple[int, Any]] = []
    errors: list[BaseException] = []

    def load(base: int) -> None:
        for i in range(base, base + 100_000):
            try:
                value = hr.get(t.submit(i))
            except hr.HeadraceError as exc:
                errors.append(exc)
                return
            if value != t.expected(i):
                wrong.append((i, value))
    threads = [threading.Thread(target=load, args=(k * 1_000_000,)) for k in range(3)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    ended = time.monotonic()
    end = t.compiled.teardown if kind == "chain" else (lambda: hr.kill(t.mid))
    threading.Thread(target=end).start()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads)
    assert time.monotonic() - ended < DEATH_BOUND_S + 0.5
    assert wrong == []
    expected = hr.ChannelClosedError if kind == "chain" else hr.ActorDiedError
    assert len(errors) == 3 and all(isinstance(e, expected) for e in errors), errors
    assert runtime_works()


def test_shutdown_during_gets_ends_them_with_a_headrace_error(make, kind) -> None:
    t = make()
    pending = Pending(t.submit(("sleep", 30, 1)))
    time.sleep(0.3)
    start = time.monotonic()
    hr.shutdown()
    out, at = pending.result(10)
    expected = hr.ChannelClosedError if kind == "chain" else hr.ObjectLostError
    assert isinstance(out, expected), out
    assert at - start < DEATH_BOUND_S + 0.5
    hr.init(num_cpus=2)
    assert runtime_works()
    s = Stage.remote("mid")
    assert hr.get(s.run.remote(1), timeout=30) == 2


def test_teardown_frees_the_inputs_no_loop_read_at_once() -> None:
    """Compiled DAGs only: a spilled input that no loop read (torn down first) is unlinked by
    teardown itself, not when the CompiledDAG object is collected."""
    t = Chain()
    try:
        pid = hr.get(t.actors["first"].pid.remote(), timeout=30)
        os.kill(pid, signal.SIGSTOP)            # the first stage holds still: nobody reads
        before = set(owned_segments(os.getpid()))
        t.submit(np.ones(8 << 20, np.uint8))    # larger than a slot: a spill segment
        spilled = set(owned_segments(os.getpid())) - before
        assert spilled, "the input did not spill: the test tests nothing"
        t.compiled.teardown()
        assert set(owned_segments(os.getpid())) & spilled == set()
    finally:
        os.kill(pid, signal.SIGCONT)
        t.close()


def test_an_async_actor_finishes_its_running_calls_before_its_last_handle_ends_it() -> None:
    import gc

    @hr.remote
    class Mixed:
        async def ping(self):
            return "pong"

        def slow(self, s):                  # a plain method: runs on the executor thread
            time.sleep(s)
            return s

    m = Mixed.remote()
    assert hr.get(m.ping.remote(), timeout=30) == "pong"
    running = [m.slow.remote(0.3), m.slow.remote(0.2)]
    del m
    gc.collect()                            # EXIT is queued behind them, and arrives at once
    assert hr.get(running, timeout=10) == [0.3, 0.2]
    assert runtime_works()
