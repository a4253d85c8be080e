"""The TCP channel: one writer, n readers over plain TCP sockets, every frame signed.

In: a ``TcpChannel`` owner handle (host, port, readers, capacity, secret); its endpoints pickle
to the processes that write and read, on any host that reaches ``host:port``. Out: the
``channels.base`` contract, with a value costing one ``sendmsg`` and one ``recv_into`` (no
I/O thread in between: the writer's and the reader's own threads do the I/O).
Invariants:
- Values travel in the codec's format: frame = header (magic, kind, seq, length), body (the codec
  header and payload, sent from the value's own buffers with ``sendmsg``), and an HMAC-SHA256 of
  header and body, keyed per channel from a secret that travels only inside the endpoints.
- The writer listens; readers connect and say HELLO (their index, signed). A connection whose
  frame is malformed, unsigned, oversized (control frames are at most ``_CONTROL_MAX`` bytes; a
  value at most ``max_message_bytes``) or badly signed is logged and dropped before anything is
  allocated for its body; the legitimate peers go on.
- Credits: a reader acknowledges what it read every ``max(1, capacity // 2)`` values; the
  writer blocks while a reader is ``capacity`` values behind. Values for a reader that has not
  connected yet wait in the writer (copied), inside the same window.
- A close reaches everyone: the writer sends CLOSE to its readers; a reader or the owner sends
  CLOSE to the writer, whose watcher thread (running while no ``write`` does) passes it on. A
  dead peer is a closed connection (or, for a vanished host, TCP keepalive within ~2 s).

  writer process                                          reader process i
  write(v) ─encode─▶ sendmsg[hdr, codec hdr, buffers.., mac] ══tcp══▶ recv_into ─▶ verify ─▶ v
  watcher thread: accept, HELLO, credits K, CLOSE   ◀══ H(i), K(n), C(reason) ══ reader / owner
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any

from .base import WRITER, Channel, closed_error, timeout_error, timeout_ns
from .codec import HEADER_BYTES, decode, encode, read_header
from ..exceptions import WouldBlock

_log = logging.getLogger(__name__)

_MAGIC = b"HRT1"
_HEAD = struct.Struct("<4sBxxxQQ")          # magic, kind, seq (or count), body length
_MAC = 32
_DATA, _CLOSE, _HELLO, _CREDIT = 1, 2, 3, 4
_CLOSER = 0xFFFFFFFF                         # HELLO index of an owner that only closes
_CONTROL_MAX = 4096
MAX_MESSAGE_BYTES = 1 << 30
_CONNECT_RETRY_S = 0.005
_SMALL = 16 * 1024          # frames this small are read whole before they are checked
_RECV_BYTES = 64 * 1024     # a reader's buffer of bytes received ahead
_CHUNK = 1 << 20            # bigger ones are signed and checked a chunk at a time
_CONTROL_RECV = 4096        # a writer reads its readers' control frames this much at a time
_STALL_S = 10.0             # a frame begun must be complete within this long
_LATE_S = 0.15              # a closing writer waits this long for readers not yet connected
#: This process's writers, by channel id (a reader here may wait for what they sent).
_WRITERS: weakref.WeakValueDictionary[bytes, Any] = weakref.WeakValueDictionary()
#: This process's readers, by channel id (a close here wakes them at once).
_READERS: dict[bytes, weakref.WeakSet] = {}


def free_port(host: str) -> int:
    """A TCP port free now on ``host`` (an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]
    except OSError as exc:
        raise ValueError(f"cannot pick a free port on host {host!r}: {exc}.\n\n"
                         "Pass port= explicitly when the writer runs on another host.") from exc


def check_args(n_readers: int, capacity: int, port: int, max_message_bytes: int) -> None:
    """The arguments a network channel's owner takes (this one's, the zmq socket channel's).

    Raises:
        ValueError: one is out of range; the message names it.
    """
    if not isinstance(n_readers, int) or n_readers < 1:
        raise ValueError(f"n_readers must be >= 1, not {n_readers}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be >= 1, not {capacity}")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 (pick a free one) to 65535, not {port!r}")
    if not isinstance(max_message_bytes, int) or not 0 < max_message_bytes < 2 ** 62:
        raise ValueError(f"max_message_bytes must be a positive number of bytes, "
                         f"not {max_message_bytes!r}")


