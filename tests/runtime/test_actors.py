"""Actors: state, ordering, concurrency, named actors, kill, restarts, bad input, GC."""

from __future__ import annotations

import threading
import time

import pytest

import headrace as hr

pytestmark = pytest.mark.usefixtures("runtime")


@hr.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    def inc(self, k=1):
        self.n += k
        self.log.append(k)
        return self.n

    def history(self):
        return self.log

    def sleep(self, s):
        time.sleep(s)
        return threading.get_ident()

    @hr.method(num_returns=2)
    def two(self):
        return self.n, -self.n

    async def async_inc(self):
        import asyncio
        await asyncio.sleep(0.01)
        self.n += 1
        return self.n

    def pid(self):
        import os
        return os.getpid()


def test_actor_keeps_state_and_runs_calls_in_submission_order() -> None:
    c = Counter.remote(10)
    refs = [c.inc.remote(k) for k in range(1, 101)]
    assert hr.get(refs[-1], timeout=20) == 10 + sum(range(1, 101))
    assert hr.get(c.history.remote(), timeout=10) == list(range(1, 101))


def test_calls_wait_for_argument_refs_without_reordering() -> None:
    @hr.remote
    def later(x):
        time.sleep(0.3)
        return x
    c = Counter.remote()
    first = c.inc.remote(later.remote(5))       # waits for its argument
    second = c.inc.remote(1)                    # must still run after the first
    assert hr.get([first, second], timeout=10) == [5, 6]


def test_method_options_and_decorator_num_returns() -> None:
    c = Counter.remote(3)
    a, b = c.two.remote()
    assert hr.get([a, b], timeout=10) == [3, -3]
    x, y = c.inc.options(num_returns=2).remote(1)  # returns an int: not 2 values
    with pytest.raises(ValueError, match="num_returns=2"):
        hr.get(x, timeout=10)


def test_async_methods_run() -> None:
    c = Counter.remote()
    assert hr.get([c.async_inc.remote() for _ in range(3)], timeout=10) == [1, 2, 3]


def test_max_concurrency_runs_calls_on_several_threads_at_once() -> None:
    c = Counter.options(max_concurrency=4).remote()
    hr.get(c.sleep.remote(0), timeout=30)       # started (a cold process takes a while)
    t0 = time.monotonic()
    idents = hr.get([c.sleep.remote(0.5) for _ in range(4)], timeout=10)
    assert time.monotonic() - t0 < 1.5 and len(set(idents)) == 4


def test_missing_method_is_attribute_error_before_submit() -> None:
    c = Counter.remote()
    with pytest.raises(AttributeError, match=r"^actor class 'Counter' has no method 'nope'; "
                                             r"it has .*inc.*"):
        c.nope.remote()
    assert hr.get(c.inc.remote(), timeout=10) == 1    # the actor is unharmed


def test_named_actor_lookup_and_duplicate_name() -> None:
    c = Counter.options(name="shared-counter").remote(100)
    assert hr.get(hr.get_actor("shared-counter").inc.remote(), timeout=10) == 101
    with pytest.raises(ValueError, match=r"^an actor named 'shared-counter' already exists"):
        Counter.options(name="shared-counter").remote()
    with pytest.raises(ValueError, match=r"^no live actor is named 'nobody'"):
        hr.get_actor("nobody")
    hr.kill(c)
    Counter.options(name="shared-counter").remote()   # the name is free again at once


def test_get_or_create_gives_the_live_named_actor_or_makes_it() -> None:
    """Ray's get_or_create and options(get_if_exists=True): an existing actor keeps its own
    arguments; in a worker too; without a name it is refused."""
    a = Counter.options(name="goc").get_or_create(100)
    b = Counter.options(name="goc").get_or_create(5)            # exists: 5 is ignored
    c = Counter.options(name="goc", get_if_exists=True).remote(7)
    assert [hr.get(h.inc.remote(), timeout=10) for h in (a, b, c)] == [101, 102, 103]
    assert hr.get(_get_or_create_in_a_worker.remote(), timeout=30) == (104, 1001)
    with pytest.raises(ValueError, match="needs the actor's name"):
        Counter.options(get_if_exists=True).remote()
    with pytest.raises(ValueError, match="needs the actor's name"):
        Counter.get_or_create()
    for name in ("goc", "goc-worker"):
        hr.kill(hr.get_actor(name))


