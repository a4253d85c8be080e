"""The writing side of the socket channel: ``_WriterIO`` (the bound ROUTER socket, its monitor
and the watcher thread in the writer's process, with the credit window, probes and close
protocol) and ``_payload``, which turns an encoded value into the frame to send.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import zmq
from zmq import zmq_poll
from zmq.utils import z85

from ..exceptions import ChannelTimeoutError
from .base import WRITER, Channel, closed_error, timeout_error
from .codec import HEADER_BYTES
from .socket_auth import CurveAuth, _zap_reply
from .socket_reader import _ReaderIO
from .socket_wire import (
    _AUTH_FAILED, _CLOSE, _COPY_MAX, _CREDIT, _CREDIT_MSG, _DATA, _DATA_FIRST, _DISCONNECTED,
    _EVENT, _FAILED, _FLUSH_S, _HELLO, _HELLO_MSG, _IN, _LAST, _LATE_S, _MORE, _PROBE,
    _PROBE_GAPS_S, _close_body, _Config, _context, _drain_wakes, _log, _ms, _poke, _Refusals,
    _signer, _socket, _wake_pair, _zrecv, _zsend,
)


def _payload(enc: Any) -> Any:
    """The payload as a buffer to send: copied into the message when small, shared when large."""
    if enc.size < _COPY_MAX:
        return enc.payload_bytes()
    import numpy as np  # an uninitialized buffer: no page-zeroing pass before the copy
    buf = np.empty(enc.size, dtype=np.uint8)
    enc.write_payload(memoryview(buf))
    return zmq.Frame(buf, copy=False)



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
        self.refusals = _Refusals(f"socket channel {cfg.endpoint}")
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

    def write(self, ep: Channel, enc: Any, limit: int, timeout_s: float | None) -> None:
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

    def _check_open(self, ep: Channel) -> None:
        if self.stopping and not self.closed:
            self._shut(self.stop_reason)
        if self.closed:
            raise closed_error(ep, self.reason)

    def _await_credit(self, ep: Channel, limit: int, timeout_s: float | None) -> None:
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

    def _timeout(self, ep: Channel, timeout_s: float | None) -> ChannelTimeoutError:
        absent = [i for i, rid in enumerate(self.rids)
                  if rid is None and self.sent - self.consumed[i] >= self.cfg.capacity]
        if not absent:
            return timeout_error(ep, "write", timeout_s)
        return ChannelTimeoutError(
            f"write on {ep!r} timed out after {timeout_s} s: reader(s) {absent} never connected "
            f"to {self.cfg.endpoint}, and {self.cfg.capacity} values already wait for them")

    def _send_value(self, ep: Channel, enc: Any) -> None:
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
        self.refusals.refuse(what)

    @property
    def refused(self) -> int:
        return self.refusals.count

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
            ok, reply = _zap_reply(msg, self.client_key)
            if not ok:
                peer = msg[3].decode("ascii", "replace") if len(msg) > 3 else "?"
                self._refuse(f"a peer at {peer} with an unknown CURVE key")
            zap.send_multipart(reply)

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
        self.refusals.close()


_ON_MESSAGE = {_HELLO: _WriterIO._on_hello, _CREDIT: _WriterIO._on_credit,
               _CLOSE: _WriterIO._on_close}
