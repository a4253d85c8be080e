"""The socket channel's shared low level: its message kinds, wire constants and ``_Config``, the
zmq plumbing both ends use (contexts, configured sockets, wake-up pairs, telling a writer of a
close), the rate-limited log of refused peers and messages (``_Refusals``), and the per-process
registry of each channel's endpoints (``_Local``).
"""

from __future__ import annotations

import atexit
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

from .codec import HEADER_BYTES
from .socket_auth import CurveAuth, HMACAuth, _Signer

_log = logging.getLogger(f"{__package__}.socket")      # one logger for every socket_* module

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
MAX_MESSAGE_BYTES = 1 << 30     # default cap on a value's payload: a bigger frame drops its peer
_REFUSAL_BURST = 5          # an end logs this many refusals at once, then one per _REFUSAL_LOG_S
_REFUSAL_LOG_S = 1.0

_DISCONNECTED, _LINKED, _AUTH_FAILED = int(zmq.EVENT_DISCONNECTED), \
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED), int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) \
    | _AUTH_FAILED
# The hot path avoids pyzmq's conveniences, each worth microseconds per call: enum flags,
# getsockopt (it builds an enum per call), the sugar send/recv wrappers, zmq.Again exceptions.
_MORE, _LAST, _IN = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK), int(zmq.POLLIN)
_zsend, _zrecv = zmq.backend.Socket.send, zmq.backend.Socket.recv
_NOTHING = object()


@dataclass(frozen=True, slots=True)
class _Config:
    host: str
    port: int
    n_readers: int
    capacity: int
    auth: HMACAuth | CurveAuth      # never None: a loopback channel makes its own HMAC secret
    cid: bytes      # random per channel: ties hellos and HMAC keys to this one channel
    max_message_bytes: int = MAX_MESSAGE_BYTES      # the biggest payload a reader accepts

    @property
    def endpoint(self) -> str:
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host \
            else f"tcp://{self.host}:{self.port}"


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
        # libzmq drops a peer that announces a bigger frame, before allocating room for it
        sock.setsockopt(zmq.MAXMSGSIZE, max(cfg.max_message_bytes, _CONTROL_MAX_BYTES))
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


# ------------------------------------------------------------------------------- refusals

class _Refusals:
    """Counts what one end of a channel refused, and logs it without letting a flood fill the log.

    ``_REFUSAL_BURST`` lines may come at once, then one per ``_REFUSAL_LOG_S``. A refusal not
    logged is counted, and the next line says how many there were: the next refusal's line, a
    timer's once the flood pauses, or close()'s, so every refusal is reported.
    """

    __slots__ = ("count", "lock", "stamp", "timer", "tokens", "unlogged", "who")

    def __init__(self, who: str) -> None:
        self.who = who                      # e.g. "socket channel tcp://127.0.0.1:5555"
        self.lock = threading.Lock()        # the timer thread reports too
        self.count = 0                      # every refusal, logged or not
        self.unlogged = 0                   # refusals since the last line
        self.tokens, self.stamp = float(_REFUSAL_BURST), time.monotonic()
        self.timer: threading.Timer | None = None

    def refuse(self, what: str) -> None:
        with self.lock:
            self.count += 1
            if self._may_log():
                _log.error("%s refused %s (%d refused so far%s)", self.who, what, self.count,
                           f"; {self.unlogged} more since the last report" if self.unlogged
                           else "")
                self.unlogged = 0
            else:
                self.unlogged += 1
                self._report_later()

    def close(self) -> None:
        """Report what is not logged yet, now."""
        with self.lock:
            timer, self.timer = self.timer, None
            self._report()
        if timer is not None:
            timer.cancel()

    def _may_log(self) -> bool:
        now = time.monotonic()
        self.tokens = min(_REFUSAL_BURST, self.tokens + (now - self.stamp) / _REFUSAL_LOG_S)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def _report_later(self) -> None:
        if self.timer is None:
            self.timer = threading.Timer(_REFUSAL_LOG_S, self._on_timer)
            self.timer.name, self.timer.daemon = "headrace-socket-refusals", True
            self.timer.start()

    def _on_timer(self) -> None:
        with self.lock:
            self.timer = None
            if not self.unlogged:
                return
            if self._may_log():
                self._report()
            else:                           # lines of a flood still going took the tokens
                self._report_later()

    def _report(self) -> None:
        if self.unlogged:
            _log.error("%s refused %d more since the last report (%d refused so far)",
                       self.who, self.unlogged, self.count)
            self.unlogged = 0


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
