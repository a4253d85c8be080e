"""The API inside workers: handles travel, tasks and actors call tasks and actors, through the
driver; values, errors and deaths reach the caller as on the driver; nothing leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
import time

import pytest

import headrace as hr
from headrace.exceptions import ActorDiedError, RefsTypeError, TaskError
from headrace.runtime import session

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def inc(self, k=1):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def boom(self):
        raise KeyError("inner boom")

    def sleep(self, s):
        time.sleep(s)
        return s

    def nap(self, s):
        """Sleeps in short steps: a cancel reaches it between two (direct calls run on a thread,
        which only a Python line can interrupt)."""
        end = time.monotonic() + s
        while time.monotonic() < end:
            time.sleep(0.01)
        return s


@hr.remote
def call_it(handles, k):
    """Handles inside a container: each is called from this task, and waited for here."""
    return hr.get([h.inc.remote(k) for h in handles])


@hr.remote
def fib(n):
    if n < 2:
        return n
    return sum(hr.get([fib.remote(n - 1), fib.remote(n - 2)]))


@hr.remote
class Caller:
    """The Serve composition, synchronously: holds a Downstream handle as state."""

    def __init__(self, down):
        self.down = down

    def call(self, x):
        return hr.get(self.down.inc.remote(x))

    def twice(self, x):
        ref = self.down.inc.remote(x)       # not waited for: passed on as an argument
        return hr.get(self.down.inc.remote(ref))

    def put_and_wait(self):
        refs = [hr.put(i) for i in range(3)] + [self.down.sleep.remote(0.05)]
        ready, pending = hr.wait(refs, num_returns=4, timeout=10)
        return len(ready), len(pending), refs[1].result(timeout=10)

    def make_counter(self, start):
        return Counter.remote(start)

    def by_name(self, name):
        return hr.get(hr.get_actor(name).inc.remote(100))

    def fail(self):
        return hr.get(self.down.boom.remote())

    def wait_sleep(self, s):
        return hr.get(self.down.sleep.remote(s))

    def leak_a_ref(self):
        return [self.down.inc.remote(1)]

    def borrowed(self):
        return None


def _borrowed_total() -> int:
    return sum(len(p.borrowed) for p in list(session.running().procs.values()))


def test_handles_passed_to_a_task_in_a_container_are_called_there() -> None:
    a, b = Counter.remote(), Counter.remote(10)
    assert hr.get(call_it.remote([a, b], 5), timeout=30) == [5, 15]
    assert hr.get([a.inc.remote(), b.inc.remote()], timeout=30) == [6, 16]


def test_an_actor_holding_a_handle_calls_it_and_passes_refs_on() -> None:
    down = Counter.remote()
    caller = Caller.remote(down)
    assert hr.get(caller.call.remote(2), timeout=30) == 2
    assert hr.get(caller.twice.remote(3), timeout=30) == 5 + 5    # inc(3) -> 5, inc(5) -> 10
    assert hr.get(caller.put_and_wait.remote(), timeout=30) == (4, 0, 1)


def test_tasks_that_submit_tasks_finish_on_two_cpus() -> None:
    """Each waiting task lends its CPU slot: fib as tasks cannot starve the 2-CPU pool."""
    assert hr.get(fib.remote(7), timeout=120) == 13


def test_actors_made_in_a_worker_and_handles_returned_to_the_driver() -> None:
    caller = Caller.remote(Counter.remote())
    made = hr.get(caller.make_counter.remote(40), timeout=30)
    assert hr.get(made.inc.remote(2), timeout=30) == 42
    named = Counter.options(name="nested-named").remote(0)
    assert hr.get(caller.by_name.remote("nested-named"), timeout=30) == 100
    with pytest.raises(TaskError, match="no live actor is named 'nobody'"):
        hr.get(caller.by_name.remote("nobody"), timeout=30)
    hr.kill(named)


def test_an_actor_made_in_a_worker_ends_when_its_last_handle_goes() -> None:
    caller = Caller.remote(Counter.remote())
    made = hr.get(caller.make_counter.remote(0), timeout=30)
    pid = hr.get(made.pid.remote(), timeout=30)
    del made                                # the worker's handle died with its method's frame
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the actor outlived its last handle")


def test_a_nested_error_reaches_the_caller_with_both_tracebacks() -> None:
    caller = Caller.remote(Counter.remote())
    with pytest.raises(TaskError, match="inner boom") as info:
        hr.get(caller.fail.remote(), timeout=30)
    assert "Caller.fail" in str(info.value) and "Counter.boom" in str(info.value)


def test_the_death_of_a_callee_fails_the_waiting_caller_quickly() -> None:
    down = Counter.remote()
    pid = hr.get(down.pid.remote(), timeout=30)
    caller = Caller.remote(down)
    ref = caller.wait_sleep.remote(30)
    time.sleep(0.5)                         # the caller waits in get now
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TaskError) as info:
        hr.get(ref, timeout=10)
    assert time.monotonic() - started < 1.0
    assert isinstance(info.value, ActorDiedError) or "died" in str(info.value)


@hr.remote
def total(refs):
    return sum(hr.get(refs))


@hr.remote
class Keeper:
    """Holds refs it was given inside a value, and reads them later."""

    def __init__(self):
        self.refs = []

    def keep(self, box):
        self.refs.extend(box["refs"])
        return len(self.refs)

    def total(self):
        return sum(hr.get(self.refs))


def test_refs_travel_out_of_workers_and_between_them() -> None:
    """A ref made in a worker comes back to the driver inside a value and can be passed on;
    a ref given inside a value is kept by an actor and read after the driver dropped it."""
    caller = Caller.remote(Counter.remote())
    [made] = hr.get(caller.leak_a_ref.remote(), timeout=30)
    assert isinstance(made, hr.ObjectRef) and hr.get(made, timeout=30) == 1
    assert hr.get(total.remote([made, made]), timeout=30) == 2
    keeper = Keeper.remote()
    refs = [hr.put(5), made, Counter.remote(7).inc.remote(1)]
    assert hr.get(keeper.keep.remote({"refs": refs}), timeout=30) == 3
    del refs, made
    gc.collect()
    assert hr.get(keeper.total.remote(), timeout=30) == 5 + 1 + 8


def test_a_ref_pickled_outside_a_call_is_refused() -> None:
    with pytest.raises(RefsTypeError, match="cannot be pickled on its own"):
        pickle.dumps(hr.put(1))


def test_refs_a_worker_drops_are_released_on_the_driver() -> None:
    caller = Caller.remote(Counter.remote())
    for _ in range(5):
        hr.get(caller.put_and_wait.remote(), timeout=30)
    deadline = time.monotonic() + 10
    while _borrowed_total() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _borrowed_total() == 0, [(p.label, list(p.borrowed.values())) for p in session.running().procs.values() if p.borrowed]


@hr.remote
class Gate:
    """``pass_at(n)`` returns once n calls are inside it at the same time: only an actor that
    runs its calls concurrently gets through."""

    def __init__(self):
        self.inside = 0
        self.full = None

    async def pass_at(self, n):
        if self.full is None:
            self.full = asyncio.Event()
        self.inside += 1
        if self.inside >= n:
            self.full.set()
        await self.full.wait()
        return n

    async def say_hi(self, message):
        await asyncio.sleep(0.01)
        return f"Hello {message}!"

    async def add(self, x):
        return x + 1


@hr.remote
class AsyncCaller:
    """Ray Serve's composition: awaits responses of a handle it holds, or passes them on."""

    def __init__(self, down):
        self.down = down

    async def __call__(self, message):
        return await self.down.say_hi.remote(message)

    async def chain(self, start):
        return await self.down.add.remote(self.down.add.remote(start))

    async def through(self, n):
        return await self.down.pass_at.remote(n)

    def blocking(self, message):
        return hr.get(self.down.say_hi.remote(message))

    async def long(self):
        await asyncio.sleep(30)


