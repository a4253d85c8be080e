"""The TCP channel against hostile peers: whatever reaches its port is refused, logged and
dropped without a big allocation, and the legitimate reader goes on; values arrive signed."""

from __future__ import annotations

import logging
import resource
import socket
import struct
import time

import numpy as np
import pytest

from headrace.channels.tcp import TcpChannel

HEAD = struct.Struct("<4sBxxxQQ")


def _open(ch: TcpChannel):
    w, r = ch.writer(), ch.reader(0)
    w.write("first", timeout_s=5)
    assert r.read(timeout_s=5) == "first"          # the writer listens, the reader is attached
    return w, r


def _poke(ch: TcpChannel, data: bytes, hold_s: float = 0.2) -> None:
    with socket.create_connection(("127.0.0.1", ch._cfg.port), timeout=5) as s:
        s.sendall(data)
        time.sleep(hold_s)


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100,                      # not our protocol at all
    HEAD.pack(b"HRT1", 3, 0, 2 ** 31) + b"junk",                 # a 2 GB length prefix
    HEAD.pack(b"HRT1", 3, 0, 16) + b"\0" * 16 + b"\0" * 32,      # a HELLO signed with nothing
    HEAD.pack(b"HRT1", 3, 0, 16)[:10],                           # truncated, then gone
])
def test_junk_on_the_port_is_refused_logged_and_the_channel_works(junk: bytes, caplog) -> None:
    ch = TcpChannel(1, 4)
    try:
        w, r = _open(ch)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with caplog.at_level(logging.ERROR, logger="headrace.channels.tcp"):
            _poke(ch, junk)
            w.write(1, timeout_s=5)             # the writer's own thread meets the junk too
            deadline = time.monotonic() + 3
            while not caplog.records and time.monotonic() < deadline:
                w.write(0, timeout_s=5)
                assert r.read(timeout_s=5) in (0, 1)
        assert any("refused" in rec.message for rec in caplog.records), caplog.text
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
        w.write(np.arange(10), timeout_s=5)
        got = [r.read(timeout_s=5) for _ in range(2)]
        assert got[0] in (0, 1) and np.array_equal(got[-1], np.arange(10)) or \
            np.array_equal(got[0], np.arange(10))
        assert w.statistics()["refused"] >= 1
    finally:
        ch.close()


def test_a_forged_reader_with_the_wrong_secret_gets_nothing() -> None:
    ch = TcpChannel(2, 4)
    try:
        w, r = ch.writer(), ch.reader(0)
        forged = TcpChannel(2, 4, port=ch._cfg.port)             # another secret, same port
        forged._cfg.cid = ch._cfg.cid                            # even knowing the channel id
        thief = forged.reader(1)
        w.write("a", timeout_s=5)
        assert r.read(timeout_s=5) == "a"
        with pytest.raises(Exception):                           # never a value
            thief.read(timeout_s=0.5)
        assert w.statistics()["refused"] >= 1
    finally:
        ch.close()


def test_an_oversized_value_is_refused_by_the_writer_and_the_reader() -> None:
    ch = TcpChannel(1, 4, max_message_bytes=1000)
    try:
        w, r = _open(ch)
        with pytest.raises(ValueError, match="at most 1000 bytes"):
            w.write(b"x" * 5000, timeout_s=5)
        w.write(b"y" * 100, timeout_s=5)
        assert r.read(timeout_s=5) == b"y" * 100
    finally:
        ch.close()


def test_big_values_arrive_intact_in_order() -> None:
    ch = TcpChannel(1, 2)
    try:
        w, r = _open(ch)
        arr = np.random.default_rng(0).random(3_000_000)
        import threading
        out = []
        t = threading.Thread(target=lambda: out.extend(r.read(timeout_s=30) for _ in range(3)))
        t.start()
        for k in range(3):
            w.write(arr + k, timeout_s=30)
        t.join(30)
        assert all(np.array_equal(v, arr + k) for k, v in enumerate(out))
    finally:
        ch.close()