class _Config:
    __slots__ = ("host", "port", "n_readers", "capacity", "key", "cid", "max_message_bytes",
                 "_hmac")

    def __init__(self, host: str, port: int, n_readers: int, capacity: int, key: bytes,
                 cid: bytes, max_message_bytes: int) -> None:
        self.host, self.port, self.n_readers, self.capacity = host, port, n_readers, capacity
        self.key, self.cid, self.max_message_bytes = key, cid, max_message_bytes
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)     # keyed once, copied per frame

    def hasher(self) -> Any:
        """A fresh HMAC-SHA256 under this channel's key (a copy of the keyed state: cheaper
        than keying again)."""
        return self._hmac.copy()

    def __reduce__(self) -> tuple:
        return _Config, (self.host, self.port, self.n_readers, self.capacity, self.key,
                         self.cid, self.max_message_bytes)


try:            # what hmac.digest calls, without its Python frame (the hot path of a frame)
    from _hashlib import hmac_digest as _hmac_digest
except ImportError:                         # pragma: no cover - CPython without OpenSSL
    _hmac_digest = hmac.digest


def _mac(key: bytes, data: Any) -> bytes:
    """HMAC-SHA256 of ``data`` (one C call: the hot path of a small frame)."""
    return _hmac_digest(key, data, "sha256")


def _frame(cfg: _Config, kind: int, seq: int, body: list[Any]) -> list[Any]:
    """The buffers of one frame: header, body parts, MAC."""
    size = sum(memoryview(b).nbytes for b in body)
    head = _HEAD.pack(_MAGIC, kind, seq, size)
    return [head, *body, _mac(cfg.key, b"".join([head, *body]))]


def _send(sock: socket.socket, parts: list[Any], deadline: float | None,
          total: int = -1) -> None:
    """Send every byte of ``parts`` on a non-blocking socket: one ``sendmsg`` when the peer has
    room (the usual case, one syscall); otherwise wait for room until ``deadline`` (None: at most
    ``_STALL_S`` without progress).

    Raises:
        TimeoutError: no room came in time.
        OSError: the connection broke.
    """
    if total < 0:
        total = sum(memoryview(p).nbytes for p in parts)
    try:
        sent = sock.sendmsg(parts) if len(parts) <= 64 else 0
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent == total:
        return
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    _skip(views, sent)
    until = deadline if deadline is not None else time.monotonic() + _STALL_S
    while views:
        if not _ready(sock, select.POLLOUT, until):
            raise TimeoutError
        try:
            sent = sock.sendmsg(views[:64])
        except (BlockingIOError, InterruptedError):
            continue
        _skip(views, sent)
        if deadline is None:
            until = time.monotonic() + _STALL_S


