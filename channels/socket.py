"""The socket channel: one writer, n readers over pyzmq TCP (other hosts, ``channel="socket"``).

In: a ``SocketChannel`` owner handle (host, port, readers, capacity, auth, max_message_bytes); its
endpoints pickle to the processes that write and read. Out: the ``channels.base`` contract across
processes and hosts.
Invariants:
- Values travel in the codec's frame format, so this channel carries exactly what shm carries;
  readers decode large payloads from the received zmq frame, without a copy.
- Credits: every reader starts with ``capacity`` of them and returns one per value read, as a
  running count (a replayed credit changes nothing). Values for a reader that has not connected
  yet wait in the writer, inside that same window; the writer blocks only when it is full.
- Every channel authenticates, loopback included: any local process can reach a loopback port.
  ``HMACAuth`` signs every frame, both ways (HMAC-SHA256, keyed per channel); without ``auth`` a
  loopback channel makes its own random secret, which travels only inside its pickled endpoints.
  Off loopback the user passes ``HMACAuth`` or ``CurveAuth`` (encrypts, admits only the readers'
  key). Refused peers and frames are counted (``statistics()["refused"]``) and logged at a
  bounded rate, never raised, and never disturb the legitimate endpoints.
- No peer makes an end allocate more than it accepts: libzmq drops a peer announcing a frame over
  ``max_message_bytes`` (a reader) or 4 KiB (the writer) before allocating it; ``write`` refuses
  a bigger value with ``ValueError``.
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

import os
from typing import Any

import zmq

from .base import WRITER, Channel, closed_error, timeout_ns
from .codec import encode
from .socket_auth import CurveAuth, HMACAuth, is_loopback
from .socket_reader import _Leftover, _ReaderIO
from .socket_wire import MAX_MESSAGE_BYTES, _Config, _local, _tell_writer
from .tcp import check_args, free_port
from .socket_writer import _WriterIO

__all__ = ["MAX_MESSAGE_BYTES", "CurveAuth", "HMACAuth", "SocketChannel", "is_loopback"]


def _notify_close(cfg: _Config, reason: str | None) -> None:
    """Tell the writer of ``cfg`` (elsewhere) of the close; where none listens, stand in for it.

    Either way the CLOSE is signed with the channel's key, so readers tell it from a stranger's.
    """
    try:
        standin = _WriterIO(cfg)
    except zmq.ZMQError:            # a writer holds the port (or the host is not this one)
        _tell_writer(cfg, reason)
        return
    standin.close(reason)           # readers trying to connect hear CLOSE from the stand-in


def _checked_auth(auth: Any, host: str) -> HMACAuth | CurveAuth:
    """``auth``, or on loopback a fresh secret of the channel's own: every channel authenticates."""
    if auth is not None and not isinstance(auth, (HMACAuth, CurveAuth)):
        raise TypeError(f"auth must be None, HMACAuth or CurveAuth, not {type(auth).__name__}")
    if auth is None and not is_loopback(host):
        raise ValueError(
            f"a socket channel on host {host!r} needs authentication: that is not a loopback "
            "address, so anyone who reaches the port could read its values or inject their "
            "own.\n\nPass auth=HMACAuth(secret) with the same secret of at least 16 bytes "
            "(e.g. os.urandom(32)) in every process, or auth=CurveAuth.generate().")
    # NOTE: any local process can connect to a loopback port; this secret reaches only the
    # processes the endpoints are pickled to.
    return HMACAuth(os.urandom(32)) if auth is None else auth


def _too_big(ep: SocketChannel, size: int, limit: int) -> ValueError:
    return ValueError(
        f"cannot write a value of {size} bytes to {ep!r}: its readers accept at most "
        f"{limit} bytes (max_message_bytes), so they would drop the connection.\n\n"
        "Pass a larger max_message_bytes= to SocketChannel, or send the value in parts.")


