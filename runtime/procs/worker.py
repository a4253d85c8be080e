"""A child process: a pooled task worker, or the home of one actor.

In: a ``WorkerSpec`` (environment variable), then control messages. Out: results and errors.
Invariants: the main thread receives and runs calls in arrival order (an actor with
``max_concurrency > 1`` hands them to a thread pool instead); a control thread receives CANCEL and
watches the driver, exiting when it dies; every reply goes through ``_send`` under one lock.

  driver ──TASK/CALL──▶ inbox ─▶ main thread: decode args ─▶ fn(*args) ─▶ encode ─▶ outbox ─▶ driver
  driver ──CANCEL────▶ ctl   ─▶ control thread: SIGUSR2 to the main thread (or async exception)
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import faulthandler
import gc
import inspect
import logging
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
import zmq

from ...channels.segments import is_alive, unlink_owned
from ...dag.ir import split_returns
from ..wire import protocol
from .output import install_prefixed_output
from ...exceptions import ChannelClosedError
from .lane import WorkerLane, attach as attach_lane
from .links import LINK
from ..wire.errors import error_info
from ..wire.payload import PLAIN_TYPES, Payload, SegmentTable, encode, from_wire
from ..wire.protocol import Msg, WorkerSpec
from ..refs.ref import capturing_refs, resolving_refs, set_ref_source
from ..refs.waiting import set_block_hook
from . import client as client_mod

SPEC_ENV = "HEADRACE_WORKER_SPEC"
#: Set by the zygote in a child it forks: its pid (the child's parent instead of the driver).
PARENT_ENV = "HEADRACE_WORKER_PARENT"
#: An async actor's max_concurrency unless set (Ray's default).
_ASYNC_CONCURRENCY = 1000
#: On another host: the control thread looks at the driver's pings this often...
_HEARTBEAT_S = 1.0
#: ...and the driver counts as gone after this long without one.
_DRIVER_SILENCE_S = 5.0
#: The internal actor method that starts a compiled DAG's loop (not a user method name).
DAG_START = "__headrace_dag_start__"
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # not enums: µs each


def main() -> None:
    spec: WorkerSpec = pickle.loads(base64.b64decode(os.environ.pop(SPEC_ENV)))
    for path in reversed(spec.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    Worker(spec).run()


class _Cancelled(BaseException):
    """Raised into a running call by the control thread; BaseException so `except Exception`
    in user code does not swallow it."""


class Worker:
    """One child process; ``run()`` returns when the driver says EXIT."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.pid = os.getpid()
        self.label = spec.label
        self.driver_fd = _pidfd(spec.driver_pid)     # readable once the driver has exited
        # the driver, or the zygote that forked us (not os.getppid() now: if the driver died
        # before we got here, that is already init, and a later check would never fire)
        self.parent_pid = int(os.environ.pop(PARENT_ENV, spec.driver_pid))
        self.ctx = zmq.Context()
        self.remote = spec.remote               # set on another host than the driver's
        self.endpoints: dict[str, str] = {}     # where this process listens (remote only)
        self.auth: Any = None
        if self.remote is not None:
            from ..hosts.keys import SessionKeys, admit_only
            from ..wire.payload import inline_only
            inline_only()                       # no shm shared with the driver: values inline
            self.keys = SessionKeys(*self.remote.keys)
            self.auth = admit_only(self.ctx, self.keys)
            self.driver_fd = None
            self.last_ping = time.monotonic()
        self.inbox = self._socket(zmq.PULL, spec.wid, True)
        self.ctl = self._socket(zmq.PULL, spec.wid + ".ctl", True)
        self.outbox = self._socket(zmq.PUSH, "driver", False)
        # the driver's replies to the API used here (procs/client.py), read by the control thread
        self.client_sock = self._socket(zmq.PULL, spec.wid + ".client", True)
        self.flush_r, self.flush_w = os.pipe()
        os.set_blocking(self.flush_w, False)    # full: a flush is due anyway
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.table = SegmentTable()
        self.functions: dict[str, Callable[..., Any]] = {}
        self.instance: Any = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots: asyncio.Semaphore | None = None         # an async actor's concurrency
        self.async_calls: dict[str, concurrent.futures.Future] = {}
        self.running: dict[int, str] = {}           # thread ident -> task id
        self.cancelled: set[str] = set()            # asked to cancel before they started
        self.interrupt: str | None = None           # task id the main thread should drop
        self.main_ident = threading.get_ident()
        #: Serializes the user's code between the main thread and compiled-DAG loop threads
        #: (an actor with max_concurrency > 1 asked for concurrency: no lock then).
        self.call_lock: Any = threading.Lock()
        self.internal: dict[str, Callable[..., Any]] = {DAG_START: self._start_dag,
                                                        LINK: self._link}
        # on another host, lines say which, as Ray's do: "(Stage pid=7, ip=10.0.0.2) ..."
        install_prefixed_output(lambda: self.label, self.pid if self.remote is None
                                else f"{self.pid}, ip={self.remote.bind_ip}")
        _setup_logging(spec.logging_level)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGUSR2, self._on_interrupt)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the driver, not to us
        self.init_failed = False
        self.client = client_mod.CLIENT = client_mod.WorkerClient(
            self._send, self._wake_flush, spec, self.table, self.pid)
        self.client.ctx = self.ctx
        set_ref_source(self.client.borrow)
        if spec.kind == "task":
            set_block_hook(self.client.blocked)
        self.control = threading.Thread(target=self._control_main, name="headrace-control",
                                        daemon=True)
        self.control.start()
        self.lane: WorkerLane | None = None         # replies go here once attached
        self.receive: Callable[[], tuple[tuple, list]] = lambda: protocol.recv(self.inbox)
        if self.remote is None:
            self._send((Msg.READY, spec.wid, self.pid))
        else:                                   # the driver connects to these
            self._send((Msg.READY, spec.wid, self.pid, dict(self.endpoints)))

    def _socket(self, kind: int, name: str, bind: bool) -> zmq.Socket:
        """Socket ``name``: in the session directory, or (remote) a CURVE server on a TCP port
        of this host, or a CURVE client of the driver's inbox."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.remote is None:
            address = protocol.endpoint(self.spec.session_dir, name)
            (sock.bind if bind else sock.connect)(address)
        elif bind:
            self.keys.serve(sock)
            host = f"tcp://{self.remote.bind_ip}"
            self.endpoints[name] = f"{host}:{sock.bind_to_random_port(host)}"
        else:
            self.keys.client(sock)
            sock.connect(self.remote.driver if name == "driver" else self.endpoints[name])
        return sock

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> None:
        handlers = {Msg.TASK: self._on_task, Msg.CALL: self._on_call,
                    Msg.INIT_ACTOR: self._on_init_actor, Msg.LANE: self._on_lane,
                    Msg.SWITCH: self._on_switch}
        while True:
            try:
                header, frames = self.receive()
            except ChannelClosedError:      # the driver is gone (or tore this actor down)
                break
            if header[0] == Msg.EXIT:
                break
            handlers[header[0]](header, frames)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=False)
        # an async actor's calls still running finish and reply first (EXIT comes after them
        # in the queue; the driver fails none of them: they were answered)
        with self.state_lock:
            running = list(self.async_calls.values())
        concurrent.futures.wait(running)
        self._exit(0)

    def _exit(self, code: int) -> None:
        """Flush replies (bounded by the linger time), then end the process at once."""
        if self._driver_gone():
            _clean_up_after(self.spec)
        sys.stdout.flush()
        sys.stderr.flush()
        stop = self._socket(zmq.PUSH, self.spec.wid + ".ctl", False)
        protocol.send(stop, (Msg.EXIT,))
        stop.close(linger=1000)
        self.control.join(1.0)
        self.client_sock.close(linger=0)      # the control thread read it; it has stopped
        self.inbox.close(linger=0)
        # NOTE: under send_lock, so a thread still sending (a lane attaching) finds it closed
        # instead of writing to a closed socket; bounded, a stuck sender cannot keep us alive.
        locked = self.send_lock.acquire(timeout=2.0)
        try:        # the last message on zmq: every reply sent before it arrives before it
            protocol.send(self.outbox, (Msg.BYE, self.spec.wid))
        except zmq.ZMQError:
            pass
        self.outbox.close(linger=2000)
        if locked:
            self.send_lock.release()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()     # returns once the replies are out (or the linger time is up)
        os._exit(code)      # NOTE: skip interpreter teardown: user threads must not keep us alive

    def _on_task(self, header: tuple[Any, ...], frames: list[Any]) -> None:
        _, tid, fn_id, fn_blob, args_desc, deps, nret, label = header
        fn = self.functions.get(fn_id)
        if fn is None:
            fn = self.functions[fn_id] = cloudpickle.loads(fn_blob)
        self.label = label
        self._run(tid, label, fn, args_desc, deps, frames, nret)

    def _on_call(self, header: tuple[Any, ...], frames: list[Any],
                 to: _LinkReplies | None = None) -> None:
        """A call from the driver, or (``to``) a direct one from a worker's link."""
        if self.init_failed:
            if to is not None:          # the caller hears of the death from its link
                to.close()
            return              # the driver fails it: the actor is dead, and it says why
        tid, method, args_desc, deps, nret = header[1:6]
        call = (tid, f"{self.label}.{method}",
                self.internal.get(method) or getattr(self.instance, method),
                args_desc, deps, frames, nret, to, header[6] if to is not None else None)
        if self.slots is not None and method not in self.internal:
            future = asyncio.run_coroutine_threadsafe(self._run_async(*call), self._loop())
            with self.state_lock:
                self.async_calls[tid] = future
        elif self.pool is None:
            self._run(*call)
        else:
            self.pool.submit(self._run, *call)

    def _on_init_actor(self, header: tuple[Any, ...], frames: list[Any]) -> None:
        _, cls_blob, args_desc, deps, max_concurrency, label = header
        self.label = label              # a spare process becomes this actor
        try:
            cls = cloudpickle.loads(cls_blob)
            args, kwargs, _keep = self._decode_args(args_desc, deps, frames)
            self.instance = cls(*args, **kwargs)
        except BaseException as exc:          # noqa: BLE001 - reported; the driver ends us
            self.init_failed = True
            self._send((Msg.INIT_FAILED, self.spec.wid,
                        error_info(exc, f"{label}.__init__", self.pid)))
            return
        is_async = any(inspect.iscoroutinefunction(getattr(cls, n, None)) for n in dir(cls)
                       if not n.startswith("__"))
        if max_concurrency is None:     # Ray's defaults: 1000 for an async actor, else 1
            max_concurrency = _ASYNC_CONCURRENCY if is_async else 1
        if is_async:                    # one event loop runs its calls, up to max_concurrency
            loop = self._loop()
            self.slots = asyncio.run_coroutine_threadsafe(
                _semaphore(max_concurrency), loop).result()
            self.call_lock = contextlib.nullcontext()
        elif max_concurrency > 1:
            self.call_lock = contextlib.nullcontext()
            self.pool = concurrent.futures.ThreadPoolExecutor(max_concurrency,
                                                              thread_name_prefix=label)
        self._send((Msg.ACTOR_READY, self.spec.wid))

    # -- one call ---------------------------------------------------------------------------
    def _run(self, tid: str, name: str, fn: Callable[..., Any], args_desc: Any, deps: Any,
             frames: list[Any], nret: int, to: _LinkReplies | None = None,
             ids: list[str] | None = None) -> None:
        # One flat piece on purpose: every branch ends in exactly one reply to the driver
        # (or, for a direct call, to the caller's link: ``to``).
        send = self._send if to is None else to.send
        me = threading.get_ident()
        with self.state_lock:
            if tid in self.cancelled:
                self.cancelled.discard(tid)
                send((Msg.CANCELLED, self.spec.wid, tid))
                return
            self.running[me] = tid
        try:
            try:
                args, kwargs, _keep = self._decode_args(args_desc, deps, frames)
                with self.call_lock:
                    value = fn(*args, **kwargs)
                if asyncio.iscoroutine(value):
                    value = self._await(value)
            finally:
                with self.state_lock:
                    self.running.pop(me, None)
                    if self.interrupt == tid:
                        self.interrupt = None
        except _Cancelled:
            send((Msg.CANCELLED, self.spec.wid, tid))
            return
        except BaseException as exc:          # noqa: BLE001 - the user's error is the result
            send((Msg.ERROR, self.spec.wid, tid, error_info(exc, name, self.pid)))
            del exc
            # NOTE: a raised error's traceback holds its frames, and they the refs that raised it
            # (a cycle): collect now, so the driver hears of the refs' release while we idle
            if self.client.holds_refs():
                gc.collect()
            return
        self._reply_value(tid, name, value, nret, to, ids)

    def _reply_value(self, tid: str, name: str, value: Any, nret: int,
                     to: _LinkReplies | None = None, ids: list[str] | None = None) -> None:
        send = self._send if to is None else to.send
        if nret == 1 and type(value) in PLAIN_TYPES:    # the usual reply: no ref, handle or buffer
            send((Msg.RESULT, self.spec.wid, tid, [(pickle.dumps(value, 5), ())]), [None])
            return
        owner = self.spec.driver_pid if to is None else to.caller_pid
        handles: list[Any] = []         # handles and refs in the value: alive until sent
        exported: list[Any] = []
        try:
            values = [value] if nret == 1 else list(split_returns(value, nret, name))
            frames: list[Any] = [None]
            with capturing_refs(None, handles, exported):
                descs = [self._encode(v, owner).to_wire(frames) for v in values]
            if to is not None and (handles or exported):
                # the driver holds what travels inside: the value goes through it
                frames = [None]
                with capturing_refs(None, [], []):
                    descs = [self._encode(v).to_wire(frames) for v in values]
        except BaseException as exc:          # noqa: BLE001
            info = error_info(exc, name, self.pid,
                              prefix=f"could not serialize the return value of {name}: ")
            send((Msg.ERROR, self.spec.wid, tid, info))
            return
        if not (handles or exported):
            send((Msg.RESULT, self.spec.wid, tid, descs), frames)
            return
        self.client.export(exported)
        holds = ([h._record.aid for h in handles], [r._id for r in exported])
        if to is None:
            self._send((Msg.RESULT, self.spec.wid, tid, descs, holds), frames)
        else:
            self._send((Msg.REQUEST, self.spec.wid, "give",
                        (to.caller_wid, ids, name, descs, *holds)), frames)
            to.send((Msg.RESULT, self.spec.wid, tid, None))

    def _encode(self, value: Any, owner: int | None = None) -> Payload:
        """For the driver (which adopts the names), or for a direct caller (``owner``)."""
        pid = owner or self.spec.driver_pid
        return encode(value, owner_pid=pid, own=False, table=self.table, reuse_pid=pid)

    def _decode_args(self, args_desc: Any, deps: dict[str, Any],
                     frames: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any], list[Payload]]:
        if not deps and not args_desc[1]:     # the usual call: all in the pickle stream
            args, kwargs = pickle.loads(args_desc[0])
            return args, kwargs, []
        payloads = [from_wire(d, frames, self.table, owner=False) for d in deps.values()]
        values = {rid: p.decode() for rid, p in zip(deps, payloads, strict=True)}
        args_payload = from_wire(args_desc, frames, self.table, owner=False)
        with resolving_refs(values):
            args, kwargs = args_payload.decode()
        payloads.append(args_payload)
        return args, kwargs, payloads     # the payloads keep their segments mapped

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The process's event loop, running on a thread of its own (made on first use)."""
        with self.state_lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="headrace-asyncio",
                                 daemon=True).start()
            return self.loop

    def _await(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop()).result()

    async def _run_async(self, tid: str, name: str, fn: Callable[..., Any], args_desc: Any,
                         deps: Any, frames: list[Any], nret: int,
                         to: _LinkReplies | None = None, ids: list[str] | None = None) -> None:
        """One call of an async actor, on its event loop: ``async def`` methods run there
        (awaiting lets the others go on), plain methods on the loop's threads (a blocking
        ``hr.get`` in one blocks only itself). Ends in exactly one reply, like ``_run``."""
        send = self._send if to is None else to.send
        try:
            async with self.slots:
                if tid in self.cancelled:
                    self.cancelled.discard(tid)
                    raise asyncio.CancelledError
                args, kwargs, _keep = self._decode_args(args_desc, deps, frames)
                if inspect.iscoroutinefunction(fn):
                    value = await fn(*args, **kwargs)
                else:
                    value = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: fn(*args, **kwargs))
                    if asyncio.iscoroutine(value):
                        value = await value
        except asyncio.CancelledError:
            send((Msg.CANCELLED, self.spec.wid, tid))
            return
        except BaseException as exc:          # noqa: BLE001 - the user's error is the result
            send((Msg.ERROR, self.spec.wid, tid, error_info(exc, name, self.pid)))
            return
        finally:
            with self.state_lock:
                self.async_calls.pop(tid, None)
        self._reply_value(tid, name, value, nret, to, ids)

    def _send(self, header: tuple[Any, ...] | None, frames: list[Any] | None = None) -> None:
        """Send ``header`` (None: only what the client queued) to the driver, after the
        client's queued releases and handle counts."""
        with self.send_lock:
            for queued in self.client.flush():
                self._send_one(queued, None)
            if header is not None:
                self._send_one(header, frames)

    def _send_one(self, header: tuple[Any, ...], frames: list[Any] | None) -> None:
        if self.lane is not None:
            self.lane.send(header, frames)
        elif not self.outbox.closed:    # closed: this process is ending (``_exit``)
            protocol.send(self.outbox, header, frames)

    def _wake_flush(self) -> None:
        try:
            os.write(self.flush_w, b"f")
        except OSError:                 # full (a flush is due anyway), or closed at exit
            pass

    def _on_lane(self, header: tuple[Any, ...], frames: list[Any]) -> None:
        """Attach the shm rings on a thread (with the JIT fallback numba loads there), then tell the driver."""
        def attach() -> None:
            lane = attach_lane(header[1], self._ring_doorbell)
            if lane is None:                # calls stay on zmq
                return
            with self.send_lock:
                if self.outbox.closed:      # exiting meanwhile: nobody wants the lane now
                    lane.close()
                    return
                self.lane = lane
                protocol.send(self.outbox, (Msg.LANE_READY, self.spec.wid))
        threading.Thread(target=attach, name="headrace-lane", daemon=True).start()

    def _on_switch(self, header: tuple[Any, ...], frames: list[Any]) -> None:
        """The driver's last zmq message: from now on calls come through the ring."""
        if self.lane is not None:
            self.receive = self.lane.recv

    def _start_dag(self, plan: Any, key: str, ends: dict[int, Any],
                   trace_dir: str | None) -> str:
        """An internal call: run this process's part of a compiled DAG on a thread."""
        from ..loops.dag_loop import start_loop
        return start_loop(self, plan, key, ends, trace_dir)

    def _link(self, ends: tuple[Any, Any], link_id: str, caller_pid: int,
              caller_wid: str) -> tuple[int, str, bool]:
        """An internal call: serve a worker's direct calls (procs/links.py) on a thread of
        their own, in the order it made them; the user's code stays under ``call_lock``."""
        to = _LinkReplies(self, ends, link_id, caller_pid, caller_wid)
        threading.Thread(target=self._serve_link, args=(to,), name=f"headrace-link-{link_id}",
                         daemon=True).start()
        return self.pid, self.spec.wid, self.slots is not None or self.pool is not None

    def _serve_link(self, to: _LinkReplies) -> None:
        while True:
            try:
                header, frames = to.lane.recv()
            except ChannelClosedError:  # the caller closed it, or died
                break
            self._on_call(header, frames, to)
        to.close()

    def _ring_doorbell(self) -> None:
        """Under ``send_lock``: the driver is not reading our result ring; tell it to."""
        if not self.outbox.closed:
            protocol.send(self.outbox, (Msg.DOORBELL, self.spec.wid))

    # -- cancellation -----------------------------------------------------------------------
    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupt is not None and self.running.get(self.main_ident) == self.interrupt:
            self.interrupt = None
            raise _Cancelled()

    def _cancel(self, tid: str) -> None:
        with self.state_lock:
            future = self.async_calls.get(tid)
            if future is not None:          # an async actor's call: cancel its task
                future.cancel()
                return
            thread = next((t for t, running in self.running.items() if running == tid), None)
            if thread is None:
                self.cancelled.add(tid)
            elif thread == self.main_ident:
                self.interrupt = tid
                signal.pthread_kill(thread, signal.SIGUSR2)
            else:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                                           ctypes.py_object(_Cancelled))

    def _driver_gone(self) -> bool:
        """The driver exited (its pidfd is readable; without one, its pid is gone). Not asked
        on another host (the driver's pid means nothing there; its pings tell)."""
        if self.remote is not None:
            return False
        fd = self.driver_fd
        if fd is None:
            return not is_alive(self.spec.driver_pid)
        return bool(select.select([fd], [], [], 0)[0])

    def _remote_tick(self) -> bool:
        """On another host: True when the driver stopped pinging or the Dask worker that
        started us died (nobody wants our results then). Our liveness needs nothing from us:
        zmq's I/O thread answers the driver's heartbeats (runtime/hosts/cluster.py)."""
        return time.monotonic() - self.last_ping > _DRIVER_SILENCE_S or \
            os.getppid() != self.remote.parent_pid

    def _control_main(self) -> None:
        """The control thread: a failure in it leaves this process deaf (no cancel, no replies,
        no heartbeat), so it ends the process, which the driver then reports as a death."""
        try:
            self._control_loop()
        except BaseException:               # noqa: BLE001
            logging.getLogger(__name__).exception("the control thread failed; exiting")
            sys.stderr.flush()
            os._exit(70)

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.flush_r, zmq.POLLIN)
        driver_fd = self.driver_fd
        if driver_fd is not None:
            poller.register(driver_fd, zmq.POLLIN)
        watched: dict[int, Any] = {}        # pidfd -> the link to that actor
        slice_ms = None if driver_fd is not None else 1000 if self.remote is None \
            else int(_HEARTBEAT_S * 1000)
        while True:     # NOTE: with a pidfd, no timeout: an idle actor wakes for nothing
            events = dict(poller.poll(slice_ms))
            # Every queued control message, whether or not this wake was for one: after a C
            # call held the GIL for seconds, the poll may have timed out before the driver's
            # pings queued up, and the silence check below must see them.
            while self.ctl.getsockopt(_EVENTS) & _POLLIN:
                try:
                    header, _ = protocol.recv(self.ctl, _NOBLOCK)
                except zmq.Again:
                    break
                if header[0] == Msg.EXIT:
                    self.ctl.close(linger=0)
                    return
                if header[0] == Msg.CANCEL:
                    self._cancel(header[1])
                elif header[0] == Msg.PING:
                    self.last_ping = time.monotonic()
            if self.remote is not None and self._remote_tick():
                os._exit(1)                   # the driver or our Dask worker is gone
            if self.client_sock in events:
                while self.client_sock.getsockopt(_EVENTS) & _POLLIN:
                    try:
                        header, frames = protocol.recv(self.client_sock, _NOBLOCK)
                    except zmq.Again:   # EVENTS said POLLIN early (a CURVE message in flight)
                        break
                    if header[0] == Msg.DOORBELL:
                        self.client.doorbell(header[1])
                    else:
                        self.client.on_reply(header, frames)
            if self.flush_r in events:
                os.read(self.flush_r, 4096)
                self._send(None)
            for fd in [fd for fd in watched if fd in events]:
                poller.unregister(fd)
                link = watched.pop(fd)()
                os.close(fd)
                if link is not None:
                    link.die(f"the actor {link.label} (pid {link.pid}) died")
            while self.client.watches:      # links made since: watch their actors' pids
                fd, link = self.client.watches.popleft()
                watched[fd] = weakref.ref(link)
                poller.register(fd, zmq.POLLIN)
            if (driver_fd is not None and driver_fd in events) or (
                    driver_fd is None and self.remote is None and
                    (os.getppid() != self.parent_pid or self._driver_gone())):
                _clean_up_after(self.spec)
                os._exit(1)                   # the driver is gone: nobody wants our results


