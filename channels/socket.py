"""The socket channel: one writer, n readers over pyzmq TCP (other hosts, ``channel="socket"``).

In: a ``SocketChannel`` owner handle (host, port, readers, capacity, auth); its endpoints pickle to
the processes that write and read. Out: the ``channels.base`` contract across processes and hosts.
Invariants:
- Values travel in the codec's frame format, so this channel carries exactly what shm carries;
  readers decode large payloads from the received zmq frame, without a copy.
- Credits: every reader starts with ``capacity`` of them and returns one per value read, as a
  running count (a replayed credit changes nothing). Values for a reader that has not connected
  yet wait in the writer, inside that same window; the writer blocks only when it is full.
- Off loopback, authentication is required: ``HMACAuth`` signs every frame (HMAC-SHA256, keyed
  per channel), ``CurveAuth`` encrypts and admits only the readers' key. Refused peers and frames
  are logged, never raised, and never disturb the legitimate endpoints.
- The writer's ROUTER and its monitor are used only under ``_WriterIO.lock``. The watcher thread
  sleeps on their (edge-triggered) fds, so whoever holds the lock drains what the watcher watches.
- A close reaches everyone: the writer broadcasts CLOSE; a reader or the owner sends CLOSE on a
  connection of its own, whose hang-up wakes the writer's watcher. A dead peer shows up as a
  disconnect (zmq heartbeats catch hosts that vanish); the writer then probes its readers.

  writer process                                     reader process i
  write(v) ─encode─▶ ROUTER ═ D(header) [payload] [mac] ═▶ DEALER ─▶ read() ─decode─▶ v
                     ROUTER ◀══════ H(hello) K(credit) ══ DEALER
  close() anywhere ─▶ C(reason) on a new DEALER ─▶ writer ═ C(reason) ═▶ every reader
  watcher thread (writer process): the monitor, ZAP for CURVE, and the ROUTER while readers
  are missing or after a close; write() drains the credits itself when its window is full.
  monitor thread (reader processes): reads each reader's monitor, wakes it if the writer left.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import zmq
from zmq import zmq_poll
from zmq.utils import z85

from ..exceptions import ChannelTimeoutError
from .base import WRITER, Channel, closed_error, timeout_error, timeout_ns
from .codec import HEADER_BYTES, decode, encode, read_header

_log = logging.getLogger(__name__)

# The first byte of a message's first frame says what it is: Data, Close, Probe, Hello, Kredit.
_DATA, _CLOSE, _PROBE, _HELLO, _CREDIT = b"DCPHK"
_HELLO_MSG = struct.Struct("<BI16s")    # H, reader index, channel id
_CREDIT_MSG = struct.Struct("<BIQ")     # K, reader index, values read so far
_EVENT = struct.Struct("<HI")           # a monitor message: event, value
_DATA_FIRST = 1 + HEADER_BYTES          # D + the codec header

_COPY_MAX = 64 * 1024       # payloads this big or bigger are sent without a copy
_HEARTBEAT_MS = 200         # a peer silent for _PEER_TIMEOUT_MS is dropped (a vanished host)
_PEER_TIMEOUT_MS = 1000
_RECONNECT_MS = 50
_FLUSH_S = 0.5              # a closing endpoint waits at most this long for its close to land
_LATE_S = 0.15              # a closing writer waits this long for readers that never connected
_PROBE_GAPS_S = (0.002, 0.01, 0.03, 0.1, 0.3, 0.6)     # probes after a disconnect: 1 s in all
_CONTROL_MAX_BYTES = 4096   # a bigger message to the writer drops the peer that sent it
_LOG_REFUSALS = 20          # a writer logs its first refusals, then every 1000th

_DISCONNECTED, _LINKED, _AUTH_FAILED = int(zmq.EVENT_DISCONNECTED), \
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED), int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) \
    | _AUTH_FAILED
# The hot path avoids pyzmq's conveniences, each worth microseconds per call: enum flags,
# getsockopt (it builds an enum per call), the sugar send/recv wrappers, zmq.Again exceptions.
_MORE, _LAST, _IN = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK), int(zmq.POLLIN)
_zsend, _zrecv = zmq.backend.Socket.send, zmq.backend.Socket.recv
_NOTHING = object()


class HMACAuth:
    """A shared secret: every frame carries an HMAC-SHA256 of its content, keyed per channel."""

    __slots__ = ("secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"an HMAC secret must be bytes, not {type(secret).__name__}")
        if len(secret) < 16:
            raise ValueError(f"an HMAC secret must be at least 16 bytes, got {len(secret)}.\n\n"
                             "Use e.g. HMACAuth(os.urandom(32)) and give every process the same.")
        self.secret = bytes(secret)

    def __repr__(self) -> str:
        return "HMACAuth(<secret>)"


class CurveAuth:
    """CURVE keys (z85): the writer holds the server pair and admits only the client public key."""

    __slots__ = ("client_public", "client_secret", "server_public", "server_secret")

    def __init__(self, server_public: bytes, server_secret: bytes, client_public: bytes,
                 client_secret: bytes) -> None:
        keys = (server_public, server_secret, client_public, client_secret)
        if not all(isinstance(k, bytes) and len(k) == 40 for k in keys):
            raise ValueError("CURVE keys must be 40-byte z85 strings as zmq.curve_keypair() "
                             "makes them; or use CurveAuth.generate()")
        self.server_public, self.server_secret, self.client_public, self.client_secret = keys

    @classmethod
    def generate(cls) -> CurveAuth:
        """A fresh server keypair and client keypair."""
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE; use HMACAuth(secret) instead")
        return cls(*zmq.curve_keypair(), *zmq.curve_keypair())

    def __repr__(self) -> str:
        return (f"CurveAuth(server={self.server_public.decode()}, "
                f"client={self.client_public.decode()})")


@dataclass(frozen=True, slots=True)
class _Config:
    host: str
    port: int
    n_readers: int
    capacity: int
    auth: HMACAuth | CurveAuth | None
    cid: bytes      # random per channel: ties hellos and HMAC keys to this one channel

    @property
    def endpoint(self) -> str:
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host \
            else f"tcp://{self.host}:{self.port}"


class _Signer:
    __slots__ = ("key",)

    def __init__(self, secret: bytes, cid: bytes) -> None:
        self.key = hmac.digest(secret, b"headrace socket channel " + cid, "sha256")

    def sign(self, first: Any, payload: Any = None) -> bytes:
        if payload is None:
            return hmac.digest(self.key, first, "sha256")
        mac = hmac.new(self.key, first, hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def check(self, first: Any, payload: Any, mac: bytes) -> bool:
        return hmac.compare_digest(self.sign(first, payload), mac)


def _signer(cfg: _Config) -> _Signer | None:
    return _Signer(cfg.auth.secret, cfg.cid) if isinstance(cfg.auth, HMACAuth) else None


# ------------------------------------------------------------------------------ zmq plumbing

def _context(own: bool) -> zmq.Context:
    """This process's shared context (one zmq I/O thread for all its channels), or a new one.

    A CURVE writer owns its context: a ZAP handler serves a whole context.
    """
    if own:
        return zmq.Context()
    with _LOCALS_LOCK:
        if _SHARED[0] is None or _SHARED[1] != os.getpid():
            _SHARED[:] = [zmq.Context(), os.getpid()]
            atexit.register(_at_exit, _SHARED[0])
        return _SHARED[0]


def _at_exit(ctx: zmq.Context) -> None:
    """Close what is still open and let queued values leave, for a bounded time."""
    for local in list(_LOCALS.values()):
        local.finalizer()
    if _SHARED[0] is ctx:           # term() waits for lingering sends, or for ever on a leak
        ender = threading.Thread(target=ctx.term, daemon=True, name="headrace-socket-exit")
        ender.start()
        ender.join(_FLUSH_S + 0.5)


def _socket(ctx: zmq.Context, kind: int, cfg: _Config) -> zmq.Socket:
    sock = ctx.socket(kind)
    hwm = max(1000, cfg.capacity + 64)      # credits keep the queues below this
    for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm),
                          (zmq.HEARTBEAT_IVL, _HEARTBEAT_MS),
                          (zmq.HEARTBEAT_TIMEOUT, _PEER_TIMEOUT_MS),
                          (zmq.HEARTBEAT_TTL, _PEER_TIMEOUT_MS), (zmq.IPV6, int(":" in cfg.host))):
        sock.setsockopt(option, value)
    auth = cfg.auth
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)    # a send to a departed reader fails
        sock.setsockopt(zmq.MAXMSGSIZE, _CONTROL_MAX_BYTES)
        if isinstance(auth, CurveAuth):
            sock.curve_server = True
            sock.curve_secretkey = auth.server_secret
    else:
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
        if isinstance(auth, CurveAuth):
            sock.curve_serverkey = auth.server_public
            sock.curve_publickey = auth.client_public
            sock.curve_secretkey = auth.client_secret
    return sock


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected sockets: a byte written to the second wakes a poll on the first."""
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    return r, w


