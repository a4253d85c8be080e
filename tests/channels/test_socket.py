"""The socket channel: across threads and processes, authentication, refusals, closes and deaths."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from headrace.channels.inproc import InProcChannel
from headrace.channels.socket import CurveAuth, HMACAuth, SocketChannel
from headrace.exceptions import ChannelClosedError, ChannelTimeoutError

from .peers import error_when_killed, in_thread

SPAWN = mp.get_context("spawn")
LOGGER = "headrace.channels.socket"


# ------------------------------------------------- run in child processes (importable for spawn)

def read_and_report(reader: Any, count: int, out: Any) -> None:
    out.send([reader.read(timeout_s=10) for _ in range(count)])
    reader.close()


def write_and_wait(writer: Any, values: list[Any], bye: Any) -> None:
    for value in values:
        writer.write(value, timeout_s=10)
    bye.poll(10)                    # the parent has read them all
    writer.close()


def read_then_close_on_demand(reader: Any, ready: Any, go: Any) -> None:
    ready.send(reader.read(timeout_s=10))
    if go.poll(10):
        reader.close()
        ready.send("closed")


def read_until_closed(reader: Any, out: Any) -> None:
    got = []
    try:
        while True:
            got.append(reader.read(timeout_s=10))
            out.send(("value", got[-1]))
    except ChannelClosedError as exc:
        out.send(("closed", str(exc)))


def attach_and_sleep(reader: Any, ready: Any) -> None:
    ready.send(reader.read(timeout_s=10))
    time.sleep(60)                  # the test kills us


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def channels() -> Iterator[Callable[..., SocketChannel]]:
    made: list[SocketChannel] = []

    def make(*args: Any, **kwargs: Any) -> SocketChannel:
        made.append(SocketChannel(*args, **kwargs))
        return made[-1]

    yield make
    for ch in made:
        ch.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def refusals(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.ERROR and text in r.getMessage()]


def socket_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("headrace-socket")]


# -------------------------------------------------------------------------------- the tests

def test_round_trip_between_two_threads_in_order(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 4)
    w, r = ch.writer(), ch.reader(0)
    thread, out = in_thread(lambda: [w.write(i, timeout_s=10) for i in range(3000)])
    assert [r.read(timeout_s=10) for _ in range(3000)] == list(range(3000))
    thread.join(10)
    assert "error" not in out
    stats = r.statistics()
    assert stats.keys() == InProcChannel().statistics().keys()
    assert stats["values"] == 3000 and stats["bytes"] > 0 and w.statistics()["waits"] > 0


def test_a_large_array_arrives_without_a_copy(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)
    w, r = ch.writer(), ch.reader(0)
    big = np.arange(100 * 2 ** 20 // 8, dtype=np.int64)          # 100 MB
    w.write(big, timeout_s=30)
    got = r.read(timeout_s=30)
    assert not got.flags.owndata                                  # a view of the zmq frame
    np.testing.assert_array_equal(got, big)


def test_an_unpicklable_value_fails_alone(channels: Callable[..., SocketChannel]) -> None:
    ch = channels()
    w, r = ch.writer(), ch.reader(0)
    with pytest.raises(TypeError, match="cannot write a value of type lock"):
        w.write(threading.Lock(), timeout_s=1)
    w.write("still fine", timeout_s=5)
    assert r.read(timeout_s=5) == "still fine"


def test_endpoints_pickle_with_their_address_role_and_auth() -> None:
    ch = SocketChannel(3, 5, auth=HMACAuth(b"k" * 16))
    r2 = pickle.loads(pickle.dumps(ch.reader(2)))
    assert (r2.role, r2.host, r2.port) == (2, "127.0.0.1", ch.port)
    assert repr(r2) == f"<SocketChannel reader 2, 3 readers, tcp://127.0.0.1:{ch.port}>"
    assert isinstance(r2._cfg.auth, HMACAuth) and r2._cfg.auth.secret == b"k" * 16
    assert r2.statistics()["capacity"] == 5
    ch.close()


def test_reader_in_a_child_process(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 3)
    values = [1, "two", {"three": [3.0]}, np.arange(200_000), None]
    got, got_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=read_and_report, args=(ch.reader(0), len(values), got_there))
    child.start()
    try:
        w = ch.writer()
        for value in values:
            w.write(value, timeout_s=20)
        assert got.poll(30)
        back = got.recv()
    finally:
        child.join(10)
    assert back[:3] == values[:3] and back[4] is None
    np.testing.assert_array_equal(back[3], values[3])
    assert child.exitcode == 0


def test_writer_in_a_child_process(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)
    bye, bye_there = SPAWN.Pipe(duplex=False)
    values = list(range(10)) + ["end"]
    child = SPAWN.Process(target=write_and_wait, args=(ch.writer(), values, bye))
    child.start()
    try:
        r = ch.reader(0)
        assert [r.read(timeout_s=20) for _ in values] == values
        bye_there.send("bye")
        with pytest.raises(ChannelClosedError, match="was closed"):
            r.read(timeout_s=10)
    finally:
        child.join(10)
    assert child.exitcode == 0


def test_hmac_refuses_garbage_and_forged_frames_and_keeps_working(
        channels: Callable[..., SocketChannel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    ch = channels(1, 4, auth=HMACAuth(os.urandom(32)))
    w, r = ch.writer(), ch.reader(0)
    w.write("before", timeout_s=5)
    assert r.read(timeout_s=5) == "before"
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.connect(ch.endpoint)
    rogue.send(b"garbage")                                        # no HMAC at all
    rogue.send_multipart([b"C" + b"forged close", b"\0" * 32])    # a wrong HMAC
    rogue.send_multipart([b"H" * 21, b"\0" * 32])                 # a forged hello
    rogue.close(linger=1000)                                      # its hang-up wakes the writer
    assert wait_for(lambda: len(refusals(caplog, "missing or wrong HMAC")) == 3)
    for i in range(10):                                           # more than the window
        w.write(i, timeout_s=5)
        assert r.read(timeout_s=5) == i
    assert not ch.closed


def test_curve_admits_the_readers_key_only(
        channels: Callable[..., SocketChannel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    auth = CurveAuth.generate()
    ch = channels(1, 4, auth=auth)
    w, r = ch.writer(), ch.reader(0)
    w.write(b"secret", timeout_s=5)
    assert r.read(timeout_s=5) == b"secret"
    wrong = CurveAuth(auth.server_public, auth.server_secret, *zmq.curve_keypair())
    impostor = channels(1, 4, port=ch.port, auth=wrong).reader(0)
    with pytest.raises(ChannelTimeoutError):
        impostor.read(timeout_s=0.5)
    assert wait_for(lambda: bool(refusals(caplog, "unknown CURVE key")))
    w.write(b"more", timeout_s=5)
    assert r.read(timeout_s=5) == b"more"
    assert not ch.closed


def test_non_loopback_hosts_need_authentication(channels: Callable[..., SocketChannel]) -> None:
    with pytest.raises(ValueError, match=r"^a socket channel on host '10\.1\.2\.3' needs "
                                         r"authentication: .*\n\nPass auth=HMACAuth\(secret\)"):
        SocketChannel(host="10.1.2.3", port=5555)
    with pytest.raises(ValueError, match="needs authentication"):
        SocketChannel(host="0.0.0.0")
    with pytest.raises(ValueError, match="at least 16 bytes, got 5"):
        HMACAuth(b"short")
    ch = channels(host="0.0.0.0", auth=HMACAuth(b"s" * 32))      # all interfaces: with auth
    ch.writer().write("hi", timeout_s=5)
    assert ch.reader(0).read(timeout_s=5) == "hi"


def test_close_by_a_reader_elsewhere_wakes_the_writer_and_the_other_reader(
        channels: Callable[..., SocketChannel]) -> None:
    ch = channels(2, 2)
    w, r1 = ch.writer(), ch.reader(1)
    ready, ready_there = SPAWN.Pipe(duplex=False)
    go, go_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=read_then_close_on_demand, args=(ch.reader(0), ready_there, go))
    child.start()
    try:
        w.write(0, timeout_s=20)
        assert ready.poll(30) and ready.recv() == 0 and r1.read(timeout_s=5) == 0
        for i in (1, 2):                    # reader 0 falls two behind: the window is full
            w.write(i, timeout_s=5)
            assert r1.read(timeout_s=5) == i
        writer, wrote = in_thread(lambda: w.write(3, timeout_s=20))
        reader, read = in_thread(lambda: r1.read(timeout_s=20))
        time.sleep(0.3)
        assert "at" not in wrote and "at" not in read              # both blocked
        closed_at = time.monotonic()
        go_there.send("close")
        writer.join(5)
        reader.join(5)
        assert isinstance(wrote.get("error"), ChannelClosedError), wrote
        assert isinstance(read.get("error"), ChannelClosedError), read
        assert wrote["at"] - closed_at < 0.1 and read["at"] - closed_at < 0.1
        assert ready.poll(10) and ready.recv() == "closed"
        assert ch.closed
    finally:
        child.join(10)


def test_the_owner_closes_a_channel_whose_endpoints_are_all_elsewhere(
        channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)
    out, out_there = SPAWN.Pipe(duplex=False)
    bye, bye_there = SPAWN.Pipe(duplex=False)
    reader = SPAWN.Process(target=read_until_closed, args=(ch.reader(0), out_there))
    writer = SPAWN.Process(target=write_and_wait, args=(ch.writer(), ["only"], bye))
    reader.start()
    writer.start()
    try:
        assert out.poll(30) and out.recv() == ("value", "only")
        closed_at = time.monotonic()
        ch.mark_broken("the driver stopped")
        assert out.poll(10)
        kind, message = out.recv()
        assert kind == "closed" and "the driver stopped" in message
        assert time.monotonic() - closed_at < 0.1
    finally:
        bye_there.send("bye")
        reader.join(10)
        writer.join(10)
    assert reader.exitcode == writer.exitcode == 0


def test_the_owner_closes_a_channel_whose_writer_never_started(
        channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)
    out, out_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=read_until_closed, args=(ch.reader(0), out_there))
    child.start()
    try:
        time.sleep(1.0)                     # the child is up and blocked on its read
        ch.mark_broken("the driver gave up")
        assert out.poll(20)
        kind, message = out.recv()
        assert kind == "closed" and "the driver gave up" in message
    finally:
        child.join(10)
    assert child.exitcode == 0


def test_a_killed_reader_wakes_the_blocked_writer(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)
    ready, ready_there = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=attach_and_sleep, args=(ch.reader(0), ready_there))
    child.start()
    w = ch.writer()
    try:
        w.write("first", timeout_s=20)
        assert ready.poll(30) and ready.recv() == "first"
        w.write(1, timeout_s=5)
        w.write(2, timeout_s=5)
        err = error_when_killed(child.pid, lambda: w.write(3, timeout_s=20))
        assert isinstance(err, ChannelClosedError), err
        assert "reader 0 disconnected" in str(err)
    finally:
        child.kill()
        child.join(10)


def test_no_thread_outlives_the_close() -> None:
    ch = SocketChannel(1, 2, auth=CurveAuth.generate())
    w, r = ch.writer(), ch.reader(0)
    w.write(1, timeout_s=5)
    assert r.read(timeout_s=5) == 1
    assert socket_threads()                 # the writer's watcher, the readers' monitors
    ch.close()
    assert wait_for(lambda: not socket_threads(), 2.0), socket_threads()
    with pytest.raises(ChannelClosedError):
        w.write(2, timeout_s=1)