def test_values_of_every_size_back_to_back_arrive_whole_and_in_order() -> None:
    """Small frames arrive several to a recv and a big one may begin inside the reader's buffer
    of bytes received ahead: each value still comes out whole, in order, as itself."""
    rng = np.random.default_rng(1)
    sizes = [0, 1, 7, 100, 16_000, 16_500, 40_000, 65_000, 70_000, 300_000, 3, 2_000_000, 5]
    values: list = [None, 7, 2.5, "x" * 10]
    values += [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    values += [{"k": list(range(50))}, b"tail"]
    ch = TcpChannel(1, len(values) + 1)
    try:
        w, r = _open(ch)
        for v in values:                    # all written before any is read: frames queue up
            w.write(v, timeout_s=30)
        for v in values:
            got = r.read(timeout_s=30)
            if isinstance(v, np.ndarray):
                assert np.array_equal(got, v)
            else:
                assert got == v and type(got) is type(v)
    finally:
        ch.close()


class _RawWriter:
    """A writer of our own on the channel's port (the channel's writer is never opened): sends
    frames the reader must take, in whatever pieces the test asks for."""

    def __init__(self, ch: TcpChannel) -> None:
        self.cfg = ch._cfg
        self.srv = socket.create_server(("127.0.0.1", ch._cfg.port))
        self.srv.settimeout(5)
        self.conn: socket.socket | None = None

    def accept(self) -> None:
        self.conn, _ = self.srv.accept()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def frame(self, value, seq: int) -> bytes:
        import hmac

        from headrace.channels.codec import HEADER_BYTES, encode
        enc = encode(value)
        body = bytearray(HEADER_BYTES)
        enc.pack_header(body)
        body += b"".join(bytes(memoryview(v).cast("B")) for v in enc.views())
        head = HEAD.pack(b"HRT1", 1, seq, len(body))
        return head + body + hmac.digest(self.cfg.key, head + body, "sha256")

    def close(self) -> None:
        for s in (self.conn, self.srv):
            if s is not None:
                s.close()


def _read_in_thread(r):
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["values"] = [r.read(timeout_s=10) for _ in range(out.setdefault("n", 1))]
        except Exception as exc:            # noqa: BLE001 - the test looks at it
            out["error"] = exc
        out["took"] = time.monotonic() - start
    return out, run


def test_frames_arriving_in_small_pieces_are_read_whole() -> None:
    """Signed frames cut into 7-byte pieces (a big one, then a small one): the reader puts each
    together, through its buffer and straight into a big value's memory, and checks it."""
    import threading
    ch = TcpChannel(1, 4)
    raw = _RawWriter(ch)
    try:
        r = ch.reader(0)
        big = np.arange(5000)                               # 40 KB: the big-frame path
        out, run = _read_in_thread(r)
        out["n"] = 2
        reader = threading.Thread(target=run)
        reader.start()
        raw.accept()
        data = raw.frame(big, 0) + raw.frame("hi", 1)
        for at in range(0, len(data), 7):
            raw.conn.sendall(data[at:at + 7])
            if at % 700 == 0:
                time.sleep(0.001)
        reader.join(10)
        assert "error" not in out, out.get("error")
        assert np.array_equal(out["values"][0], big) and out["values"][1] == "hi"
    finally:
        raw.close()
        ch.close()


@pytest.mark.parametrize("then", ["stall", "close"])
def test_a_writer_that_stops_mid_frame_fails_the_read_in_bounded_time(then, monkeypatch) -> None:
    """Half a frame, then silence (no byte for the stall bound) or a closed connection: the
    read fails as a closed channel (no value, no hang), in time."""
    import threading

    import headrace.channels.tcp as tcp
    from headrace.exceptions import ChannelClosedError
    monkeypatch.setattr(tcp, "_STALL_S", 0.5)
    ch = TcpChannel(1, 4)
    raw = _RawWriter(ch)
    try:
        r = ch.reader(0)
        out, run = _read_in_thread(r)
        reader = threading.Thread(target=run)
        reader.start()
        raw.accept()
        data = raw.frame(np.arange(5000), 0)
        raw.conn.sendall(data[:len(data) // 2])
        if then == "close":
            raw.conn.close()
            raw.conn = None
        reader.join(5)
        assert not reader.is_alive()
        assert isinstance(out.get("error"), ChannelClosedError), out
        assert out["took"] < (3.0 if then == "stall" else 1.0), out["took"]
        if then == "stall":
            assert "stalled" in str(out["error"])
    finally:
        raw.close()
        ch.close()