class _LinkReplies:
    """Where a direct call's replies go: the caller's link (procs/links.py). Rings the caller's
    doorbell (its client socket) when nobody there reads."""

    def __init__(self, worker: Worker, ends: tuple[Any, Any], link_id: str, caller_pid: int,
                 caller_wid: str) -> None:
        self.caller_pid, self.caller_wid, self.link_id = caller_pid, caller_wid, link_id
        self._lock = threading.Lock()
        self._sock = worker.ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.connect(protocol.endpoint(worker.spec.session_dir, caller_wid + ".client"))
        self.lane = WorkerLane(ends, self._doorbell)

    def _doorbell(self) -> None:
        protocol.send(self._sock, (Msg.DOORBELL, self.link_id))

    def send(self, header: tuple[Any, ...], frames: list[Any] | None = None) -> None:
        with self._lock:
            if self._sock is None:
                return
            try:
                self.lane.send(header, frames)
            except ChannelClosedError:      # the caller is gone: nobody wants it
                pass

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            self.lane.close()


def _clean_up_after(spec: WorkerSpec) -> None:
    """The driver died without shutting down: do what its shutdown would have done (every
    child does it, so one that is stuck in user code does not keep the session's memory).

    Only while the session's directory is there: a child that wakes up long after (it was
    stopped) must not unlink the segments of a new driver that reuses the old one's pid.
    """
    unlink_owned(os.getpid())           # our own spills
    if os.path.isdir(spec.session_dir):
        unlink_owned(spec.driver_pid)   # its puts, channels and spills, and our results
        shutil.rmtree(spec.session_dir, ignore_errors=True)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _setup_logging(level: int) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


async def _semaphore(n: int) -> asyncio.Semaphore:
    return asyncio.Semaphore(n)            # made on the loop it guards