@hr.remote
def _get_or_create_in_a_worker():
    there = Counter.options(name="goc").get_or_create(0)          # the driver's
    new = Counter.options(name="goc-worker").get_or_create(1000)  # made here
    return hr.get(there.inc.remote(), timeout=10), hr.get(new.inc.remote(), timeout=10)


def test_kill_fails_pending_and_later_calls() -> None:
    c = Counter.remote()
    pending = c.sleep.remote(30)
    time.sleep(0.2)
    t0 = time.monotonic()
    hr.kill(c)
    with pytest.raises(hr.ActorDiedError, match=r"^actor 'Counter' \(pid \d+\) died: it was "
                                                r"killed by hr.kill\(\)"):
        hr.get(pending, timeout=10)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(hr.ActorDiedError):
        hr.get(c.inc.remote(), timeout=10)


def test_max_restarts_restarts_the_process_and_fails_only_inflight_calls() -> None:
    import os
    import signal
    c = Counter.options(max_restarts=1).remote(7)
    pid1 = hr.get(c.pid.remote(), timeout=10)
    os.kill(pid1, signal.SIGKILL)
    time.sleep(0.3)
    pid2 = hr.get(c.pid.remote(), timeout=10)
    assert pid2 != pid1
    assert hr.get(c.inc.remote(), timeout=10) == 8      # __init__ ran again with its args


@hr.remote
class Flaky:
    """Ray's actor_restart doc example: it exits after every 10 calls."""

    def __init__(self):
        self.counter = 0

    def increment_and_possibly_fail(self):
        if self.counter == 10:
            import os
            os._exit(0)
        self.counter += 1
        return self.counter


def test_max_task_retries_runs_the_calls_cut_off_by_a_restart_again_in_order() -> None:
    """Ray's max_task_retries (-1: without limit): the call that killed the actor, and those
    behind it, run again on the restarted actor; once no restart is left, calls fail."""
    a = Flaky.options(max_restarts=4, max_task_retries=-1).remote()
    assert [hr.get(a.increment_and_possibly_fail.remote(), timeout=30)
            for _ in range(50)] == list(range(1, 11)) * 5
    for _ in range(3):
        with pytest.raises(hr.ActorDiedError):
            hr.get(a.increment_and_possibly_fail.remote(), timeout=30)
    b = Flaky.options(max_restarts=1, max_task_retries=-1).remote()
    refs = [b.increment_and_possibly_fail.remote() for _ in range(15)]     # in flight at once
    assert hr.get(refs, timeout=30) == list(range(1, 11)) + list(range(1, 6))
    c = Flaky.options(max_restarts=1).remote()              # Ray's default: no task retries
    refs = [c.increment_and_possibly_fail.remote() for _ in range(11)]
    assert hr.get(refs[:10], timeout=30) == list(range(1, 11))
    with pytest.raises(hr.ActorDiedError):
        hr.get(refs[10], timeout=30)
    d = Flaky.options(max_restarts=1, max_task_retries=-1).remote()
    assert hr.get(_call_flaky.remote(d, 15), timeout=60) == list(range(1, 11)) + \
        list(range(1, 6))                                   # from a worker: retried too
    with pytest.raises(ValueError, match="max_task_retries must be an int >= -1"):
        Flaky.options(max_task_retries=-2)


@hr.remote
def _call_flaky(actor, n):
    return [hr.get(actor.increment_and_possibly_fail.remote(), timeout=30) for _ in range(n)]


def test_exception_in_init_kills_actor_with_cause() -> None:
    @hr.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("bad config")

        def f(self):
            return 1
    b = Broken.remote()
    pattern = r"^actor 'Broken' \(pid \d+\) died: its __init__ raised RuntimeError: bad config"
    with pytest.raises(hr.ActorDiedError, match=pattern) as info:
        hr.get(b.f.remote(), timeout=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(hr.ActorDiedError):
        hr.get(b.f.remote(), timeout=10)


def test_actor_class_cannot_be_instantiated_directly() -> None:
    with pytest.raises(TypeError, match=r"use Counter.remote\(\.\.\.\) instead"):
        Counter()


def test_unnamed_actor_exits_when_its_last_handle_goes() -> None:
    import gc
    import os
    c = Counter.remote()
    pid = hr.get(c.pid.remote(), timeout=10)
    last = c.inc.remote(5)
    del c
    gc.collect()
    assert hr.get(last, timeout=10) == 5                # queued calls still finish
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except OSError:         # gone (an exiting process's stat can raise ESRCH too)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the actor process outlived its last handle")