def test_async_actors_compose_as_serve_deployments_do() -> None:
    caller = AsyncCaller.remote(Gate.remote())
    assert hr.get(caller.__call__.remote("world"), timeout=30) == "Hello world!"
    assert hr.get(caller.chain.remote(1), timeout=30) == 3
    # five calls wait inside the callee at once: both actors run their calls concurrently
    assert hr.get([caller.through.remote(5) for _ in range(5)], timeout=30) == [5] * 5
    # plain methods run beside the event loop: a blocking get holds only its own call
    assert hr.get([caller.blocking.remote(i) for i in range(3)], timeout=30) == [
        "Hello 0!", "Hello 1!", "Hello 2!"]


def test_an_async_actor_honours_max_concurrency_and_cancel() -> None:
    gate = Gate.options(max_concurrency=2).remote()
    refs = [gate.pass_at.remote(3) for _ in range(3)]
    with pytest.raises(hr.GetTimeoutError):
        hr.get(refs, timeout=1.0)           # only two get in: the third never arrives
    hr.kill(gate)
    caller = AsyncCaller.remote(Gate.remote())
    ref = caller.long.remote()
    time.sleep(0.3)
    hr.cancel(ref)
    with pytest.raises(hr.TaskCancelledError):
        hr.get(ref, timeout=10)
    assert hr.get(caller.__call__.remote("again"), timeout=30) == "Hello again!"


@hr.remote
class Signal:
    """Ray's SignalActor: ``wait`` returns once ``send`` was called."""

    def __init__(self):
        self.event = None

    def _ready(self):
        if self.event is None:
            self.event = asyncio.Event()
        return self.event

    async def wait(self):
        await self._ready().wait()
        return True

    async def send(self):
        self._ready().set()


@hr.remote
class Waiter:
    def __init__(self, signal_handle):
        self.signal = signal_handle

    def wait_then(self, x):
        hr.get(self.signal.wait.remote())
        return x * 2


def test_a_signal_handle_passed_to_two_actors_releases_both() -> None:
    sig = Signal.remote()
    waiters = [Waiter.remote(sig), Waiter.remote(sig)]
    refs = [w.wait_then.remote(i + 1) for i, w in enumerate(waiters)]
    ready, _ = hr.wait(refs, num_returns=2, timeout=0.5)
    assert ready == []                      # both wait on the signal
    hr.get(sig.send.remote(), timeout=30)
    assert hr.get(refs, timeout=30) == [2, 4]