def _skip(views: list[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes of ``views`` (in place)."""
    while sent and views:
        n = views[0].nbytes
        if sent >= n:
            sent -= n
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


def _ready(sock: socket.socket, event: int, until: float) -> bool:
    """Wait until ``sock`` is ready for ``event`` (POLLIN/POLLOUT) or ``until`` passes."""
    poller = select.poll()
    poller.register(sock, event | select.POLLERR | select.POLLHUP)
    left = until - time.monotonic()
    return left > 0 and bool(poller.poll(int(left * 1000 + 0.999)))


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2),
                       ("TCP_USER_TIMEOUT", 2000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class _Parser:
    """Frames out of a non-blocking connection's bytes (control frames only: small)."""

    def __init__(self, sock: socket.socket, cfg: _Config, what: str) -> None:
        self.sock, self.cfg, self.what = sock, cfg, what
        self.buf = bytearray()

    def frames(self) -> list[tuple[int, int, bytes]] | None:
        """Frames complete so far; None: the peer left or broke the protocol (dropped)."""
        try:
            while True:     # (a small recv: control frames are tiny, and recv allocates it)
                chunk = self.sock.recv(_CONTROL_RECV, socket.MSG_DONTWAIT)
                if not chunk:
                    return None if not self.buf else self._bad("closed mid-frame")
                self.buf += chunk
                if len(chunk) < _CONTROL_RECV:
                    break
        except BlockingIOError:
            pass
        except OSError:
            return None
        out = []
        while len(self.buf) >= _HEAD.size:
            magic, kind, seq, size = _HEAD.unpack_from(self.buf)
            if magic != _MAGIC or size > _CONTROL_MAX:
                return self._bad(f"a malformed or oversized frame ({size} bytes announced)")
            end = _HEAD.size + size + _MAC
            if len(self.buf) < end:
                break
            head, body = bytes(self.buf[:_HEAD.size]), bytes(self.buf[_HEAD.size:end - _MAC])
            if not hmac.compare_digest(bytes(self.buf[end - _MAC:end]),
                                       _mac(self.cfg.key, head + body)):
                return self._bad("a frame with a bad signature")
            del self.buf[:end]
            out.append((kind, seq, body))
        return out

    def _bad(self, why: str) -> None:
        _log.error("tcp channel %s:%d refused %s from %s", self.cfg.host, self.cfg.port, why,
                   self.what)
        return None


class _Reader:
    """Reader ``index``'s I/O in this process."""

    def __init__(self, cfg: _Config, index: int) -> None:
        self.cfg, self.index = cfg, index
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.closed, self.reason = False, None
        self.gone = False                   # the writer's connection ended (or said CLOSE)
        self._attaching = False
        self._poller: Any = None
        self._polled: Any = None
        self.sock_fd = -1
        self.consumed = self.credited = 0
        self.threshold = max(1, cfg.capacity // 2)
        self.wake_r, self.wake_w = os.pipe()
        self.waits = 0
        self.nbytes = 0
        # bytes received ahead of the frame being read: a small frame comes in one recv
        self._buf = memoryview(bytearray(_RECV_BYTES))
        self._lo = self._hi = 0
        if index != _CLOSER:
            _READERS.setdefault(cfg.cid, weakref.WeakSet()).add(self)

    def _try_connect(self) -> socket.socket | None:
        """One attempt (the writer may not listen yet); HELLO on success."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET)
        try:
            sock.connect((self.cfg.host, self.cfg.port))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT):
                raise
            return None
        _tune(sock)
        sock.setblocking(False)             # waits are polls with deadlines of our own
        _send(sock, _frame(self.cfg, _HELLO, self.index, [self.cfg.cid]), None)
        self.sock, self.sock_fd = sock, sock.fileno()
        return sock

    def _connect(self, deadline: float | None) -> socket.socket:
        """Under ``lock``: connect, retrying until ``deadline`` (the writer starts listening on
        its first use)."""
        while True:
            sock = self.sock or self._try_connect()
            if sock is not None:
                return sock
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            if self._woken(_CONNECT_RETRY_S) and not self.closed:
                raise ConnectionAbortedError

    def attach_later(self) -> None:
        """Keep trying to connect in the background (a reader that asked before the writer
        listened still attaches, as the writer counts on it)."""
        if self._attaching:
            return
        self._attaching = True

        def attach() -> None:
            while not self.closed:
                with self.lock:
                    if self.sock is not None:
                        return
                    try:
                        if self._try_connect() is not None:
                            return
                    except OSError:
                        return
                time.sleep(_CONNECT_RETRY_S)
        threading.Thread(target=attach, daemon=True, name="headrace-tcp-attach").start()

    def _woken(self, wait_s: float) -> bool:
        if self.closed:                     # draining: the pipe stays readable
            time.sleep(wait_s)
            return True
        return bool(select.select([self.wake_r], [], [], wait_s)[0])

    def _recv_exact(self, view: memoryview) -> None:
        """Fill ``view``: from the bytes received ahead first, then from the socket (a big
        rest straight into ``view``; a small one through the buffer, taking what follows it
        too). A frame begun may pause at most ``_STALL_S`` between bytes."""
        need, got = view.nbytes, 0
        if self._hi > self._lo:
            got = min(need, self._hi - self._lo)
            view[:got] = self._buf[self._lo:self._lo + got]
            self._lo += got
        sock, buf = self.sock, self._buf
        while got < need:
            direct = need - got >= _RECV_BYTES // 2
            try:
                n = sock.recv_into(view[got:] if direct else buf)
            except (BlockingIOError, InterruptedError):
                if not _ready(sock, select.POLLIN, time.monotonic() + _STALL_S):
                    raise ConnectionError("the writer stalled mid-frame") from None
                continue
            if not n:
                raise ConnectionError("the writer's connection closed")
            if direct:
                got += n
                continue
            take = min(n, need - got)
            view[got:got + take] = buf[:take]
            got += take
            self._lo, self._hi = take, n

    def _buffered(self) -> bool:
        return self._hi > self._lo

    def has_value(self) -> bool:
        if self.closed:
            return True
        # NOTE: over TCP a value needs some microseconds to arrive: one that a writer in this
        # process already sent is waited for (briefly) rather than missed
        writer = _WRITERS.get(self.cfg.cid)
        sent = writer is not None and not writer.closed and writer.sent > self.consumed
        if self.sock is None:               # attach now (the writer counts on us from then)
            with self.lock:
                try:
                    self._connect(time.monotonic() + (0.5 if sent else 0.02))
                except (TimeoutError, ConnectionAbortedError):
                    self.attach_later()
                    return False
        return self._buffered() or bool(select.select([self.sock], [], [], 0.5 if sent else 0)[0])

    def read(self, ep: Channel, limit: int, timeout_s: float | None) -> Any:
        """The next value; after a close, what the writer sent before it, then the close."""
        with self.lock:
            deadline = None if limit < 0 else time.monotonic() + limit / 1e9
            if self.closed:                 # drain only what is there already
                if self.gone:
                    raise closed_error(ep, self.reason)
                soon = time.monotonic() + _LATE_S
                deadline = soon if deadline is None else min(deadline, soon)
            try:
                sock = self.sock or self._connect(deadline)
                poller = self._poller
                if poller is None or self._polled is not sock:
                    poller = self._poller = select.poll()
                    poller.register(sock, select.POLLIN)
                    poller.register(self.wake_r, select.POLLIN)
                    self._polled = sock
                sfd = sock.fileno()
                while self._hi == self._lo:     # nothing received ahead: wait for bytes
                    ms = -1 if deadline is None else \
                        max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                    events = poller.poll(ms)
                    if events and events[0][0] == sfd or any(fd == sfd for fd, _ in events):
                        break
                    fds = [fd for fd, _ in events]
                    if self.closed and (self.wake_r in fds or not fds):
                        if self.wake_r in fds:
                            poller.unregister(self.wake_r)      # draining: data only now
                            if self._buffered() or select.select(
                                    [sock], [], [], 0.0 if deadline is None else
                                             max(0.0, deadline - time.monotonic()))[0]:
                                break
                        raise closed_error(ep, self.reason)
                    if not fds:
                        raise timeout_error(ep, "read", timeout_s)
                    self.waits += 1
                return self._take(ep)
            except TimeoutError:
                if self.closed:
                    raise closed_error(ep, self.reason) from None
                raise timeout_error(ep, "read", timeout_s) from None
            except ConnectionAbortedError:
                raise closed_error(ep, self.reason) from None
            except (ConnectionError, OSError) as exc:
                self.gone = True
                self._shut(f"the writer of {ep!r} is gone ({exc})")
                raise closed_error(ep, self.reason) from None

    def _fill(self, n: int) -> None:
        """At least ``n`` bytes received ahead (``n`` fits the buffer); a frame begun may
        pause at most ``_STALL_S`` between bytes."""
        buf = self._buf
        if self._lo + n > buf.nbytes:       # make room at the end: move what is left to 0
            left = self._hi - self._lo
            buf[:left] = buf[self._lo:self._hi]
            self._lo, self._hi = 0, left
        while self._hi - self._lo < n:
            try:
                got = self.sock.recv_into(buf[self._hi:])
            except (BlockingIOError, InterruptedError):
                if not _ready(self.sock, select.POLLIN, time.monotonic() + _STALL_S):
                    raise ConnectionError("the writer stalled mid-frame") from None
                continue
            if not got:
                raise ConnectionError("the writer's connection closed")
            self._hi += got

    def _take(self, ep: Channel) -> Any:
        """The next frame: a small one whole from the buffer (one recv, one MAC call), a big
        one straight into memory of its own, checked chunk by chunk."""
        if self._hi - self._lo < _HEAD.size:
            self._fill(_HEAD.size)
        buf, lo = self._buf, self._lo
        magic, kind, seq, size = _HEAD.unpack_from(buf, lo)
        limit = self.cfg.max_message_bytes + HEADER_BYTES if kind == _DATA else _CONTROL_MAX
        if magic != _MAGIC or size > limit or kind not in (_DATA, _CLOSE) or \
                (kind == _DATA and size < HEADER_BYTES):
            _log.error("tcp channel %s:%d: reader %d got a malformed frame (%d bytes announced)",
                       self.cfg.host, self.cfg.port, self.index, size)
            raise ConnectionError("a malformed frame")
        signed = _HEAD.size + size
        if size <= _SMALL:
            if self._hi - lo < signed + _MAC:
                self._fill(signed + _MAC)
                buf, lo = self._buf, self._lo
            good = hmac.compare_digest(buf[lo + signed:lo + signed + _MAC],
                                       _hmac_digest(self.cfg.key, buf[lo:lo + signed], "sha256"))
            # a header-only value (None, a number) decodes from the buffer; others get memory
            # of their own (the value may keep it)
            view = buf[lo + _HEAD.size:lo + signed] if size == HEADER_BYTES else \
                memoryview(bytearray(buf[lo + _HEAD.size:lo + signed]))
            self._lo = lo + signed + _MAC
        else:                               # hashed chunk by chunk, while in the cache
            head = bytes(buf[lo:lo + _HEAD.size])
            self._lo = lo + _HEAD.size
            view = memoryview(bytearray(size + _MAC))
            h = self.cfg.hasher()
            h.update(head)
            for at in range(0, size, _CHUNK):
                chunk = view[at:min(size, at + _CHUNK)]
                self._recv_exact(chunk)
                h.update(chunk)
            self._recv_exact(view[size:])
            good = hmac.compare_digest(view[size:], h.digest())
            view = view[:size]
        if not good:
            _log.error("tcp channel %s:%d: reader %d got a badly signed frame",
                       self.cfg.host, self.cfg.port, self.index)
            raise ConnectionError("a badly signed frame")
        if kind == _CLOSE:
            self.gone = True
            self._shut(bytes(view).decode(errors="replace") or None)
            raise closed_error(ep, self.reason)
        self.consumed += 1
        self.nbytes += size
        if self.consumed - self.credited >= self.threshold:
            self.credited = self.consumed
            _send(self.sock, _frame(self.cfg, _CREDIT, self.consumed, []), None)
        tag, aux, _, scalar = read_header(view, 0)
        return decode(tag, aux, scalar, view[HEADER_BYTES:])

    def _shut(self, reason: str | None) -> None:
        self.closed, self.reason = True, self.reason or reason
        try:
            os.write(self.wake_w, b"c")
        except OSError:
            pass

    def close(self, reason: str | None) -> None:
        """Tell the writer (it tells the others) on a connection of its own; what it sent
        before stays readable on ours."""
        if self.closed:
            return
        self._shut(reason)
        try:
            with socket.create_connection((self.cfg.host, self.cfg.port), timeout=0.5) as sock:
                _send(sock, _frame(self.cfg, _HELLO, _CLOSER, [self.cfg.cid]), None)
                _send(sock, _frame(self.cfg, _CLOSE, 0, [(reason or "").encode()]),
                      time.monotonic() + 0.5)
        except OSError:
            pass

    def __del__(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()


class _Writer:
    """The writer's I/O in this process: the listener, the readers' connections, a watcher."""

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((cfg.host, cfg.port))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.lock = threading.Lock()
        self.conns: list[socket.socket | None] = [None] * cfg.n_readers
        self.queued: list[list[list[bytes]]] = [[] for _ in range(cfg.n_readers)]
        self.pending: dict[socket.socket, _Parser] = {}     # accepted, no HELLO yet
        self.parsers: dict[socket.socket, _Parser] = {}
        self.sent = 0
        self.credit = [0] * cfg.n_readers
        self.closed, self.reason = False, None
        self.waits = self.nbytes = self.refused = 0
        self.wake_r, self.wake_w = os.pipe()
        self.watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="headrace-tcp-writer")
        self.watcher.start()
        _WRITERS[cfg.cid] = self

    def _fds(self) -> list[Any]:
        return [self.listener, *self.pending, *self.parsers]

    def _watch(self) -> None:
        """While no write runs: accept readers and closes. Not the readers' own connections:
        their credits wait for a write that needs them (a wake per credit would cost the
        writer's process a thread switch per value)."""
        while not self.closed:
            conns = set(self.conns)
            closers = [s for s in self.parsers if s not in conns]
            try:
                select.select([self.listener, *self.pending, *closers, self.wake_r], [], [])
            except (OSError, ValueError):      # a socket closed under us: look again
                pass
            with self.lock:
                if self.closed:
                    return
                try:
                    os.read(self.wake_r, 4096) if select.select([self.wake_r], [], [], 0)[0] \
                        else None
                except OSError:
                    return
                self._service()

    def _service(self) -> None:
        """Under ``lock``: accept, read HELLOs, credits and closes, without blocking."""
        self._accept()
        self._control()

    def _accept(self) -> None:
        """Under ``lock``: new connections and their HELLOs (a reader's queued values follow)."""
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, OSError):
                break
            sock.setblocking(False)
            self.pending[sock] = _Parser(sock, self.cfg, f"{addr[0]}:{addr[1]}")
        for sock, parser in list(self.pending.items()):
            frames = parser.frames()
            if frames is None:
                self._drop(sock, pending=True)
                continue
            for kind, seq, body in frames[:1]:
                if kind != _HELLO or body != self.cfg.cid or not (
                        seq == _CLOSER or 0 <= seq < self.cfg.n_readers):
                    parser._bad("a connection that did not say a valid HELLO")
                    self._drop(sock, pending=True)
                    break
                del self.pending[sock]
                if seq == _CLOSER:
                    self.parsers[sock] = parser
                    self._on_frames(sock, frames[1:])
                    break
                old = self.conns[seq]
                if old is not None:
                    self._drop(old)
                _tune(sock)
                self.conns[seq] = sock
                self.parsers[sock] = parser
                for parts in self.queued[seq]:
                    _send(sock, parts, None)
                self.queued[seq].clear()
                self._on_frames(sock, frames[1:])

    def _control(self) -> None:
        """Under ``lock``: credits and closes from connected readers and closers."""
        for sock, parser in list(self.parsers.items()):
            if sock not in self.parsers:
                continue
            if not select.select([sock], [], [], 0)[0]:
                continue
            frames = parser.frames()
            if frames is None:
                index = self._index(sock)
                self._drop(sock)
                if index is not None:
                    self._shut(f"reader {index} disconnected")
                continue
            self._on_frames(sock, frames)

    def _index(self, sock: socket.socket) -> int | None:
        return next((i for i, c in enumerate(self.conns) if c is sock), None)

    def _on_frames(self, sock: socket.socket, frames: list[tuple[int, int, bytes]]) -> None:
        for kind, seq, body in frames:
            index = self._index(sock)
            if kind == _CREDIT and index is not None:
                self.credit[index] = max(self.credit[index], min(seq, self.sent))
            elif kind == _CLOSE:
                self._shut(body.decode(errors="replace") or None)
                return

    def _drop(self, sock: socket.socket, pending: bool = False) -> None:
        (self.pending if pending else self.parsers).pop(sock, None)
        self.refused += pending
        for i, c in enumerate(self.conns):
            if c is sock:
                self.conns[i] = None
        try:
            sock.close()
        except OSError:
            pass

    def _room(self) -> bool:
        return self.sent - min(self.credit) < self.cfg.capacity

    def write(self, ep: Channel, enc: Any, limit: int, timeout_s: float | None) -> None:
        with self.lock:
            if self.closed or not self._room():
                self._wait_room(ep, limit, timeout_s)
            size = HEADER_BYTES + enc.size
            # frame header and codec header in one buffer; the payload from its own buffers
            head = bytearray(_HEAD.size + HEADER_BYTES)
            _HEAD.pack_into(head, 0, _MAGIC, _DATA, self.sent, size)
            enc.pack_header(head, _HEAD.size)
            if enc.size > _SMALL and self.cfg.n_readers == 1 and self.conns[0] is not None:
                self._stream(ep, head, enc.views(), timeout_s)
                return
            if enc.size > _SMALL:           # for several readers: signed piece by piece
                views = enc.views()
                h = self.cfg.hasher()
                for part in (head, *views):
                    h.update(part)
                parts = [head, *views, h.digest()]
            elif enc.size:
                views = enc.views()
                parts = [head, *views, _hmac_digest(self.cfg.key, b"".join([head, *views]),
                                                    "sha256")]
            else:
                parts = [head, _mac(self.cfg.key, head)]
            total = len(head) + enc.size + _MAC
            self.sent += 1
            self.nbytes += size
            for i, sock in enumerate(self.conns):
                if sock is None:
                    self.queued[i].append([bytes(memoryview(p).cast("B")) for p in parts])
                    continue
                try:                        # a value let in gets _STALL_S to go out whole
                    _send(sock, parts, None, total)
                except TimeoutError:
                    self._shut(f"reader {i} stopped reading mid-value")
                    raise timeout_error(ep, "write", timeout_s) from None
                except OSError as exc:
                    self._shut(f"reader {i} is gone ({exc})")
                    raise closed_error(ep, self.reason) from None

    def _wait_room(self, ep: Channel, limit: int, timeout_s: float | None) -> None:
        """Under ``lock``: wait until every reader is less than ``capacity`` values behind
        (their credits are read here; the watcher reads them only while no write runs)."""
        deadline = None if limit < 0 else time.monotonic() + limit / 1e9
        self._control()         # the usual wait: credits already sent (new readers: below)
        while not self._room() and not self.closed:
            self.waits += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise timeout_error(ep, "write", timeout_s)
            select.select(self._fds(), [], [], left)
            self._service()
        if self.closed:
            raise closed_error(ep, self.reason)

    def _stream(self, ep: Channel, head: bytearray, body: list[Any],
                timeout_s: float | None) -> None:
        """A big value to the one reader: signed chunk by chunk as it goes out (each chunk is
        hashed while it is still in the cache), the MAC last. ``head``: frame and codec
        headers."""
        sock = self.conns[0]
        mac = self.cfg.hasher()
        mac.update(head)
        self.sent += 1
        self.nbytes += len(head) - _HEAD.size + sum(memoryview(b).nbytes for b in body)
        try:
            _send(sock, [head], None)
            for part in body:
                view = memoryview(part).cast("B")
                for at in range(0, view.nbytes, _CHUNK):
                    chunk = view[at:at + _CHUNK]
                    mac.update(chunk)
                    _send(sock, [chunk], None)
            _send(sock, [mac.digest()], None)
        except TimeoutError:
            self._shut("reader 0 stopped reading mid-value")
            raise timeout_error(ep, "write", timeout_s) from None
        except OSError as exc:
            self._shut(f"reader 0 is gone ({exc})")
            raise closed_error(ep, self.reason) from None

    def _shut(self, reason: str | None) -> None:
        """Under ``lock``: CLOSE to every reader (late ones too, briefly), then stop."""
        if self.closed:
            return
        self.closed, self.reason = True, reason
        parts = _frame(self.cfg, _CLOSE, 0, [(reason or "").encode()])
        for sock in self.conns:
            if sock is not None:
                try:
                    _send(sock, parts, time.monotonic() + 0.5)
                except OSError:
                    pass
        if any(c is None for c in self.conns):      # late readers hear it too, for a while
            threading.Thread(target=self._tell_late, args=(parts,), daemon=True,
                             name="headrace-tcp-late").start()
        try:
            os.write(self.wake_w, b"c")
        except OSError:
            pass

    def _tell_late(self, parts: list[Any]) -> None:
        until = time.monotonic() + _LATE_S
        told = {i for i, c in enumerate(self.conns) if c is not None}
        while time.monotonic() < until and len(told) < self.cfg.n_readers:
            try:
                select.select([self.listener, *self.pending], [], [], 0.01)
            except (OSError, ValueError):
                return
            with self.lock:
                if self.listener.fileno() < 0:
                    return
                self._accept()
                for i, sock in enumerate(self.conns):
                    if sock is not None and i not in told:
                        told.add(i)
                        try:
                            _send(sock, parts, time.monotonic() + 0.5)
                        except OSError:
                            pass

    def close(self, reason: str | None) -> None:
        with self.lock:
            self._shut(reason)
        if any(c is None for c in self.conns):
            time.sleep(_LATE_S)             # the late readers' turn (see _tell_late)
        with self.lock:
            for sock in [*self.pending, *self.parsers]:
                try:
                    sock.close()
                except OSError:
                    pass
            self.pending.clear()
            self.parsers.clear()
            self.listener.close()
        self.watcher.join(1.0)
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class TcpChannel(Channel):
    """A channel over plain TCP (see the module's docstring): endpoints may live in any
    process, on any host that reaches ``host:port``.

    Args:
        n_readers: How many readers; each gets every value.
        capacity: How many values a reader may be behind before ``write`` blocks.
        host: The address the writer listens on and the readers connect to.
        port: The TCP port; 0 picks one free here now (a writer on another host needs one
            picked there).
        secret: The HMAC key material (>= 16 bytes); default a random one of this channel's,
            which travels only inside its pickled endpoints.
        max_message_bytes: The biggest value (payload bytes) ``write`` sends and a reader
            accepts; a frame announcing more drops its connection before any allocation.

    Raises:
        ValueError: a bad count, port, size or secret.

    Endpoints open lazily: the writer listens on its first use, a reader connects on its first.
    """

    kind = "tcp"

    def __init__(self, n_readers: int = 1, capacity: int = 8, *, host: str = "127.0.0.1",
                 port: int = 0, secret: bytes | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        check_args(n_readers, capacity, port, max_message_bytes)
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be bytes, at least 16 of them (os.urandom(32))")
        cid = os.urandom(16)
        key = _mac(secret or os.urandom(32), b"headrace-tcp" + cid)
        self._cfg = _Config(host, port or free_port(host), n_readers, capacity, key, cid,
                            max_message_bytes)
        self.role: int | None = None
        self._io: Any = None
        self._closed = False

    @property
    def endpoint(self) -> str:
        return f"tcp://{self._cfg.host}:{self._cfg.port}"

    def _with_role(self, role: int) -> TcpChannel:
        ep = TcpChannel.__new__(TcpChannel)
        ep._cfg, ep.role, ep._io, ep._closed = self._cfg, role, None, False
        return ep

    def writer(self) -> TcpChannel:
        return self._with_role(WRITER)

    def reader(self, index: int = 0) -> TcpChannel:
        if not 0 <= index < self._cfg.n_readers:
            raise IndexError(f"reader index {index} out of range for {self._cfg.n_readers} "
                             "readers")
        return self._with_role(index)

    def __reduce__(self) -> tuple:
        return _endpoint, (self._cfg, self.role)

    def _open(self) -> Any:
        if self._io is None:
            if self._closed and self.role == WRITER:
                raise closed_error(self, None)
            self._io = _Writer(self._cfg) if self.role == WRITER else _Reader(self._cfg,
                                                                              self.role)
            if self._closed:                # a reader closed before it read: drains only
                self._io.closed = True
        return self._io

    def write(self, value: Any, timeout_s: float | None = None) -> None:
        self.write_encoded(encode(value), timeout_s)

    def write_encoded(self, enc: Any, timeout_s: float | None = None) -> None:
        if self.role != WRITER:
            self._check_role("writer")
        limit = -1 if timeout_s is None else timeout_ns(timeout_s)
        if enc.size > self._cfg.max_message_bytes:
            raise ValueError(f"cannot write a value of {enc.size} bytes to {self!r}: its "
                             f"readers accept at most {self._cfg.max_message_bytes} bytes "
                             "(max_message_bytes).\n\nPass a larger max_message_bytes= to "
                             "TcpChannel, or send the value in parts.")
        (self._io or self._open()).write(self, enc, limit, timeout_s)

    def read(self, timeout_s: float | None = None) -> Any:
        if self.role is None or self.role < 0:
            self._check_role("reader")
        return (self._io or self._open()).read(
            self, -1 if timeout_s is None else timeout_ns(timeout_s), timeout_s)

    def has_value(self) -> bool:
        self._check_role("reader")
        return self._open().has_value()

    def read_nowait(self) -> Any:
        if not self.has_value():
            raise WouldBlock(f"no value is waiting on {self!r}")
        return self.read(timeout_s=1.0)

    def taken(self) -> int | None:
        return self._io.consumed if isinstance(self._io, _Reader) else 0

    def progress(self) -> None:
        return None

    def close(self) -> None:
        self._close(None)

    def abandon(self) -> None:
        self._close(None)

    def mark_broken(self, reason: str) -> None:
        self._close(str(reason))

    def _close(self, reason: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in list(_READERS.get(self._cfg.cid, ())):   # ours here wake at once
            if reader is not self._io:
                reader._shut(reason)
        io = self._io
        if io is not None:
            io.close(reason)
        elif self.role is None or self.role >= 0:   # the owner, or a reader never opened
            _Reader(self._cfg, _CLOSER).close(reason)
        else:                                       # a writer never opened: tell its readers
            try:
                _Writer(self._cfg).close(reason)
            except OSError:                         # its port is taken: the writer is elsewhere
                _Reader(self._cfg, _CLOSER).close(reason)

    def closed(self) -> bool:
        return self._closed or bool(self._io is not None and self._io.closed)

    def statistics(self) -> dict[str, Any]:
        io = self._io
        role = "owner" if self.role is None else "writer" if self.role == WRITER else \
            f"reader {self.role}"
        out: dict[str, Any] = {"kind": "tcp", "role": role, "endpoint": self.endpoint,
                               "closed": self.closed()}
        if isinstance(io, _Writer):
            out.update(values=io.sent, bytes=io.nbytes, waits=io.waits, refused=io.refused)
        elif isinstance(io, _Reader):
            out.update(values=io.consumed, bytes=io.nbytes, waits=io.waits)
        return out

    def __repr__(self) -> str:
        role = "owner" if self.role is None else "writer" if self.role == WRITER else \
            f"reader {self.role}"
        return f"<TcpChannel {self.endpoint} {role}>"


def _endpoint(cfg: _Config, role: int | None) -> TcpChannel:
    ep = TcpChannel.__new__(TcpChannel)
    ep._cfg, ep.role, ep._io, ep._closed = cfg, role, None, False
    return ep
