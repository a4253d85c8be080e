"""The reading side of the socket channel: ``_ReaderIO`` (one reader's DEALER socket in one
process), ``_Monitors`` (the thread that reads the readers' monitor sockets) and ``_Leftover`` (a
reader first used after the close, reading what was queued for it).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import zmq
from zmq import zmq_poll

from .base import WRITER, Channel, closed_error, timeout_error
from .codec import decode, read_header
from .socket_wire import (
    _CLOSE, _CREDIT, _CREDIT_MSG, _DATA, _DATA_FIRST, _DISCONNECTED, _EVENT, _FAILED, _FLUSH_S,
    _HELLO, _HELLO_MSG, _IN, _LAST, _LINKED, _MORE, _NOTHING, _Config, _context, _drain_wakes, _log,
    _ms, _poke, _Refusals, _signer, _socket, _tell_writer, _wake_pair, _zrecv, _zsend,
)

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
        self.refusals = _Refusals(f"reader {index} of socket channel {cfg.endpoint}")
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

    def read(self, ep: Channel, limit: int, timeout_s: float | None) -> Any:
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
        writer = self.neighbours.get(WRITER)    # only ever a _WriterIO: SocketChannel._open
        return writer is not None and not writer.closed and writer.sent > self.consumed

    def _recv(self, credit: bool = True) -> Any:
        """Take one message (the poll said there is one): a value, or _NOTHING."""
        dealer = self.dealer
        first = _zrecv(dealer)
        if len(first) != _DATA_FIRST or first[0] != _DATA:
            return self._on_control(first)
        tag, aux, size, scalar = read_header(first, 1)
        payload: Any = b""
        mac = None
        # NOTE: a message arrives whole, so the frames a writer's header promises are here; one
        # cut short (not the writer's) may take the next message's frames, and fails its HMAC.
        try:
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
        self.refusals.refuse(what)
        return _NOTHING

    @property
    def refused(self) -> int:
        return self.refusals.count

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
        self.refusals.close()


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
        # NOTE: the wake pair lives as long as the thread: nothing is left open at exit
        self.wake_r: Any = None
        self.wake_w: Any = None

    def add(self, monitor: zmq.Socket, reader: _ReaderIO) -> None:
        with self.lock:
            self.readers[monitor] = reader
            if self.thread is None:
                self.wake_r, self.wake_w = _wake_pair()
                self.thread = threading.Thread(target=self._run, args=(self.wake_r,),
                                               daemon=True, name="headrace-socket-monitors")
                self.thread.start()
            _poke(self.wake_w)

    def drop(self, monitor: zmq.Socket) -> None:
        """Stop reading ``monitor`` (the thread closes it); the last one ends the thread."""
        with self.lock:
            self.dropped.append(monitor)
            thread = self.thread if len(self.readers) == len(self.dropped) else None
            if self.wake_w is not None:
                _poke(self.wake_w)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def _stop(self) -> None:
        """The thread ends (the lock held): close its wake pair."""
        self.thread = None
        for sock in (self.wake_r, self.wake_w):
            sock.close()
        self.wake_r = self.wake_w = None

    def _run(self, wake_r: Any) -> None:
        while True:
            with self.lock:
                for monitor in self.dropped:
                    del self.readers[monitor]
                    monitor.close(linger=0)
                self.dropped.clear()
                if not self.readers:
                    self._stop()
                    return
                readers = dict(self.readers)
            items = [(monitor, _IN) for monitor in readers] + [(wake_r.fileno(), _IN)]
            try:
                ready = zmq_poll(items, -1)
            except zmq.ZMQError:    # a monitor closed under us: the context is ending
                with self.lock:
                    if self.wake_r is wake_r:
                        self._stop()
                return
            _drain_wakes(wake_r)
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
    values = waits = nbytes = refused = 0

    def __init__(self, messages: list[tuple[bytes, Any, bytes | None]], reason: str | None):
        self.messages = collections.deque(messages)
        self.reason = reason

    def read(self, ep: Channel, limit: int, timeout_s: float | None) -> Any:
        if not self.messages:
            raise closed_error(ep, self.reason)
        first, payload, _ = self.messages.popleft()
        tag, aux, _, scalar = read_header(first, 1)
        return decode(tag, aux, scalar, b"" if payload is None else memoryview(payload))

    def close(self, reason: str | None) -> bool:
        return True

    def abandon(self) -> None:
        pass