@hr.remote
class Relay:
    """A compiled DAG's stage that calls another actor from its method."""

    def __init__(self, down):
        self.down = down

    def fwd(self, x):
        return hr.get(self.down.inc.remote(x)) * 10


@hr.remote
def relay_task(handle, x):
    return hr.get(handle.inc.remote(x))


def test_a_compiled_dags_ops_call_actors_through_handles() -> None:
    from headrace.dag import InputNode
    down = Counter.remote()
    relay = Relay.remote(down)
    with InputNode() as inp:
        dag = relay.fwd.bind(inp)
    with dag.experimental_compile() as compiled:
        assert [hr.get(compiled.execute(1), timeout=30) for _ in range(3)] == [10, 20, 30]
    with InputNode() as inp:
        dag = relay_task.bind(down, inp)    # a function stage gets the handle as an argument
    with dag.experimental_compile() as compiled:
        assert hr.get(compiled.execute(5), timeout=30) == 8


@hr.remote
class Big:
    def array(self, n):
        import numpy as np
        return np.ones(n, dtype=np.uint8)


@hr.remote
class Hoarder:
    def __init__(self, big):
        self.big = big
        self.kept = []

    def hoard(self, k):
        self.kept.extend(self.big.array.remote(1 << 20) for _ in range(k))
        return sum(int(a.sum()) for a in hr.get(self.kept))

    def pid(self):
        """Also opens the ways to Big (lanes, links), so that only values are made later."""
        assert int(hr.get(self.big.array.remote(1)).sum()) == 1
        return os.getpid()


def test_the_death_of_a_caller_releases_what_it_held() -> None:
    """Results a caller holds live in segments named after it (direct calls) or the driver
    (calls through it): its death frees both kinds."""
    from headrace.channels.segments import owned_segments
    hoarder = Hoarder.remote(Big.remote())
    pid = hr.get(hoarder.pid.remote(), timeout=30)

    def held() -> set[str]:
        return set(owned_segments(os.getpid())) | set(owned_segments(pid))

    before = held()
    assert hr.get(hoarder.hoard.remote(3), timeout=30) == 3 << 20
    made = held() - before
    assert len(made) >= 3                     # the three values, held for the hoarder
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while made & held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not made & held(), sorted(made & held())


def test_shutdown_ends_actors_that_workers_made() -> None:
    caller = Caller.remote(Counter.remote())
    made = hr.get(caller.make_counter.remote(0), timeout=30)
    pids = [hr.get(made.pid.remote(), timeout=30)]
    del made
    made_in_task = hr.get(make_and_keep.remote(), timeout=30)
    pids.append(hr.get(made_in_task.pid.remote(), timeout=30))
    hr.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    hr.init(num_cpus=2)                     # for the module's remaining tests


@hr.remote
def make_and_keep():
    return Counter.remote()


@hr.remote
class Log:
    def __init__(self):
        self.items = []

    def add(self, x):
        self.items.append(x)
        return len(self.items)

    def all(self):
        return self.items


@hr.remote
def mixed_calls(log, n):
    """Calls without refs go over the worker's own link, calls with refs through the driver:
    the actor still runs them in the order they were made."""
    refs = []
    for i in range(n):
        arg = hr.put(i) if i % 3 == 0 else i        # a top-level ref: through the driver
        refs.append(log.add.remote(arg))
    return hr.get(refs)


@hr.remote
def made_through(caller, start):
    """A direct call whose value holds a handle: the driver holds it on the way."""
    made = hr.get(caller.make_counter.remote(start))
    return hr.get(made.inc.remote(1)), [caller.leak_a_ref.remote()]


def test_direct_and_routed_calls_from_one_worker_keep_their_order() -> None:
    log = Log.remote()
    assert hr.get(mixed_calls.remote(log, 30), timeout=60) == list(range(1, 31))
    assert hr.get(log.all.remote(), timeout=30) == list(range(30))


def test_values_with_handles_and_refs_come_back_from_direct_calls() -> None:
    caller = Caller.remote(Counter.remote())
    value, [ref] = hr.get(made_through.remote(caller, 41), timeout=60)
    assert value == 42
    [inner] = hr.get(ref, timeout=30)
    assert hr.get(inner, timeout=30) == 1


@hr.remote
class Sleeper:
    def __init__(self, down):
        self.down = down

    def call_and_cancel(self):
        ref = self.down.nap.remote(30)
        time.sleep(0.3)
        hr.cancel(ref)
        try:
            hr.get(ref, timeout=10)
        except hr.TaskCancelledError:
            return "cancelled", hr.get(self.down.inc.remote(1), timeout=10)
        return "not cancelled", None


def test_a_direct_call_is_cancelled_and_the_actor_goes_on() -> None:
    assert hr.get(Sleeper.remote(Counter.remote()).call_and_cancel.remote(),
                  timeout=30) == ("cancelled", 1)