class SocketChannel(Channel):
    """A channel over TCP: its endpoints may live in any process, on any host that reaches it.

    Args:
        n_readers: How many readers; each gets every value.
        capacity: How many values a reader may be behind before ``write`` blocks.
        host: The address the writer listens on and the readers connect to.
        port: The TCP port; 0 picks a free one now, so endpoints can be pickled at once.
        auth: ``HMACAuth(secret)`` or ``CurveAuth.generate()``; required off loopback. None on
            loopback: a random HMAC secret of this channel's own, pickled with its endpoints.
        max_message_bytes: The biggest encoded value (payload bytes) ``write`` sends and a reader
            accepts; a peer announcing more is dropped before anything is allocated for it.
            Default ``MAX_MESSAGE_BYTES`` (1 GiB).
        ring: a ``channels.doorbell.Doorbell`` the writer rings after each value, and every
            endpoint when it closes (a writer on another host cannot, and does not).

    Raises:
        ValueError: a bad count, port or size, or a non-loopback ``host`` without ``auth``.

    Endpoints open lazily: the writer binds on its first use, a reader connects on its first.
    Call ``close()`` before a process exits so that the values it wrote leave first.
    """

    kind = "socket"

    def __init__(self, n_readers: int = 1, capacity: int = 8, *, host: str = "127.0.0.1",
                 port: int = 0, auth: HMACAuth | CurveAuth | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, ring: Any = None) -> None:
        check_args(n_readers, capacity, port, max_message_bytes)
        auth = _checked_auth(auth, host)
        cfg = _Config(host, port or free_port(host), n_readers, capacity, auth, os.urandom(16),
                      max_message_bytes)
        self._attach(cfg, None, ring)

    def _attach(self, cfg: _Config, role: int | None, bell: Any) -> None:
        self._cfg = cfg
        self._bell = bell
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
        return _endpoint(self._cfg, WRITER, self._bell)

    def reader(self, index: int = 0) -> SocketChannel:
        if not 0 <= index < self._cfg.n_readers:
            raise IndexError(f"reader index {index} out of range for {self._cfg.n_readers} readers")
        return _endpoint(self._cfg, index, self._bell)

    def write(self, value: Any, timeout_s: float | None = None) -> None:
        self.write_encoded(encode(value), timeout_s)

    def write_encoded(self, enc: Any, timeout_s: float | None = None) -> None:
        """``write`` of a value already encoded (``codec.encode``)."""
        self._check_role("writer")
        limit = timeout_ns(timeout_s)
        if enc.size > self._cfg.max_message_bytes:
            raise _too_big(self, enc.size, self._cfg.max_message_bytes)
        (self._io or self._open()).write(self, enc, limit, timeout_s)
        if self._bell is not None:
            self._bell.ring()

    def read(self, timeout_s: float | None = None) -> Any:
        self._check_role("reader")
        limit = timeout_ns(timeout_s)
        return (self._io or self._open()).read(self, limit, timeout_s)

    def taken(self) -> int:
        return getattr(self._io, "consumed", 0) if self.role != WRITER else 0

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
        if self._bell is not None:
            self._bell.ring()

    @property
    def closed(self) -> bool:
        local = self._local
        return local.closed or any(io.closed for io in list(local.ios.values()))

    def statistics(self) -> dict[str, Any]:
        io = self._io
        return {"kind": self.kind, "role": self.role, "n_readers": self._cfg.n_readers,
                "capacity": self._cfg.capacity, "closed": self.closed,
                "bytes": io.nbytes if io else 0, "spills": 0,
                "values": io.values if io else 0, "waits": io.waits if io else 0,
                "refused": io.refused if io else 0}

    def __reduce__(self) -> Any:
        return _endpoint, (self._cfg, self.role, self._bell)

    def __repr__(self) -> str:
        role = "owner" if self.role is None else "writer" if self.role == WRITER \
            else f"reader {self.role}"
        return f"<SocketChannel {role}, {self._cfg.n_readers} readers, {self._cfg.endpoint}>"


def _endpoint(cfg: _Config, role: int | None, bell: Any = None) -> SocketChannel:
    ep = SocketChannel.__new__(SocketChannel)
    ep._attach(cfg, role, bell)
    return ep