def _poke(w: socket.socket) -> None:
    try:
        w.send(b"!")
    except OSError:         # full (a wake-up is pending anyway) or already closed
        pass


def _drain_wakes(r: socket.socket) -> None:
    try:
        while r.recv(4096):
            pass
    except OSError:
        pass


def _ms(deadline: float) -> int:
    """Milliseconds until ``deadline`` (monotonic), rounded up; 0 once it passed."""
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _payload(enc: Any) -> Any:
    """The payload as a buffer to send: copied into the message when small, shared when large."""
    if enc.size < _COPY_MAX:
        return enc.payload_bytes()
    import numpy as np  # an uninitialized buffer: no page-zeroing pass before the copy
    buf = np.empty(enc.size, dtype=np.uint8)
    enc.write_payload(memoryview(buf))
    return zmq.Frame(buf, copy=False)


def _close_body(reason: str | None) -> bytes:
    return bytes([_CLOSE]) + (reason or "").encode("utf-8", "replace")[:_CONTROL_MAX_BYTES // 2]


def _tell_writer(cfg: _Config, reason: str | None) -> None:
    """Send CLOSE to the writer on a connection of its own: its hang-up wakes the watcher."""
    sock = _socket(_context(False), zmq.DEALER, cfg)
    try:
        sock.connect(cfg.endpoint)
        body = _close_body(reason)
        signer = _signer(cfg)
        _zsend(sock, body, _LAST if signer is None else _MORE)
        if signer is not None:
            _zsend(sock, signer.sign(body), _LAST)
    finally:
        sock.close(linger=int(_FLUSH_S * 1000))     # the shared I/O thread sends it meanwhile


# ------------------------------------------------------------------------------- the writer

class _WriterIO:
    """The writing side in one process: a bound ROUTER socket, its monitor, a watcher thread."""

    def __init__(self, cfg: _Config, neighbours: dict[int, Any] | None = None) -> None:
        n = cfg.n_readers
        self.cfg = cfg
        self.neighbours = {} if neighbours is None else neighbours     # this process's I/O
        self.lock = threading.Lock()        # guards both sockets and every field below
        self.rids: list[bytes | None] = [None] * n
        self.missing = n                    # invariant: == self.rids.count(None)
        self.queued: list[list[tuple[bytes, Any, bytes | None]]] = [[] for _ in range(n)]
        self.consumed = [0] * n             # values each reader has read, from its credits
        self.floor = 0                      # invariant: == min(self.consumed)
        self.sent = 0
        self.suspects: dict[int, int] = {}  # reader -> probes it answered since a disconnect
        self.probe_at = math.inf            # monotonic time of the next probe round
        self.closed = False
        self.reason: str | None = None
        self.stopping = False               # close() was called in this process
        self.stop_reason: str | None = None
        self.released = False
        self.quit = False
        self.bg_wants = False               # the watcher waits for the lock: poke it after use
        self.refused = 0
        self.values = self.waits = self.nbytes = 0
        self.signer = _signer(cfg)
        self.hdr = bytearray(_DATA_FIRST)
        self.hdr[0] = _DATA
        self.probe = self._control(bytes([_PROBE]))
        self.own_ctx = isinstance(cfg.auth, CurveAuth)
        self.ctx = _context(self.own_ctx)
        self.wake_r, self.wake_w = _wake_pair()     # wakes the writing thread
        self.bg_r, self.bg_w = _wake_pair()         # wakes the watcher
        self.router = self.monitor = self.zap = self.thread = None
        try:
            if self.own_ctx:                # the ZAP handler must exist before the bind
                self.client_key = z85.decode(cfg.auth.client_public)
                self.zap = self.ctx.socket(zmq.REP)
                self.zap.setsockopt(zmq.LINGER, 0)
                self.zap.bind("inproc://zeromq.zap.01")
            self.router = _socket(self.ctx, zmq.ROUTER, cfg)
            self.monitor = self.router.get_monitor_socket(_DISCONNECTED | _FAILED)
            self.router.bind(cfg.endpoint)
            watch = [self.router.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD)]
        except BaseException:
            self._free(0)
            raise
        self.wait_items = [(self.router, _IN), (self.monitor, _IN), (self.wake_r.fileno(), _IN)]
        self.router_ready, self.monitor_ready = [(self.router, _IN)], [(self.monitor, _IN)]
        self.thread = threading.Thread(target=self._watch, args=(watch,), daemon=True,
                                       name=f"headrace-socket-writer:{cfg.port}")
        self.thread.start()

    # ------------------------------------------------------------------ the writing thread

    def write(self, ep: SocketChannel, enc: Any, limit: int, timeout_s: float | None) -> None:
        try:
            with self.lock:
                try:
                    self._check_open(ep)
                    if self.sent - self.floor >= self.cfg.capacity:
                        self.waits += 1
                        self._await_credit(ep, limit, timeout_s)
                    self._send_value(ep, enc)
                finally:
                    if (self.missing or self.closed) and not self.released:
                        self._serve()       # the watcher sleeps on the ROUTER: leave it drained
        finally:
            if self.bg_wants:               # it waits for the lock we just let go
                _poke(self.bg_w)
        self.values += 1
        self.nbytes += HEADER_BYTES + enc.size

    def _check_open(self, ep: SocketChannel) -> None:
        if self.stopping and not self.closed:
            self._shut(self.stop_reason)
        if self.closed:
            raise closed_error(ep, self.reason)

    def _await_credit(self, ep: SocketChannel, limit: int, timeout_s: float | None) -> None:
        deadline = math.inf if limit < 0 else time.monotonic() + limit / 1e9
        late = False
        while True:
            self._serve()
            self._check_open(ep)
            if self.sent - self.floor < self.cfg.capacity:
                return
            if time.monotonic() >= deadline:
                if late or not self._credit_in_flight():
                    raise self._timeout(ep, timeout_s)
                late, deadline = True, time.monotonic() + _FLUSH_S
            until = min(deadline, self.probe_at)
            zmq_poll(self.wait_items, -1 if until == math.inf else _ms(until))
            _drain_wakes(self.wake_r)

    def _credit_in_flight(self) -> bool:
        """Whether a reader in this process already read a value whose credit is on its way."""
        return any(isinstance(io, _ReaderIO) and io.consumed > self.consumed[role]
                   for role, io in list(self.neighbours.items()) if role != WRITER)

    def _timeout(self, ep: SocketChannel, timeout_s: float | None) -> ChannelTimeoutError:
        absent = [i for i, rid in enumerate(self.rids)
                  if rid is None and self.sent - self.consumed[i] >= self.cfg.capacity]
        if not absent:
            return timeout_error(ep, "write", timeout_s)
        return ChannelTimeoutError(
            f"write on {ep!r} timed out after {timeout_s} s: reader(s) {absent} never connected "
            f"to {self.cfg.endpoint}, and {self.cfg.capacity} values already wait for them")

    def _send_value(self, ep: SocketChannel, enc: Any) -> None:
        hdr = self.hdr
        enc.pack_header(hdr, 1)
        payload = _payload(enc) if enc.size else None
        mac = self.signer.sign(hdr, payload) if self.signer else None
        for index, rid in enumerate(self.rids):
            if rid is None:         # not connected yet: it gets the value with its hello
                self.queued[index].append((bytes(hdr), payload, mac))
            elif not self._send(rid, hdr, payload, mac):
                self._shut(self._left(index))
                raise closed_error(ep, self.reason)
        self.sent += 1

    def _send(self, rid: bytes, first: Any, payload: Any, mac: bytes | None) -> bool:
        """Send one message to ``rid``; False when that peer is gone."""
        router = self.router
        try:
            _zsend(router, rid, _MORE)
        except zmq.ZMQError:        # EHOSTUNREACH (ROUTER_MANDATORY): the connection is gone
            return False
        if payload is None and mac is None:
            _zsend(router, first, _LAST)
            return True
        _zsend(router, first, _MORE)
        if payload is not None:
            _zsend(router, payload, _LAST if mac is None else _MORE)
        if mac is not None:
            _zsend(router, mac, _LAST)
        return True

    # --------------------------------------------------------- under the lock, any thread

    def _serve(self) -> None:
        """Handle the monitor's events, due probes and the peers' messages; leaves all drained."""
        while True:
            left: list[int] = []
            while zmq_poll(self.monitor_ready, 0):
                self._on_event(_zrecv(self.monitor))
                _zrecv(self.monitor)            # the endpoint
            if self.suspects and time.monotonic() >= self.probe_at:
                self._probe(left)
            while zmq_poll(self.router_ready, 0):
                frames = [_zrecv(self.router, 0, False)]
                while frames[-1].more:
                    frames.append(_zrecv(self.router, 0, False))
                self._on_message(frames, left)
            if not left:
                return
            for index in left:
                self._shut(self._left(index))

    def _on_event(self, msg: bytes) -> None:
        event, _ = _EVENT.unpack_from(msg)
        if event == _DISCONNECTED:
            # NOTE: the event names an fd, and events lag messages, so a reused fd could blame
            # the wrong reader. Probes decide: a send to a reader whose connection closed fails.
            self._suspect([i for i, rid in enumerate(self.rids) if rid is not None])
        elif event != _AUTH_FAILED:     # the ZAP handler logged those already
            self._refuse(f"a peer that failed the handshake ({zmq.Event(event).name})")

    def _suspect(self, readers: list[int]) -> None:
        for index in readers:
            self.suspects[index] = 0
        if readers:
            self.probe_at = 0.0
            _poke(self.bg_w)

    def _probe(self, left: list[int]) -> None:
        for index, answered in list(self.suspects.items()):
            if not self._send(self.rids[index], *self.probe):
                left.append(index)
                del self.suspects[index]
            elif answered + 1 == len(_PROBE_GAPS_S):
                del self.suspects[index]        # still connected: the disconnect was another's
            else:
                self.suspects[index] = answered + 1
        gaps = [_PROBE_GAPS_S[answered] for answered in self.suspects.values()]
        self.probe_at = time.monotonic() + min(gaps) if gaps else math.inf

    def _on_message(self, frames: list[zmq.Frame], left: list[int]) -> None:
        if len(frames) < 2:
            return self._refuse("an empty message")
        body = frames[1].bytes
        if self.signer is not None:
            if len(frames) != 3 or not self.signer.check(body, None, frames[2].bytes):
                return self._refuse(f"a message with a missing or wrong HMAC ({body[:16]!r})")
        elif len(frames) != 2:
            return self._refuse(f"a message of {len(frames) - 1} frames")
        handler = _ON_MESSAGE.get(body[0] if body else -1)
        if handler is None:
            return self._refuse(f"a message of unknown kind ({body[:16]!r})")
        handler(self, frames[0].bytes, body, left)

    def _on_hello(self, rid: bytes, body: bytes, left: list[int]) -> None:
        if len(body) != _HELLO_MSG.size:
            return self._refuse("a malformed hello")
        _, index, cid = _HELLO_MSG.unpack(body)
        if cid != self.cfg.cid or index >= self.cfg.n_readers:
            return self._refuse(f"a hello for another channel or reader ({index})")
        if self.rids[index] is not None:
            return self._refuse(f"a second hello from reader {index}")
        self.rids[index] = rid
        self.missing -= 1
        if not all(self._send(rid, *message) for message in self.queued[index]):
            left.append(index)
        self.queued[index] = []
        if self.closed:
            self._send(rid, *self._control(_close_body(self.reason)))
        self._suspect([index])          # it may have hung up right after its hello

    def _on_credit(self, rid: bytes, body: bytes, left: list[int]) -> None:
        if len(body) != _CREDIT_MSG.size:
            return self._refuse("a malformed credit")
        _, index, count = _CREDIT_MSG.unpack(body)
        if index >= self.cfg.n_readers or self.rids[index] != rid or count > self.sent:
            return self._refuse(f"a credit that reader {index} did not send")
        if count > self.consumed[index]:
            self.consumed[index] = count
            self.floor = min(self.consumed)

    def _on_close(self, rid: bytes, body: bytes, left: list[int]) -> None:
        self._shut(body[1:].decode("utf-8", "replace") or None)

    def _shut(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed, self.reason = True, reason
        _poke(self.bg_w)                    # the watcher serves the ROUTER again: late hellos
        message = self._control(_close_body(self.reason))
        for rid in self.rids:
            if rid is not None:
                self._send(rid, *message)

    def _control(self, body: bytes) -> tuple[bytes, None, bytes | None]:
        return body, None, self.signer.sign(body) if self.signer else None

    def _left(self, index: int) -> str:
        return f"reader {index} disconnected from {self.cfg.endpoint} (its process may have died)"

    def _refuse(self, what: str) -> None:
        self.refused += 1
        if self.refused <= _LOG_REFUSALS or self.refused % 1000 == 0:
            _log.error("socket channel %s refused %s (%d refused so far)", self.cfg.endpoint,
                       what, self.refused)

    # ---------------------------------------------------------------------- the watcher

    def _watch(self, watch: list[int]) -> None:
        """Serve the sockets while no write() holds them; answer ZAP requests at any time."""
        zap = [(self.zap, _IN)] if self.zap is not None else []
        busy = [(self.bg_r.fileno(), _IN)] + zap
        steady = [(watch[1], _IN)] + busy
        everything = [(watch[0], _IN)] + steady
        try:
            while not self.quit:
                if self.bg_wants:           # the lock's holder serves; it pokes us after
                    zmq_poll(busy, -1)
                else:
                    zmq_poll(everything if self.closed or self.missing else steady,
                             -1 if self.probe_at == math.inf else _ms(self.probe_at))
                _drain_wakes(self.bg_r)
                if self.quit:
                    return
                if zap:
                    self._answer_zap()
                self._serve_idle()
        except Exception:   # noqa: BLE001 - a dying watcher must say why
            _log.exception("the watcher thread of socket channel %s failed", self.cfg.endpoint)

    def _serve_idle(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.bg_wants = True            # the holder pokes us when it lets go
            if not self.lock.acquire(blocking=False):
                return
        self.bg_wants = False
        try:
            if not self.released:
                self._serve()
        finally:
            self.lock.release()

    def _answer_zap(self) -> None:
        zap = self.zap
        while zmq_poll([(zap, _IN)], 0):
            msg = zap.recv_multipart()
            ok = len(msg) >= 7 and msg[5] == b"CURVE" and hmac.compare_digest(msg[6],
                                                                              self.client_key)
            if not ok:
                peer = msg[3].decode("ascii", "replace") if len(msg) > 3 else "?"
                self._refuse(f"a peer at {peer} with an unknown CURVE key")
            zap.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"",
                                b"200" if ok else b"400", b"OK" if ok else b"unknown key",
                                b"", b""])

    # ------------------------------------------------------------------------- closing

    def close(self, reason: str | None, wait_s: float = -1) -> dict[int, list[Any]]:
        """Close from any thread: tell every reader, wait briefly for late ones, free sockets.

        Returns the values still queued for readers that never connected.
        """
        self.stop_reason, self.stopping = reason, True
        _poke(self.wake_w)                  # a write() blocked on credit gives up the lock
        if not self.lock.acquire(timeout=wait_s):
            _log.error("socket channel %s: a write() holds on; its sockets stay open",
                       self.cfg.endpoint)
            return {}
        try:
            if self.released:
                return {}
            self._serve()
            self._shut(reason)
            deadline = time.monotonic() + _LATE_S
            while self.missing and time.monotonic() < deadline:
                zmq_poll(self.wait_items[:2], _ms(deadline))
                self._serve()
            self.released = True
            leftover = {i: q for i, q in enumerate(self.queued) if q}
        finally:
            self.lock.release()
        self._free(int(_FLUSH_S * 1000))
        return leftover

    def abandon(self) -> None:
        """The finalizer's close (no endpoint of this process is left, or it is exiting)."""
        self.close(None, wait_s=1.0)

    def _free(self, linger_ms: int) -> None:
        self.quit = True
        _poke(self.bg_w)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2.0)
            if self.thread.is_alive():
                _log.error("the watcher of socket channel %s did not stop; leaking its sockets",
                           self.cfg.endpoint)
                return
        if self.monitor is not None:        # NOTE: an unread monitor blocks zmq's I/O thread
            self.router.disable_monitor()
            self.monitor.close(linger=0)
        if self.zap is not None:
            self.zap.close(linger=0)
        if self.router is not None:
            self.router.close(linger=linger_ms)     # values already sent still reach readers
        if self.own_ctx:
            self.ctx.term()
        for sock in (self.wake_r, self.wake_w, self.bg_r, self.bg_w):
            sock.close()


