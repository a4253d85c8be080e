"""The socket channel: across threads and processes, authentication, refusals, closes and deaths."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from headrace.channels.codec import HEADER_BYTES, encode
from headrace.channels.inproc import InProcChannel
from headrace.channels.socket import CurveAuth, HMACAuth, SocketChannel
from headrace.channels.socket_wire import _CREDIT, _CREDIT_MSG, _close_body
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


def stranger(endpoint: str) -> zmq.Socket:
    """A local process's DEALER: it reached the port, but it has no endpoint and so no key."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def zmtp_router_handshake(conn: socket.socket) -> None:
    """Speak ZMTP 3.0 as a ROUTER with the NULL mechanism, as a writer's socket would."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER"
    conn.sendall(greeting + bytes([0x04, len(ready)]) + ready)


def stream_zeros(conn: socket.socket, limit: int) -> int:
    """Send up to ``limit`` zero bytes; how many the peer took before it hung up."""
    sent, chunk = 0, bytes(1 << 20)
    try:
        while sent < limit:
            conn.sendall(chunk)
            sent += len(chunk)
    except OSError:                 # reset or broken pipe: the peer hung up
        pass
    return sent


# -------------------------------------------------------------------------------- the tests

def test_round_trip_between_two_threads_in_order(channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 4)
    w, r = ch.writer(), ch.reader(0)
    thread, out = in_thread(lambda: [w.write(i, timeout_s=10) for i in range(3000)])
    assert [r.read(timeout_s=10) for _ in range(3000)] == list(range(3000))
    thread.join(10)
    assert "error" not in out
    stats = r.statistics()
    assert stats.keys() == InProcChannel().statistics().keys() | {"refused"}
    assert stats["refused"] == 0 and stats["values"] == 3000 and stats["bytes"] > 0 and w.statistics()["waits"] > 0


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


# ----------------------------------------- strangers: every channel authenticates, sizes are capped

def test_a_loopback_channel_without_auth_makes_a_secret_its_endpoints_carry() -> None:
    one, two = SocketChannel(1, 2), SocketChannel(1, 2)
    reader = pickle.loads(pickle.dumps(one.reader(0)))
    assert isinstance(reader._cfg.auth, HMACAuth) and len(reader._cfg.auth.secret) == 32
    assert reader._cfg.auth.secret == one._cfg.auth.secret != two._cfg.auth.secret
    one.close()
    two.close()


def test_a_strangers_close_on_loopback_does_not_end_the_pair(
        channels: Callable[..., SocketChannel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    ch = channels(1, 4)                                     # loopback, no auth given
    w, r = ch.writer(), ch.reader(0)
    w.write("before", timeout_s=5)
    assert r.read(timeout_s=5) == "before"
    rogue = stranger(ch.endpoint)
    rogue.send(_close_body("a stranger says stop"))         # a CLOSE as _tell_writer sends it
    rogue.close(linger=1000)                                # its hang-up wakes the writer
    assert wait_for(lambda: len(refusals(caplog, "missing or wrong HMAC")) == 1)
    for i in range(10):                                     # more than the window
        w.write(i, timeout_s=5)
        assert r.read(timeout_s=5) == i
    assert not ch.closed and w.statistics()["refused"] == 1


def test_a_strangers_close_to_a_reader_is_refused(
        channels: Callable[..., SocketChannel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    ch = channels(1, 4)
    squatter = zmq.Context.instance().socket(zmq.ROUTER)   # took the port before the writer
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(ch.endpoint)
    try:
        r = ch.reader(0)
        with pytest.raises(ChannelTimeoutError):
            r.read(timeout_s=0)                             # connects and says hello
        assert squatter.poll(5000)
        rid = squatter.recv_multipart()[0]
        cut_short = bytearray(b"D" + bytes(HEADER_BYTES))   # promises 100 bytes, sends none
        encode(b"x" * 100).pack_header(cut_short, 1)
        squatter.send_multipart([rid, cut_short])
        squatter.send_multipart([rid, _close_body("a stranger says stop")])
        with pytest.raises(ChannelTimeoutError):            # not ChannelClosedError
            r.read(timeout_s=0.3)
        assert r.statistics()["refused"] >= 1 and not r.closed
        assert refusals(caplog, "reader 0 of socket channel")
    finally:
        squatter.close()


def test_a_reader_hangs_up_on_a_peer_announcing_2_gb_before_allocating_it(
        channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2)                                     # the default cap: 1 GiB
    with socket.create_server(("127.0.0.1", ch.port)) as fake:     # a fake writer
        fake.settimeout(5)
        r = ch.reader(0)
        with pytest.raises(ChannelTimeoutError):
            r.read(timeout_s=0)                             # connects to the fake
        conn, _ = fake.accept()
        with conn:
            conn.settimeout(5)
            zmtp_router_handshake(conn)
            before = rss_bytes()
            conn.sendall(b"\x02" + struct.pack(">Q", 2 << 30))    # one frame of 2 GiB
            sent = stream_zeros(conn, 256 << 20)
            grown = rss_bytes() - before
    assert sent < 64 << 20, f"the reader took {sent >> 20} MiB of a frame over its cap"
    assert grown < 50 << 20, f"the reader grew by {grown >> 20} MiB"


def test_a_value_over_max_message_bytes_fails_alone(
        channels: Callable[..., SocketChannel]) -> None:
    ch = channels(1, 2, max_message_bytes=1024)
    w, r = ch.writer(), ch.reader(0)
    with pytest.raises(ValueError, match=r"^cannot write a value of 2048 bytes to <SocketChannel "
                                         r"writer.*: its readers accept at most 1024 bytes "
                                         r"\(max_message_bytes\), .*\n\nPass a larger"):
        w.write(b"x" * 2048, timeout_s=5)
    w.write(b"y" * 1024, timeout_s=5)
    assert r.read(timeout_s=5) == b"y" * 1024
    with pytest.raises(ValueError, match="^max_message_bytes must be a positive number"):
        SocketChannel(max_message_bytes=0)


def test_a_flood_of_forged_frames_logs_a_few_lines_and_counts_them_all(
        channels: Callable[..., SocketChannel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    ch = channels(1, 4)
    w, r = ch.writer(), ch.reader(0)
    w.write("before", timeout_s=5)
    assert r.read(timeout_s=5) == "before"
    rogue = stranger(ch.endpoint)
    started = time.monotonic()
    for count in range(1000):                               # credits, as a key-less reader's
        rogue.send(_CREDIT_MSG.pack(_CREDIT, 0, count))
    rogue.close(linger=1000)
    for i in range(10):                                     # the writer serves them meanwhile
        w.write(i, timeout_s=5)
        assert r.read(timeout_s=5) == i
    assert wait_for(lambda: w.statistics()["refused"] == 1000)
    assert wait_for(lambda: "1000 refused so far" in refusals(caplog, "refused")[-1], 3.0)
    lines = refusals(caplog, "refused")
    # a burst of 5 lines, then at most one a second (however slowly this machine serves them)
    assert len(lines) <= 6 + (time.monotonic() - started), lines
    reports = [int(m.group(1)) for line in lines
               for m in [re.search(r"refused (\d+) more since the last report", line)] if m]
    singles = [line for line in lines if not re.search(r"refused \d+ more since", line)]
    summed = [int(m.group(1)) for line in singles
              for m in [re.search(r"; (\d+) more since the last report", line)] if m]
    assert len(singles) + sum(reports) + sum(summed) == 1000, lines   # every one reported
    assert not ch.closed
