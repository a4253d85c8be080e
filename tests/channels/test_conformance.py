"""One contract, four channels: in-process, shared memory, socket (zmq) and tcp pass one suite."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from headrace.channels.base import Channel
from headrace.channels.inproc import InProcChannel
from headrace.channels.shm import ShmChannel
from headrace.exceptions import ChannelClosedError, ChannelTimeoutError, RemoteTraceback, WouldBlock

from . import peers
from .peers import error_when_killed, in_thread

KINDS = ["inproc", "shm", "socket", "tcp"]
CROSS = ["shm", "socket", "tcp"]
SPAWN = mp.get_context("spawn")


def make(kind: str, n_readers: int = 1, capacity: int = 4) -> Channel:
    if kind == "inproc":
        return InProcChannel(n_readers, capacity)
    if kind == "shm":
        return ShmChannel(n_readers, capacity, slot_bytes=256 * 1024)
    if kind == "tcp":
        from headrace.channels.tcp import TcpChannel
        return TcpChannel(n_readers, capacity)
    from headrace.channels.socket import SocketChannel
    return SocketChannel(n_readers, capacity)


@pytest.fixture
def factory() -> Iterator[Callable[..., Channel]]:
    made: list[Channel] = []

    def build(kind: str, n_readers: int = 1, capacity: int = 4) -> Channel:
        made.append(make(kind, n_readers, capacity))
        return made[-1]

    yield build
    for ch in made:
        ch.close()


@pytest.mark.parametrize("kind", KINDS)
def test_many_values_arrive_in_order(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=4)
    w, r = ch.writer(), ch.reader(0)
    thread, out = in_thread(lambda: [w.write(i, timeout_s=10) for i in range(2000)])
    got = [r.read(timeout_s=10) for _ in range(2000)]
    thread.join(10)
    assert "error" not in out
    assert got == list(range(2000))


VALUES: list[Any] = [None, True, False, 0, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 90, 1.5, -0.0,
                     float("inf"), "", "héllo ✓", b"", b"\x00\xff" * 10, [1, [2, (3, {"k": None})]],
                     {"a": 1, 2: b"x"}, {1, 2, 3}, (1, "two")]


@pytest.mark.parametrize("kind", KINDS)
def test_values_of_every_kind_round_trip(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=len(VALUES) + 4)
    w, r = ch.writer(), ch.reader(0)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = pa.table({"x": [1, 2, 3], "y": ["a", "b", None]})
    for value in VALUES + [arr, table, pa.array([1.5, None])]:
        w.write(value, timeout_s=5)
    for value in VALUES:
        got = r.read(timeout_s=5)
        assert got == value and type(got) is type(value)
    got_arr = r.read(timeout_s=5)
    np.testing.assert_array_equal(got_arr, arr)
    assert got_arr.dtype == np.float32
    assert r.read(timeout_s=5).equals(table)
    assert r.read(timeout_s=5).equals(pa.array([1.5, None]))


def _raise_value_error() -> ValueError:
    try:
        raise ValueError("bad batch 7")
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("kind", CROSS)
def test_exceptions_keep_their_traceback_text(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    ch.writer().write(_raise_value_error(), timeout_s=5)
    got = ch.reader(0).read(timeout_s=5)
    assert type(got) is ValueError and str(got) == "bad batch 7"
    assert isinstance(got.__cause__, RemoteTraceback)
    assert "_raise_value_error" in got.__cause__.text and 'raise ValueError("bad batch 7")' \
        in got.__cause__.text


@pytest.mark.parametrize("kind", KINDS)
def test_large_values_arrive_intact(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=2)
    w, r = ch.writer(), ch.reader(0)
    big = np.random.default_rng(0).integers(0, 1 << 30, size=3_000_000)     # 24 MB > a slot
    thread, out = in_thread(lambda: [w.write(big * k, timeout_s=10) for k in range(3)])
    for k in range(3):
        np.testing.assert_array_equal(r.read(timeout_s=10), big * k)
    thread.join(10)
    assert "error" not in out


@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_gets_every_value_and_slots_wait_for_all(
        kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, n_readers=3, capacity=2)
    w = ch.writer()
    readers = [ch.reader(i) for i in range(3)]
    w.write("a", timeout_s=5)
    w.write("b", timeout_s=5)
    assert [readers[0].read(timeout_s=5), readers[0].read(timeout_s=5)] == ["a", "b"]
    with pytest.raises(ChannelTimeoutError):      # readers 1 and 2 have not read "a" yet
        w.write("c", timeout_s=0.2)
    assert readers[1].read(timeout_s=5) == "a"
    with pytest.raises(ChannelTimeoutError):
        w.write("c", timeout_s=0.1)
    assert readers[2].read(timeout_s=5) == "a"
    w.write("c", timeout_s=5)
    assert [r.read(timeout_s=5) for r in readers[1:]] == ["b", "b"]
    assert [r.read(timeout_s=5) for r in readers] == ["c", "c", "c"]


@pytest.mark.parametrize("kind", KINDS)
def test_timeouts(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=1)
    w, r = ch.writer(), ch.reader(0)
    with pytest.raises(ChannelTimeoutError, match="read on .* timed out after 0 s"):
        r.read(timeout_s=0)
    with pytest.raises(WouldBlock):
        r.read_nowait()
    start = time.monotonic()
    with pytest.raises(TimeoutError):           # also a builtin TimeoutError
        r.read(timeout_s=0.15)
    assert 0.15 <= time.monotonic() - start < 2
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        r.read(timeout_s=-1)
    w.write(1, timeout_s=0)
    with pytest.raises(ChannelTimeoutError, match="write on .* timed out"):
        w.write(2, timeout_s=0)
    assert r.read_nowait() == 1
    w.write(2, timeout_s=0)
    assert r.read(timeout_s=0) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_close_wakes_a_blocked_reader_at_once(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    r = ch.reader(0)
    w = ch.writer()
    w.write("before", timeout_s=5)
    assert r.read(timeout_s=5) == "before"
    thread, out = in_thread(lambda: r.read(timeout_s=20))
    time.sleep(0.2)
    closed_at = time.monotonic()
    w.close()
    thread.join(5)
    assert isinstance(out.get("error"), ChannelClosedError)
    assert out["at"] - closed_at < 0.1
    assert ch.closed


@pytest.mark.parametrize("kind", KINDS)
def test_close_wakes_a_blocked_writer_and_values_before_it_stay_readable(
        kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=2)
    w, r = ch.writer(), ch.reader(0)
    w.write(1, timeout_s=5)
    w.write(2, timeout_s=5)
    thread, out = in_thread(lambda: w.write(3, timeout_s=20))
    time.sleep(0.2)
    closed_at = time.monotonic()
    r.close()
    thread.join(5)
    assert isinstance(out.get("error"), ChannelClosedError)
    assert out["at"] - closed_at < 0.1
    with pytest.raises(ChannelClosedError, match="was closed"):
        w.write(4, timeout_s=1)
    assert [r.read(timeout_s=1), r.read(timeout_s=1)] == [1, 2]
    with pytest.raises(ChannelClosedError):
        r.read(timeout_s=1)


@pytest.mark.parametrize("kind", KINDS)
def test_mark_broken_names_the_reason(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    r = ch.reader(0)
    thread, out = in_thread(lambda: r.read(timeout_s=20))
    time.sleep(0.1)
    ch.writer().mark_broken("actor Stage (pid 4242) died")
    thread.join(5)
    assert isinstance(out.get("error"), ChannelClosedError)
    assert "actor Stage (pid 4242) died" in str(out["error"])


@pytest.mark.parametrize("kind", KINDS)
def test_an_unpicklable_value_fails_alone(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    w, r = ch.writer(), ch.reader(0)
    lock = threading.Lock()
    if kind == "inproc":            # no serialization: the object itself is handed over
        w.write(lock, timeout_s=1)
        assert r.read(timeout_s=1) is lock
    else:
        with pytest.raises(TypeError, match="cannot write a value of type lock"):
            w.write(lock, timeout_s=1)
        with pytest.raises(TypeError, match="cannot write a value of type list"):
            w.write([1, lock], timeout_s=1)
    w.write("still fine", timeout_s=1)
    assert r.read(timeout_s=1) == "still fine"


def test_inproc_endpoints_refuse_to_cross_processes() -> None:
    with pytest.raises(TypeError, match="cannot be sent to another process"):
        pickle.dumps(InProcChannel().reader(0))


@pytest.mark.parametrize("kind", KINDS)
def test_roles_are_checked(kind: str, factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    with pytest.raises(TypeError, match="not the writer endpoint"):
        ch.reader(0).write(1)
    with pytest.raises(TypeError, match="not a reader endpoint"):
        ch.writer().read(timeout_s=0)
    with pytest.raises(IndexError, match="reader index 1 out of range for 1 readers"):
        ch.reader(1)


# ---------------------------------------------------------------- across processes

@pytest.mark.parametrize("kind", CROSS)
def test_echo_through_a_child_process(kind: str, factory: Callable[..., Channel]) -> None:
    there, back = factory(kind), factory(kind)
    values = [7, "x", np.arange(100_000), {"k": [1, 2]}]
    child = SPAWN.Process(target=peers.echo, args=(there.reader(0), back.writer(), len(values)))
    child.start()
    try:
        w, r = there.writer(), back.reader(0)
        for value in values:
            w.write(value, timeout_s=10)
            got = r.read(timeout_s=10)
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got, value)
            else:
                assert got == value
    finally:
        child.join(10)
    assert child.exitcode == 0


@pytest.mark.parametrize("kind", CROSS)
def test_a_killed_writer_wakes_its_blocked_reader(kind: str,
                                                  factory: Callable[..., Channel]) -> None:
    ch = factory(kind)
    ready, ready_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=peers.write_then_sleep, args=(ch.writer(), "one", ready_there))
    child.start()
    r = ch.reader(0)
    try:
        assert ready.poll(20) and ready.recv() == "ready"
        assert r.read(timeout_s=10) == "one"
        err = error_when_killed(child.pid, lambda: r.read(timeout_s=20))
        assert isinstance(err, ChannelClosedError), err
    finally:
        child.kill()
        child.join(5)


@pytest.mark.parametrize("kind", CROSS)
def test_a_killed_reader_wakes_its_blocked_writer(kind: str,
                                                  factory: Callable[..., Channel]) -> None:
    ch = factory(kind, capacity=2)
    ready, ready_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=peers.attach_and_sleep, args=(ch.reader(0), ready_there))
    child.start()
    w = ch.writer()
    try:
        assert ready.poll(20) and ready.recv() == "ready"
        w.write(1, timeout_s=10)
        w.write(2, timeout_s=10)
        err = error_when_killed(child.pid, lambda: w.write(3, timeout_s=20))
        assert isinstance(err, ChannelClosedError), err
    finally:
        child.kill()
        child.join(5)