_ON_MESSAGE = {_HELLO: _WriterIO._on_hello, _CREDIT: _WriterIO._on_credit,
               _CLOSE: _WriterIO._on_close}


# ------------------------------------------------------------------------------- a reader

class _ReaderIO:
    """Reader ``index`` in one process: a DEALER socket used by whichever thread holds ``lock``."""

    def __init__(self, cfg: _Config, index: int, neighbours: dict[int, Any]) -> None:
        self.cfg = cfg
        self.index = index
        self.neighbours = neighbours        # this process's I/O of the channel, by role
        self.lock = threading.Lock()
        self.backlog: collections.deque[Any] = collections.deque()   # arrived before a close
        self.consumed = 0
        self.heard = False                  # the writer's CLOSE arrived
        self.heard_reason: str | None = None
        self.linked = False                 # a handshake with the writer succeeded
        self.gone = False                   # ... and that connection dropped: the writer is gone
        self.stopping = False               # close() was called in this process
        self.stop_reason: str | None = None
        self.released = False
        self.warned = False
        self.values = self.waits = self.nbytes = 0
        self.signer = _signer(cfg)
        self.wake_r, self.wake_w = _wake_pair()
        self.dealer = self.monitor = None
        try:
            self.dealer = _socket(_context(False), zmq.DEALER, cfg)
            self.monitor = self.dealer.get_monitor_socket(_LINKED | _DISCONNECTED | _FAILED)
            _MONITORS.add(self.monitor, self)
            self.dealer.connect(cfg.endpoint)
            self._send(_HELLO_MSG.pack(_HELLO, index, cfg.cid))
        except BaseException:
            self._free()
            raise
        self.items = [(self.dealer, _IN), (self.wake_r.fileno(), _IN)]
        self.dealer_ready = [(self.dealer, _IN)]

    @property
    def closed(self) -> bool:
        return self.heard or self.gone or self.stopping

    @property
    def reason(self) -> str | None:
        if self.heard:
            return self.heard_reason
        if self.stopping:
            return self.stop_reason
        return f"the writer at {self.cfg.endpoint} disconnected (its process may have died)"

    def read(self, ep: SocketChannel, limit: int, timeout_s: float | None) -> Any:
        with self.lock:
            if self.backlog:
                return self.backlog.popleft()
            if self.released:
                raise closed_error(ep, self.reason)
            dealer, ms, deadline, late = self.dealer, 0, None, False
            while True:
                for sock, _ in zmq_poll(self.items, ms):
                    if sock is dealer:
                        value = self._recv()
                        if value is not _NOTHING:
                            return value
                    else:
                        _drain_wakes(self.wake_r)
                if self.closed:
                    value = self._recv_queued()     # what arrived before the close comes first
                    if value is not _NOTHING:
                        return value
                    raise closed_error(ep, self.reason)
                if deadline is None:
                    self.waits += 1
                    deadline = -1.0 if limit < 0 else time.monotonic() + limit / 1e9
                if deadline < 0:
                    ms = -1
                elif time.monotonic() < deadline:
                    ms = _ms(deadline)
                elif self._in_flight() and not late:
                    late, deadline = True, time.monotonic() + _FLUSH_S
                    ms = _ms(deadline)
                else:
                    raise timeout_error(ep, "read", timeout_s)

    def _in_flight(self) -> bool:
        """Whether a writer in this process already wrote a value this reader has not got.

        Over a socket a value needs some microseconds to arrive; a read right after a write in
        the same process (``read_nowait`` included) waits for it rather than miss it.
        """
        writer = self.neighbours.get(WRITER)
        return isinstance(writer, _WriterIO) and not writer.closed and writer.sent > self.consumed

    def _recv(self, credit: bool = True) -> Any:
        """Take one message (the poll said there is one): a value, or _NOTHING."""
        dealer = self.dealer
        first = _zrecv(dealer)
        if len(first) != _DATA_FIRST or first[0] != _DATA:
            return self._on_control(first)
        tag, aux, size, scalar = read_header(first, 1)
        payload: Any = b""
        mac = None
        try:        # a message arrives whole: the frames its header promises are here already
            if size:        # the value keeps the frame: zero-copy, and writable like shm's copies
                payload = memoryview(_zrecv(dealer, _LAST, False))
            if self.signer is not None:
                mac = _zrecv(dealer, _LAST)
        except zmq.Again:
            return self._malformed("a value without its payload or HMAC")
        if len(payload) != size or (
                mac is not None and not self.signer.check(first, payload if size else None, mac)):
            return self._malformed("a value of the wrong size or with a wrong HMAC")
        self.consumed += 1
        if credit:
            self._send(_CREDIT_MSG.pack(_CREDIT, self.index, self.consumed))
        self.values += 1
        self.nbytes += _DATA_FIRST + size
        return decode(tag, aux, scalar, payload)

    def _on_control(self, first: bytes) -> Any:
        dealer = self.dealer
        mac = _zrecv(dealer) if self.signer is not None and dealer.rcvmore else None
        if dealer.rcvmore or first[:1] not in (b"C", b"P") or (
                self.signer is not None and not (mac and self.signer.check(first, None, mac))):
            return self._malformed(f"a message it cannot read ({first[:16]!r})")
        if first[0] == _CLOSE and not self.heard:
            self.heard, self.heard_reason = True, first[1:].decode("utf-8", "replace") or None
        return _NOTHING

    def _malformed(self, what: str) -> Any:
        while self.dealer.rcvmore:
            _zrecv(self.dealer)
        _log.error("reader %d of socket channel %s dropped %s", self.index, self.cfg.endpoint,
                   what)
        return _NOTHING

    def _recv_queued(self) -> Any:
        while zmq_poll(self.dealer_ready, 0):
            value = self._recv()
            if value is not _NOTHING:
                return value
        return _NOTHING

    def on_event(self, event: int) -> None:
        """Called on the monitor thread."""
        if event == _LINKED:
            self.linked = True
        elif event == _DISCONNECTED and self.linked:
            self.gone = True
            _poke(self.wake_w)
        elif event & _FAILED and not self.warned:
            self.warned = True
            _log.error("reader %d of socket channel %s: the writer refused the handshake (%s); "
                       "do both sides use the same auth?", self.index, self.cfg.endpoint,
                       zmq.Event(event).name)

    def _send(self, body: bytes) -> None:
        try:
            if self.signer is None:
                _zsend(self.dealer, body, _LAST)
            else:
                _zsend(self.dealer, body, _MORE)
                _zsend(self.dealer, self.signer.sign(body), _LAST)
        except zmq.Again:           # not connected and the queue full: nobody waits for it
            pass

    def close(self, reason: str | None, wait_s: float = -1) -> bool:
        """Close from any thread; True when the writer confirmed (it knows of the close)."""
        self.stop_reason, self.stopping = reason, True
        _poke(self.wake_w)                  # a blocked read() gives up the lock
        if not self.lock.acquire(timeout=wait_s):
            _log.error("reader %d of socket channel %s: a read() holds on; its socket stays "
                       "open", self.index, self.cfg.endpoint)
            return False
        try:
            if self.released:
                return True
            told = self._say_goodbye(reason)
            self.released = True
        finally:
            self.lock.release()
        self._free()
        return told

    def _say_goodbye(self, reason: str | None) -> bool:
        """Keep what arrived readable, tell the writer, wait (briefly) for its CLOSE to come."""
        self._keep_arrived()
        if not self.heard and self.linked and not self.gone:
            _tell_writer(self.cfg, reason)
            deadline = time.monotonic() + _FLUSH_S
            while not (self.heard or self.gone) and time.monotonic() < deadline:
                zmq_poll(self.items, _ms(deadline))
                _drain_wakes(self.wake_r)
                self._keep_arrived()
        return self.heard

    def _keep_arrived(self) -> None:
        try:
            while not self.heard and zmq_poll(self.dealer_ready, 0):
                value = self._recv(credit=False)    # closing: the writer must not go on
                if value is not _NOTHING:
                    self.backlog.append(value)
        except Exception:   # noqa: BLE001 - close() must not fail on one bad value
            _log.exception("reader %d of socket channel %s could not keep a value at close",
                           self.index, self.cfg.endpoint)

    def abandon(self) -> None:
        """The finalizer's close (no endpoint of this process is left, or it is exiting)."""
        self.close(None, wait_s=1.0)

    def _free(self) -> None:
        if self.monitor is not None:        # NOTE: an unread monitor blocks zmq's I/O thread
            self.dealer.disable_monitor()
            _MONITORS.drop(self.monitor)
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.wake_r.close()
        self.wake_w.close()


class _Monitors:
    """A thread that reads the readers' monitor sockets while any reader is open in this process.

    zmq's I/O thread blocks on a monitor socket nobody reads, and a reader only runs while it
    reads; this thread marks a reader whose writer hung up and wakes it.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()       # re-entrant: a finalizer may run while it is held
        self.readers: dict[zmq.Socket, _ReaderIO] = {}
        self.dropped: list[zmq.Socket] = []
        self.thread: threading.Thread | None = None
        self.wake_r, self.wake_w = _wake_pair()

    def add(self, monitor: zmq.Socket, reader: _ReaderIO) -> None:
        with self.lock:
            self.readers[monitor] = reader
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="headrace-socket-monitors")
                self.thread.start()
        _poke(self.wake_w)

    def drop(self, monitor: zmq.Socket) -> None:
        """Stop reading ``monitor`` (the thread closes it); the last one ends the thread."""
        with self.lock:
            self.dropped.append(monitor)
            thread = self.thread if len(self.readers) == len(self.dropped) else None
        _poke(self.wake_w)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            with self.lock:
                for monitor in self.dropped:
                    del self.readers[monitor]
                    monitor.close(linger=0)
                self.dropped.clear()
                if not self.readers:
                    self.thread = None
                    return
                readers = dict(self.readers)
            items = [(monitor, _IN) for monitor in readers] + [(self.wake_r.fileno(), _IN)]
            try:
                ready = zmq_poll(items, -1)
            except zmq.ZMQError:    # a monitor closed under us: the context is ending
                return
            _drain_wakes(self.wake_r)
            for monitor, _ in ready:
                if monitor in readers:
                    while zmq_poll([(monitor, _IN)], 0):
                        event, _ = _EVENT.unpack_from(_zrecv(monitor))
                        _zrecv(monitor)             # the endpoint
                        readers[monitor].on_event(event)


_MONITORS = _Monitors()


class _Leftover:
    """A reader first used after the close: it reads the values queued for it, then closed."""

    closed = True
    values = waits = nbytes = 0

    def __init__(self, messages: list[tuple[bytes, Any, bytes | None]], reason: str | None):
        self.messages = collections.deque(messages)
        self.reason = reason

    def read(self, ep: SocketChannel, limit: int, timeout_s: float | None) -> Any:
        if not self.messages:
            raise closed_error(ep, self.reason)
        first, payload, _ = self.messages.popleft()
        tag, aux, _, scalar = read_header(first, 1)
        return decode(tag, aux, scalar, b"" if payload is None else memoryview(payload))

    def close(self, reason: str | None) -> bool:
        return True

    def abandon(self) -> None:
        pass


def _notify_close(cfg: _Config, reason: str | None) -> None:
    """Tell the writer of ``cfg`` (elsewhere) of the close; where none listens, stand in for it."""
    try:
        standin = _WriterIO(cfg)
    except zmq.ZMQError:            # a writer holds the port (or the host is not this one)
        _tell_writer(cfg, reason)
        return
    standin.close(reason)           # readers trying to connect hear CLOSE from the stand-in


# ----------------------------------------------------------------- per process, the channel

class _Local:
    """This process's share of one channel: its endpoints' I/O, and whether it saw the close."""

    __slots__ = ("__weakref__", "closed", "finalizer", "ios", "leftover", "lock", "reason")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ios: dict[int, Any] = {}       # role -> _WriterIO, _ReaderIO or _Leftover
        self.closed = False
        self.reason: str | None = None
        self.leftover: dict[int, list[Any]] = {}
        self.finalizer = weakref.finalize(self, _abandon, self.ios)


def _abandon(ios: dict[int, Any]) -> None:
    for io in list(ios.values()):
        io.abandon()


_LOCALS: weakref.WeakValueDictionary[bytes, _Local] = weakref.WeakValueDictionary()
_LOCALS_LOCK = threading.RLock()    # re-entrant: a finalizer may run while it is held
_SHARED: list[Any] = [None, 0]      # this process's zmq context, and the pid that made it


def _local(cid: bytes) -> _Local:
    with _LOCALS_LOCK:
        local = _LOCALS.get(cid)
        if local is None:
            local = _LOCALS[cid] = _Local()
        return local


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]
    except OSError as exc:
        raise ValueError(f"cannot pick a free port on host {host!r}: {exc}.\n\n"
                         "Pass port= explicitly when the writer runs on another host.") from exc


class SocketChannel(Channel):
    """A channel over TCP: its endpoints may live in any process, on any host that reaches it.

    Args:
        n_readers: How many readers; each gets every value.
        capacity: How many values a reader may be behind before ``write`` blocks.
        host: The address the writer listens on and the readers connect to.
        port: The TCP port; 0 picks a free one now, so endpoints can be pickled at once.
        auth: ``HMACAuth(secret)`` or ``CurveAuth.generate()``; required off loopback.

    Raises:
        ValueError: a bad count or port, or a non-loopback ``host`` without ``auth``.

    Endpoints open lazily: the writer binds on its first use, a reader connects on its first.
    Call ``close()`` before a process exits so that the values it wrote leave first.
    """

    kind = "socket"

    def __init__(self, n_readers: int = 1, capacity: int = 8, *, host: str = "127.0.0.1",
                 port: int = 0, auth: HMACAuth | CurveAuth | None = None) -> None:
        if not isinstance(n_readers, int) or n_readers < 1:
            raise ValueError(f"n_readers must be >= 1, not {n_readers}")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (pick a free one) to 65535, not {port!r}")
        if auth is not None and not isinstance(auth, (HMACAuth, CurveAuth)):
            raise TypeError(f"auth must be None, HMACAuth or CurveAuth, not {type(auth).__name__}")
        if auth is None and not is_loopback(host):
            raise ValueError(
                f"a socket channel on host {host!r} needs authentication: that is not a loopback "
                "address, so anyone who reaches the port could read its values or inject their "
                "own.\n\nPass auth=HMACAuth(secret) with the same secret of at least 16 bytes "
                "(e.g. os.urandom(32)) in every process, or auth=CurveAuth.generate().")
        cfg = _Config(host, port or _free_port(host), n_readers, capacity, auth, os.urandom(16))
        self._attach(cfg, None)

    def _attach(self, cfg: _Config, role: int | None) -> None:
        self._cfg = cfg
        self.role = role
        self._local = _local(cfg.cid)
        self._io: Any = None

    @property
    def host(self) -> str:
        return self._cfg.host

    @property
    def port(self) -> int:
        return self._cfg.port

    @property
    def endpoint(self) -> str:
        return self._cfg.endpoint

    def writer(self) -> SocketChannel:
        return _endpoint(self._cfg, WRITER)

    def reader(self, index: int = 0) -> SocketChannel:
        if not 0 <= index < self._cfg.n_readers:
            raise IndexError(f"reader index {index} out of range for {self._cfg.n_readers} readers")
        return _endpoint(self._cfg, index)

    def write(self, value: Any, timeout_s: float | None = None) -> None:
        self._check_role("writer")
        limit = timeout_ns(timeout_s)
        enc = encode(value)
        (self._io or self._open()).write(self, enc, limit, timeout_s)

    def read(self, timeout_s: float | None = None) -> Any:
        self._check_role("reader")
        limit = timeout_ns(timeout_s)
        return (self._io or self._open()).read(self, limit, timeout_s)

    def _open(self) -> Any:
        """This process's I/O for our role, made on first use."""
        local = self._local
        with local.lock:
            io = local.ios.get(self.role)
            if io is None:
                if local.closed and self.role == WRITER:
                    raise closed_error(self, local.reason)
                if local.closed:
                    io = _Leftover(local.leftover.pop(self.role, []), local.reason)
                elif self.role == WRITER:
                    io = self._bind()
                else:
                    io = _ReaderIO(self._cfg, self.role, local.ios)
                local.ios[self.role] = io
        self._io = io
        return io

    def _bind(self) -> _WriterIO:
        try:
            return _WriterIO(self._cfg, self._local.ios)
        except zmq.ZMQError as exc:
            raise OSError(exc.errno, f"the writer of {self!r} cannot listen on "
                                     f"{self._cfg.endpoint}: {exc.strerror}.\n\nIs another writer "
                                     "of this channel running, or is the port taken?") from exc

    def close(self) -> None:
        self._close(None)

    def mark_broken(self, reason: str) -> None:
        self._close(str(reason))

    def _close(self, reason: str | None) -> None:
        """Close this process's I/O, the writer's first; tell the others if nobody here could."""
        local = self._local
        with local.lock:
            if local.closed:
                return
            local.closed, local.reason = True, reason
            ios = dict(local.ios)
        writer = ios.pop(WRITER, None)
        told = writer is not None
        if writer is not None:
            local.leftover = writer.close(reason)
        for io in ios.values():
            told = io.close(reason) or told
        if not told:
            _notify_close(self._cfg, reason)

    @property
    def closed(self) -> bool:
        local = self._local
        return local.closed or any(io.closed for io in list(local.ios.values()))

    def statistics(self) -> dict[str, Any]:
        io = self._io
        return {"kind": self.kind, "role": self.role, "n_readers": self._cfg.n_readers,
                "capacity": self._cfg.capacity, "closed": self.closed,
                "bytes": io.nbytes if io else 0, "spills": 0,
                "values": io.values if io else 0, "waits": io.waits if io else 0}

    def __reduce__(self) -> Any:
        return _endpoint, (self._cfg, self.role)

    def __repr__(self) -> str:
        role = "owner" if self.role is None else "writer" if self.role == WRITER \
            else f"reader {self.role}"
        return f"<SocketChannel {role}, {self._cfg.n_readers} readers, {self._cfg.endpoint}>"


def _endpoint(cfg: _Config, role: int | None) -> SocketChannel:
    ep = SocketChannel.__new__(SocketChannel)
    ep._attach(cfg, role)
    return ep
