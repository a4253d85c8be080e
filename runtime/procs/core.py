"""The driver: spawns and watches children, schedules tasks and actor calls, owns the objects.

In: submissions from user threads (``submit_task``, ``create_actor``, ``submit_call``, ``put``).
Out: ``ObjectRef``s, finished by the I/O thread as results, errors and deaths arrive.
Invariants: every record changes under ``self.lock``; refs are finished (and their callbacks run)
after the lock is released; a child's death is seen through its pidfd at once and fails exactly
the calls it had; nothing waits without a bound: sends never block (no high-water mark).

  user thread ─submit─▶ queue ─(args ready, worker idle)─▶ PUSH ─▶ child
  I/O thread  ◀─ PULL ◀─ RESULT/ERROR ◀─ child          pidfd ready ─▶ _on_death ─▶ typed errors
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from ... import _config
from ...channels import native
from ...channels.segments import sweep_dead_owners, unlink_owned
from ...exceptions import ActorDiedError, ObjectLostError, TaskCancelledError, WorkerCrashedError
from ..wire import protocol
from .inbox import Inbox
from .output import LogForwarder
from ..wire.errors import task_error
from .lane import DriverLane
from .zygote import Zygote
from ..wire.payload import PLAIN_TYPES, Payload, SegmentPool, SegmentTable, encode, from_wire
from ..wire.protocol import Msg, RemoteSpec, WorkerSpec
from .records import (ActorRecord, ActorState, Proc, ProcState, TaskRecord, TaskState,
                      advance)
from .arguments import bad_argument
from .requests import ShippedClass, WorkerRequests
from ..refs.ref import (ObjectRef, Ref, RefState, as_arguments, capturing_refs, new_ref_id,
                        set_ref_source)
from .worker import SPEC_ENV

_WORKER_CMD = "from headrace.runtime.procs.worker import main; main()"
logger = logging.getLogger(__name__)
Finish = Callable[[], Any]


class Runtime(WorkerRequests):
    """One embedded local runtime (one per driver process)."""

    def __init__(self, num_cpus: int, *, log_to_driver: bool, logging_level: int,
                 address: Any = None) -> None:
        sweep_dead_owners()
        # only where the ops were not built at install: numba compiles them in the background
        self.warmup = native.prepare()
        if self.warmup is not None:     # reap it as soon as it is done: no zombie meanwhile
            _reap_later(self.warmup)
        self.pid = self.driver_pid = os.getpid()
        self.num_cpus = num_cpus
        self._shipped: dict[str, Any] = {}          # functions workers submitted, by key
        #: refs that went into values (arguments, results): whoever unpickles one finds it here
        self.known: weakref.WeakValueDictionary[str, Ref] = weakref.WeakValueDictionary()
        set_ref_source(self.ref_by_id)
        self.free_cpus: float = num_cpus
        self.log_to_driver = log_to_driver
        self.logging_level = logging_level
        self.dir = tempfile.mkdtemp(prefix=f"headrace-{self.pid}-")
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(protocol.endpoint(self.dir, "driver"))
        self.inbox = Inbox(sock, self._handle, self.wake_io)
        self.lock = threading.RLock()
        self.table = SegmentTable(pool=SegmentPool())
        self.procs: dict[str, Proc] = {}
        self.idle: deque[Proc] = deque()
        self.spares: deque[Proc] = deque()     # actor processes started ahead, no actor yet
        self._refilling = False
        self.last_submit = 0.0                       # monotonic time of the latest call
        self._spare_extra = 0                        # spares kept beyond SPARE_ACTORS
        self._spares_started = False
        self.ready: deque[TaskRecord] = deque()      # function tasks with their args ready
        self.tasks: dict[str, TaskRecord] = {}       # every task not yet answered
        self.actors: dict[str, ActorRecord] = {}
        self.named: dict[str, ActorRecord] = {}
        self.dags: weakref.WeakSet = weakref.WeakSet()     # compiled DAGs not torn down
        self.dag_hosts: dict[str, list[Any]] = {}   # idle function hosts by label (compiled.py)
        self.new_pidfds: list[Proc] = []
        self.released: deque[ActorRecord] = deque()  # handles all dropped (GC): to release
        self.start_failures = 0                      # children in a row that died unstarted
        self.closed = False
        self._ids = itertools.count(1)
        self.logs = LogForwarder() if log_to_driver else None
        self.wake_r, self.wake_w = os.pipe()
        self.cluster: Any = None                    # a Dask cluster hosting actors (hosts/)
        if address is not None:
            from ..hosts.cluster import DaskCluster
            try:
                self.cluster = DaskCluster(address, self._remote_lost, self._remote_ping)
            except BaseException:
                self.ctx.destroy(linger=0)
                for fd in (self.wake_r, self.wake_w):
                    _close_fd(fd)
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            self.inbox.add(self.cluster.inbox)
        self.zygote: Zygote | None = None           # forks local workers once it is up
        if _config.ZYGOTE:
            try:
                self.zygote = Zygote(dict(os.environ, PYTHONUNBUFFERED="1"))
            except OSError:                         # workers start as processes of their own
                logger.exception("could not start the zygote")
        self.io = threading.Thread(target=self._io_loop, name="headrace-io", daemon=True)
        self.io.start()
        with self.lock:
            for _ in range(num_cpus):
                self._spawn("task", "worker")

    # -- processes --------------------------------------------------------------------------
    def _spawn(self, kind: str, label: str, worker: str | None = None,
               resources: dict[str, float] | None = None) -> Proc:
        """Start a child: here, or on the Dask worker ``worker`` (runtime/hosts), holding
        ``resources`` of it."""
        wid = f"w{next(self._ids)}"
        remote = None if worker is None else RemoteSpec(
            "", self.cluster.driver, self.cluster.keys.as_tuple(), 0, worker)
        spec = WorkerSpec(wid=wid, kind=kind, session_dir=self.dir, driver_pid=self.pid,
                          sys_path=tuple(p for p in sys.path if p), label=label,
                          logging_level=self.logging_level, log_to_driver=self.log_to_driver,
                          num_cpus=self.num_cpus, remote=remote)
        if worker is not None:
            proc = Proc(wid, kind, label, self.cluster.launch(wid, spec, worker, resources))
            self.procs[wid] = proc
            return proc
        blob = base64.b64encode(pickle.dumps(spec)).decode()
        out_r, out_w = os.pipe() if self.logs else (None, subprocess.DEVNULL)
        try:
            popen: Any = None
            if self.zygote is not None:     # forked from the zygote once it is up
                popen = self.zygote.spawn(wid, blob, out_w if out_r is not None else None)
            if popen is None:
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                env[SPEC_ENV] = blob
                popen = subprocess.Popen([sys.executable, "-c", _WORKER_CMD], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out_w,
                                         stderr=subprocess.STDOUT, close_fds=True)
        finally:
            if out_r is not None:
                os.close(out_w)
        if self.logs is not None:
            self.logs.add(out_r, f"({label} pid={popen.pid}) ")
        proc = Proc(wid, kind, label, popen)
        self.procs[wid] = proc
        self.new_pidfds.append(proc)
        os.write(self.wake_w, b"p")
        return proc

    def _connect(self, proc: Proc) -> None:
        for attr, name in (("push", proc.wid), ("ctl", proc.wid + ".ctl")):
            setattr(proc, attr, self.child_socket(proc, name))

    def child_socket(self, proc: Proc, name: str) -> zmq.Socket:
        """A PUSH to the child's socket ``name`` (over CURVE TCP to one on another host)."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        if proc.remote is None:
            sock.connect(protocol.endpoint(self.dir, name))
        else:
            self.cluster.keys.client(sock)
            if name.endswith(".ctl"):       # its liveness: ZMTP heartbeats (runtime/hosts)
                self.cluster.watch_connection(proc.wid, sock)
            sock.connect(proc.endpoints[name])
        return sock

    # -- processes on other hosts (runtime/hosts) ----------------------------------------------
    def _remote_lost(self, wid: str, popen: Any) -> None:
        """The cluster's watcher: a remote child is gone (its reason is in ``popen``)."""
        proc = self.procs.get(wid)
        if proc is not None and proc.popen is popen:
            self._on_death(proc)

    def _remote_ping(self, wid: str) -> None:
        proc = self.procs.get(wid)
        if proc is not None and proc.state is ProcState.READY:
            try:
                self._send(proc, (Msg.PING,), ctl=True)
            except zmq.ZMQError:                # closed meanwhile: it is ending
                pass

    def _send(self, proc: Proc, header: tuple[Any, ...], frames: list[Any] | None = None,
              ctl: bool = False, lane_timeout_s: float = 0.0) -> None:
        if proc.lane is not None and not ctl:
            if proc.state is not ProcState.DEAD:
                proc.lane.send(header, frames, timeout_s=lane_timeout_s)
            return
        sock = proc.ctl if ctl else proc.push
        if sock is None or proc.state is ProcState.DEAD:
            return
        with proc.send_lock:
            protocol.send(sock, header, frames)

    # -- the I/O thread ---------------------------------------------------------------------
    def wake_io(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except OSError:                 # closed at shutdown
            pass

    def _io_loop(self) -> None:
        """Watch children's pidfds and the wake pipe; read the inbox while no user thread does."""
        inbox = self.inbox
        inbox.io_ident = threading.get_ident()
        full, side = zmq.Poller(), zmq.Poller()
        for sock in inbox.socks:
            full.register(sock, zmq.POLLIN)
        for poller in (full, side):
            poller.register(self.wake_r, zmq.POLLIN)
        by_fd: dict[int, Proc] = {}
        while not self.closed:
            holding = inbox.io_should_read() and inbox.role.take()
            try:
                for what, _ in (full if holding else side).poll(None if holding else 2):
                    if what in inbox.socks:
                        inbox.drain()
                    elif what == self.wake_r:
                        os.read(self.wake_r, 4096)
                        self._watch_new((full, side), by_fd)
                        self._release_dropped()
                    else:
                        proc = by_fd.pop(what)
                        for poller in (full, side):
                            poller.unregister(what)
                        proc.pidfd = None
                        os.close(what)
                        # What it sent before dying is handled first, so its last results
                        # are not failed by its death: all of it, after a clean exit (its BYE
                        # comes last), else what is here within a moment.
                        if holding:
                            self._drain_until_bye(proc)
                        elif inbox.take_for_io():
                            try:
                                self._drain_until_bye(proc)
                            finally:
                                inbox.role.give()
                        if proc.lane is not None:
                            proc.lane.drain_dead(f"the actor process (pid {proc.pid}) died")
                        if proc.pending_lane is not None:
                            proc.pending_lane.close()
                        self._on_death(proc)
            finally:
                if holding:
                    inbox.role.give()

    def _drain_until_bye(self, proc: Proc) -> None:
        """Holding the inbox: handle what a child that just ended sent. A clean exit (code 0)
        sent BYE last, so wait for it (bounded: a loaded machine may take a while to move the
        bytes); a crash sends none, so only settle briefly."""
        clean = proc.popen.poll() == 0
        deadline = time.monotonic() + (_BYE_WAIT_S if clean else 0.0)
        while True:
            self.inbox.drain(settle_s=0.005)
            if proc.bye or time.monotonic() >= deadline:
                return

    def _watch_new(self, pollers: tuple[zmq.Poller, ...], by_fd: dict[int, Proc]) -> None:
        with self.lock:
            new, self.new_pidfds = self.new_pidfds, []
        for proc in new:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:          # already gone and reaped: treat as dead now
                self._on_death(proc)
                continue
            proc.pidfd = fd
            by_fd[fd] = proc
            for poller in pollers:
                poller.register(fd, zmq.POLLIN)

    def _handle(self, header: tuple[Any, ...], frames: list[Any]) -> None:
        if header[0] == Msg.OUTPUT:          # already prefixed "(label pid=...)" by the child
            if self.logs is not None:
                sys.stderr.write(header[2].decode(errors="replace"))
                sys.stderr.flush()
            return
        if header[0] == Msg.EXITED:
            popen = self.cluster.exited(header[1], header[2]) if self.cluster else None
            if popen is not None:
                self._remote_lost(header[1], popen)
            return
        if header[0] == Msg.DOORBELL:
            proc = self.procs.get(header[1])
            if proc is not None and proc.lane is not None:
                proc.lane.doorbell()
            return
        finishes: list[Finish] = []
        with self.lock:
            proc = self.procs.get(header[1])
            if proc is not None:
                _HANDLERS[header[0]](self, proc, header, frames, finishes)
        _run(finishes)

    def _on_ready(self, proc: Proc, header: tuple, frames: list, out: list[Finish]) -> None:
        advance(proc, ProcState.READY)
        self.start_failures = 0
        if proc.remote is not None:         # on another host: its sockets, no shm rings
            proc.pid = proc.popen.pid = header[2]
            proc.endpoints = header[3]
            self.cluster.seen(proc.wid, ready=True)
        self._connect(proc)
        if _config.ACTOR_LANES and proc.remote is None:   # rings from the start
            self._ask_lane(proc)
        if proc.kind == "task":
            self.idle.append(proc)
            self._dispatch(out)
            return
        if proc.actor is None:              # a spare: ready for the actor that takes it
            return
        self._init_actor(proc, out)

    def _init_actor(self, proc: Proc, out: list[Finish]) -> None:
        """Send the actor its class and arguments; its queued calls follow at once."""
        actor = proc.actor
        frames_out: list[Any] = [None]
        inline = proc.remote is not None
        args = actor.init_args.to_wire(frames_out, inline=inline)
        deps = {rid: _payload_of(r, self).to_wire(frames_out, inline=inline)
                for rid, r in actor.init_deps.items()}
        self._send(proc, (Msg.INIT_ACTOR, actor.body.blob, args, deps, actor.max_concurrency,
                          actor.label), frames_out, lane_timeout_s=_LANE_SEND_S)
        advance(actor, ActorState.ALIVE)
        self._pump(actor, out)

    def _on_bye(self, proc: Proc, header: tuple, frames: list, out: list) -> None:
        proc.bye = True

    def _on_actor_ready(self, proc: Proc, header: tuple, frames: list, out: list) -> None:
        pass                                    # calls were already pipelined behind INIT

    def _on_result(self, proc: Proc, header: tuple, frames: list, out: list[Finish]) -> None:
        task = self._answered(proc, header[2], out)
        if task is None:
            return
        payloads = [Payload(d[0], [], [], []) if not d[1] else      # all in the pickle stream
                    from_wire(d, frames, self.table, owner=True) for d in header[3]]
        if len(header) > 4:             # handles and refs in it live as long as its refs
            holds = self._holds(proc, *header[4])
            for ref in task.refs:
                ref._keep = holds
        for ref, payload in zip(task.refs, payloads, strict=True):
            out.append(_finisher(ref._finish_payload, payload))

    def _on_error(self, proc: Proc, header: tuple, frames: list, out: list[Finish]) -> None:
        task = self._answered(proc, header[2], out)
        if task is not None:
            err = task_error(header[3])
            out.extend(_finisher(ref._finish_error, err) for ref in task.refs)

    def _on_cancelled(self, proc: Proc, header: tuple, frames: list, out: list[Finish]) -> None:
        task = self._answered(proc, header[2], out)
        if task is not None:
            self._cancel_refs(task, out)

    def _on_init_failed(self, proc: Proc, header: tuple, frames: list, out: list) -> None:
        if proc.actor is not None:
            proc.actor.init_error = task_error(header[2])
            # its death then fails every call, saying why
            self._send(proc, (Msg.EXIT,), lane_timeout_s=_LANE_SEND_S)

    def _answered(self, proc: Proc, tid: str, out: list[Finish]) -> TaskRecord | None:
        """Retire a task the child answered; frees its worker or actor slot."""
        task = self.tasks.pop(tid, None)
        if task is None:
            return None
        advance(task, TaskState.DONE)
        if task.actor is not None:
            task.actor.inflight.pop(tid, None)
            if task.actor.queue:                # a full call ring may have held calls back
                self._pump(task.actor, out)
        elif proc.task is task:
            proc.task = None
            self.free_cpus += task.num_cpus - proc.lent
            proc.lent = 0
            if proc.state is ProcState.READY:
                self.idle.append(proc)
            self._dispatch(out)
        return task

    # -- deaths -----------------------------------------------------------------------------
    def _on_death(self, proc: Proc) -> None:
        finishes: list[Finish] = []
        with self.lock:
            unstarted = proc.state is ProcState.STARTING
            advance(proc, ProcState.DEAD)
            for sock in (proc.push, proc.ctl):
                if sock is not None:
                    sock.close(linger=0)
            self._forget_child(proc)
            self.procs.pop(proc.wid, None)
            reason = _death_reason(proc.popen)
            self.start_failures += unstarted and proc.remote is None   # local starts only
            if proc.kind == "task":
                self._on_worker_death(proc, reason, finishes)
            elif proc.actor is not None:
                self._on_actor_death(proc.actor, proc, reason, finishes)
        # NOTE: what a child named after itself is channel spill segments only (its results
        # carry the driver's pid): a killed child cannot unlink them, so the driver does
        if proc.remote is None:
            unlink_owned(proc.popen.pid)
        else:
            self.cluster.forget(proc.wid)
        _run(finishes)

    def _on_worker_death(self, proc: Proc, reason: tuple[str, int | None, int | None],
                         out: list[Finish]) -> None:
        if proc in self.idle:
            self.idle.remove(proc)
        task = proc.task
        if self.start_failures >= _MAX_START_FAILURES:
            err = WorkerCrashedError(
                f"worker processes exit before they start ({reason[0]}); their output is above."
                "\n\nCheck that `python -c 'import headrace'` works in this environment.",
                pid=proc.pid, exit_code=reason[1], signal=reason[2])
            for queued in self.ready:
                self.tasks.pop(queued.tid, None)
                out.extend(_finisher(r._finish_error, err) for r in queued.refs)
            self.ready.clear()
        elif not self.closed:
            self._spawn("task", "worker")
        if task is None:
            return
        self.free_cpus += task.num_cpus
        if proc.forced_cancel == task.tid:
            self.tasks.pop(task.tid, None)
            self._cancel_refs(task, out)
        elif task.retries_left > 0:
            task.retries_left -= 1
            advance(task, TaskState.QUEUED)
            self.ready.appendleft(task)
        else:
            self.tasks.pop(task.tid, None)
            text, code, sig = reason
            err = WorkerCrashedError(
                f"the worker process (pid {proc.pid}) running {task.name} died: {text}.\n\n"
                f"{_death_hint(sig, code)}", pid=proc.pid, exit_code=code, signal=sig)
            out.extend(_finisher(ref._finish_error, err) for ref in task.refs)
        self._dispatch(out)

    def _on_actor_death(self, actor: ActorRecord, proc: Proc,
                        reason: tuple[str, int | None, int | None], out: list[Finish]) -> None:
        if actor.proc is not proc:
            return
        text, code, sig = reason
        if actor.killed:
            text = "it was killed by hr.kill()"
        elif actor.init_error is not None:
            text = f"its __init__ raised " \
                   f"{actor.init_error.traceback_str.rstrip().splitlines()[-1]}"
        hint = "Create a new actor." if actor.killed else (
            "Fix the error in __init__ (its remote traceback is this error's __cause__), then "
            "create the actor again.") if actor.init_error is not None else _death_hint(sig, code)
        err = ActorDiedError(
            f"actor {actor.name or actor.label!r} (pid {proc.pid}) died: {text}.\n\n{hint}",
            actor_name=actor.name or actor.label, pid=proc.pid, exit_code=code, signal=sig)
        if actor.init_error is not None:
            err.__cause__ = actor.init_error
        for dag in list(self.dags):     # its DAG loops died with it, restart or not
            out.append(functools.partial(dag.actor_died, actor, err))
        restart = (not actor.killed and not actor.exiting and actor.init_error is None
                   and actor.restarts_left > 0 and not self.closed)
        retried = []                    # max_task_retries: run again on the restarted actor
        for task in actor.inflight.values():
            if restart and task.retries_left != 0:
                if task.retries_left > 0:           # -1: without limit
                    task.retries_left -= 1
                advance(task, TaskState.QUEUED)
                task.proc = None
                retried.append(task)
                continue
            self.tasks.pop(task.tid, None)
            advance(task, TaskState.DONE)
            out.extend(_finisher(ref._finish_error, err) for ref in task.refs)
        actor.inflight.clear()
        actor.queue.extendleft(reversed(retried))      # first, in the order they were sent
        if restart:
            actor.restarts_left -= 1
            advance(actor, ActorState.STARTING)
            actor.proc = self._spawn("actor", actor.label, proc.remote,
                                     actor.placement[1] if actor.placement else None)
            actor.proc.actor = actor
            return
        self._end_actor(actor, err, out)

    def _end_actor(self, actor: ActorRecord, err: BaseException, out: list[Finish]) -> None:
        advance(actor, ActorState.DEAD)
        actor.error = err
        self.free_cpus += actor.num_cpus
        actor.num_cpus = 0
        for task in actor.queue:
            self.tasks.pop(task.tid, None)
            advance(task, TaskState.DONE)
            out.extend(_finisher(ref._finish_error, err) for ref in task.refs)
        actor.queue.clear()
        self.actors.pop(actor.aid, None)
        if actor.name is not None and self.named.get(actor.name) is actor:
            del self.named[actor.name]

    # -- submission -------------------------------------------------------------------------
    def encode_args(self, args: tuple, kwargs: dict, describe: Callable[[], str],
                    fn: Any = None) -> tuple[Payload, dict[str, Ref], list[Any]]:
        """Encode call arguments: top-level refs become dependencies (their values are passed),
        refs nested in containers travel as refs (Ray's rule); the handles and nested refs are
        returned, to be held until the call is answered.

        Raises:
            TypeError: an argument cannot be serialized; the message names it and the call.
        """
        deps: dict[str, Ref] = {}
        keep: list[Any] = []            # handles, then refs nested in the arguments
        exported: list[Ref] = []
        try:
            with capturing_refs(deps, keep, exported):
                payload = encode(as_arguments(args, kwargs), owner_pid=self.pid, own=True,
                                 table=self.table)
        except TypeError as exc:
            raise TypeError(bad_argument(args, kwargs, describe(), fn, exc)) from exc
        for ref in exported:            # a worker that gets one asks for it by id
            self.known[ref._id] = ref
        return payload, deps, keep + exported

    @staticmethod
    def _plain_args(args: tuple, kwargs: dict) -> tuple[Payload, dict, None] | None:
        """``encode_args`` of the usual call, or None: positional arguments of plain types,
        where no ref or handle can hide and no buffer leaves the pickle stream (what encode()
        makes of them, without its walk and capture)."""
        if kwargs or not all(type(a) in PLAIN_TYPES for a in args):
            return None
        return Payload(pickle.dumps((args, kwargs), 5), [], [], []), {}, None

    def submit_task(self, body: Any, options: dict[str, Any], args: tuple,
                    kwargs: dict) -> list[ObjectRef]:
        name = options.get("name") or body.name
        payload, deps, keep = self._plain_args(args, kwargs) or \
            self.encode_args(args, kwargs, lambda: f"{name}.remote()", body.fn)
        refs = [ObjectRef(new_ref_id(), name, self) for _ in range(options["num_returns"])]
        task = TaskRecord(refs[0]._id, name, refs, payload, deps, fn=body,
                          num_cpus=options["num_cpus"], retries_left=options["max_retries"])
        task.keep = keep or None
        self._submit(task, refs)
        return refs

    def submit_call(self, actor: ActorRecord, method: str, nret: int, args: tuple,
                    kwargs: dict, fn: Any = None) -> list[ObjectRef]:
        name = f"{actor.label}.{method}"
        payload, deps, keep = self._plain_args(args, kwargs) or \
            self.encode_args(args, kwargs, lambda: f"{name}.remote()", fn)
        refs = [ObjectRef(new_ref_id(), name, self) for _ in range(nret)]
        task = TaskRecord(refs[0]._id, name, refs, payload, deps, method=method, actor=actor,
                          retries_left=actor.task_retries)
        task.keep = keep or None
        self._submit(task, refs)
        return refs

    def _submit(self, task: TaskRecord, refs: list[ObjectRef]) -> None:
        finishes: list[Finish] = []
        with self.lock:
            self._check_open()
            self._submit_locked(task, refs, finishes)
        _run(finishes)

    def _submit_locked(self, task: TaskRecord, refs: list[ObjectRef], out: list[Finish]) -> None:
        self.last_submit = time.monotonic()
        for ref in refs:
            ref._task = task
        self.tasks[task.tid] = task
        actor = task.actor
        if actor is not None and not task.deps and not actor.queue and \
                actor.state is ActorState.ALIVE and actor.proc.lane is not None and \
                not task.args.buffers:
            # the usual call: straight into the actor's call ring (what _pump does)
            if actor.proc.lane.send((Msg.CALL, task.tid, task.method, (task.args.meta, ()), {},
                                     len(task.refs))):
                advance(task, TaskState.QUEUED)
                advance(task, TaskState.SENT)
                task.proc = actor.proc
                actor.inflight[task.tid] = task
                return
        if actor is not None:
            if actor.state is ActorState.DEAD:
                self.tasks.pop(task.tid)
                out.extend(_finisher(r._finish_error, actor.error) for r in refs)
            else:
                actor.queue.append(task)
        self._track_deps(task, out)

    def _track_deps(self, task: TaskRecord, out: list[Finish]) -> None:
        if not task.deps:                   # the usual call: nothing to wait for
            self._args_ready(task, out)
            return
        pending = [r for r in task.deps.values() if not r.done()]
        failed = next((r for r in task.deps.values() if r._state in _BAD), None)
        if failed is not None:
            self._fail_unsent(task, failed._error, out)
            return
        task.waiting = len(pending)
        if not pending:
            self._args_ready(task, out)
            return
        for ref in pending:
            ref.add_done_callback(lambda r, t=task: self._on_dep_done(t, r))

    def _on_dep_done(self, task: TaskRecord, ref: Ref) -> None:
        finishes: list[Finish] = []
        with self.lock:
            if task.state is TaskState.WAITING:
                if ref._state in _BAD:
                    self._fail_unsent(task, ref._error, finishes)
                else:
                    task.waiting -= 1
                    if task.waiting == 0:
                        self._args_ready(task, finishes)
        _run(finishes)

    def _args_ready(self, task: TaskRecord, out: list[Finish]) -> None:
        advance(task, TaskState.QUEUED)
        if task.actor is not None:
            self._pump(task.actor, out)
        else:
            self.ready.append(task)
            self._dispatch(out)

    def _fail_unsent(self, task: TaskRecord, err: BaseException, out: list[Finish]) -> None:
        """An argument failed or was cancelled: the task fails with that error, unsent."""
        advance(task, TaskState.DONE)
        self.tasks.pop(task.tid, None)
        if task.actor is not None:
            if task in task.actor.queue:
                task.actor.queue.remove(task)
            self._pump(task.actor, out)
        elif task in self.ready:
            self.ready.remove(task)
        if isinstance(err, TaskCancelledError):
            out.extend(_finisher(r._finish_cancelled, err) for r in task.refs)
        else:
            out.extend(_finisher(r._finish_error, err) for r in task.refs)

    def _dispatch(self, out: list[Finish]) -> None:
        """Send ready function tasks to idle workers, in submission order."""
        while self.ready and self.idle and self.ready[0].num_cpus <= self.free_cpus:
            task = self.ready.popleft()
            proc = self.idle.pop()          # the one that finished last: still spinning, warm
            self.free_cpus -= task.num_cpus
            advance(task, TaskState.SENT)
            task.proc, proc.task = proc, task
            frames: list[Any] = [None]
            args = task.args.to_wire(frames)
            deps = {rid: _payload_of(r, self).to_wire(frames) for rid, r in task.deps.items()}
            body = task.fn
            blob = None if body.fn_id in proc.fn_ids else body.blob
            proc.fn_ids.add(body.fn_id)
            self._send(proc, (Msg.TASK, task.tid, body.fn_id, blob, args, deps,
                              len(task.refs), task.name), frames)

    def _pump(self, actor: ActorRecord, out: list[Finish]) -> None:
        """Send an actor's queued calls in order, up to the first whose arguments are pending."""
        if actor.state is not ActorState.ALIVE:
            return
        proc = actor.proc
        lane = proc.lane
        while actor.queue and actor.queue[0].state is TaskState.QUEUED:
            task = actor.queue[0]
            if task.is_exit:
                if lane is not None and not lane.send((Msg.EXIT,)):
                    return                      # the call ring is full: after the next result
                actor.queue.popleft()
                actor.exiting = True
                self.tasks.pop(task.tid, None)
                if lane is None:
                    self._send(proc, (Msg.EXIT,))
                continue
            frames: list[Any] = [None]
            inline = proc.remote is not None
            args = task.args.to_wire(frames, inline=inline)
            deps = {rid: _payload_of(r, self).to_wire(frames, inline=inline)
                    for rid, r in task.deps.items()} if task.deps else {}
            header = (Msg.CALL, task.tid, task.method, args, deps, len(task.refs))
            if lane is not None:
                if not lane.send(header, frames):
                    return                      # the call ring is full: after the next result
            else:
                self._send(proc, header, frames)
            actor.queue.popleft()
            advance(task, TaskState.SENT)
            task.proc = proc
            actor.inflight[task.tid] = task

    def _ask_lane(self, proc: Proc) -> None:
        if not proc.lane_asked:
            proc.lane_asked = True
            threading.Thread(target=self._open_lane, args=(proc,), daemon=True,
                             name="headrace-lane").start()

    def _open_lane(self, proc: Proc) -> None:
        """Background: make the rings, hand them to the process (its calls use zmq meanwhile)."""
        try:
            lane = DriverLane(self._handle)
        except Exception:       # noqa: BLE001 - no lane: the actor keeps using zmq
            logger.exception("could not create the shared-memory lane of %s", proc.label)
            return
        with self.lock:
            if proc.state is ProcState.DEAD or self.closed:
                lane.close()
                return
            proc.pending_lane = lane
            self._send(proc, (Msg.LANE, pickle.dumps(lane.worker_ends())))

    def _on_lane_ready(self, proc: Proc, header: tuple, frames: list, out: list) -> None:
        """The actor attached its rings: later calls go there, after a last SWITCH on zmq."""
        lane, proc.pending_lane = proc.pending_lane, None
        if lane is None:
            return
        self._send(proc, (Msg.SWITCH,))
        proc.lane = lane

    # -- actors -----------------------------------------------------------------------------
    def create_actor(self, body: Any, options: dict[str, Any], args: tuple,
                     kwargs: dict) -> ActorRecord:
        label = body.name
        name = options.get("name")
        payload, deps, keep = self.encode_args(args, kwargs, lambda: f"{label}.remote()",
                                               body.cls.__init__)
        actor = ActorRecord(new_ref_id(), name, label, body, payload, deps,
                            max_concurrency=options["max_concurrency"],
                            num_cpus=options["num_cpus"], max_restarts=options["max_restarts"],
                            max_task_retries=options.get("max_task_retries", 0))
        actor.keep = keep or None
        if options.get("host") is not None or options.get("resources"):
            actor.placement = (options.get("host"), options.get("resources"), None)
        finishes: list[Finish] = []
        with self.lock:
            self._check_open()
            existing = self.named.get(name) if options.get("get_if_exists") else None
            if existing is not None:        # get_or_create: that one, its arguments kept
                return existing
            self._start_actor(actor, finishes)
        _run(finishes)
        return actor

    def _start_actor(self, actor: ActorRecord, out: list[Finish]) -> None:
        """Place a new actor (under the lock): a spare process, or a new one.

        Raises:
            ValueError: its name is taken, or it asks for more CPUs than are free.
        """
        name, label = actor.name, actor.label
        if name is not None and name in self.named:
            raise ValueError(f"an actor named {name!r} already exists.\n\n"
                             f"Use hr.get_actor({name!r}) to get a handle to it, or pick "
                             "another name.")
        if actor.placement is not None:         # on a Dask worker (runtime/hosts)
            host, resources, _ = actor.placement
            if self.cluster is None:
                raise ValueError(f"actor {label} asks for host={host!r} resources="
                                 f"{resources!r}, which only a cluster has.\n\nConnect to "
                                 "one with hr.init(address='tcp://scheduler:8786'), or drop "
                                 "those options.")
        if self.cluster is not None:
            host, resources, _ = actor.placement or (None, None, None)
            worker = self.cluster.place(label, host, resources)
            actor.placement = (host, resources, worker)
            self.actors[actor.aid] = actor
            if name is not None:
                self.named[name] = actor
            actor.num_cpus = 0                  # the cluster's CPUs, not this host's slots
            proc = self._spawn("actor", label, worker, resources)
            actor.proc, proc.actor = proc, actor
            return
        if actor.num_cpus > self.free_cpus:
            raise ValueError(
                f"actor {label} asks for num_cpus={actor.num_cpus} but only "
                f"{self.free_cpus:g} of {self.num_cpus} CPUs are free.\n\nLower num_cpus, "
                "kill actors you no longer need, or hr.init(num_cpus=...) with more.")
        self.free_cpus -= actor.num_cpus
        self.actors[actor.aid] = actor
        if name is not None:
            self.named[name] = actor
        proc = self._take_spare(label)
        actor.proc, proc.actor, proc.label = proc, actor, label
        if proc.state is ProcState.READY:
            self._init_actor(proc, out)
        self._refill_spares()

    def hold_actor(self, actor: ActorRecord) -> None:
        """The first handle to ``actor`` was made (a worker's client tells the driver)."""

    def actor_record(self, aid: str, name: str | None, label: str, cls_name: str,
                     methods: dict[str, int]) -> ActorRecord:
        """The record of actor ``aid`` for a handle that arrived here (unpickled); an actor
        that is gone gets a record of a dead actor, whose calls raise ActorDiedError."""
        with self.lock:
            actor = self.actors.get(aid)
        if actor is not None:
            return actor
        actor = ActorRecord(aid, name, label, ShippedClass(cls_name, methods, None), None, {},
                            max_concurrency=1, num_cpus=0, max_restarts=0)
        actor.state = ActorState.DEAD
        actor.error = ActorDiedError(f"actor {name or label!r} is no longer alive (a handle to "
                                     "it arrived after it ended).\n\nCreate a new actor.",
                                     actor_name=name or label)
        return actor

    def get_actor(self, name: str) -> ActorRecord:
        """The record of the live actor named ``name``."""
        with self.lock:
            record = self.named.get(name)
        if record is None:
            raise ValueError(f"no live actor is named {name!r}; create one with "
                             f"Cls.options(name={name!r}).remote()")
        return record

    def _take_spare(self, label: str) -> Proc:
        """A spare actor process (the one started longest ago), or a new one named ``label``.

        A spare taken before it was ready (its rings not attached yet), or none left, means
        actors come faster than spares boot: keep one more, up to ``_MAX_EXTRA_SPARES`` more
        than configured.
        """
        while self.spares:
            proc = self.spares.popleft()
            if proc.state is not ProcState.DEAD:
                if proc.lane is None:
                    self._more_spares()
                return proc
        if self._spares_started:           # there were spares, but they were all taken
            self._more_spares()
        return self._spawn("actor", label)

    def _more_spares(self) -> None:
        self._spare_extra = min(self._spare_extra + 1, _MAX_EXTRA_SPARES)

    def _spares_wanted(self) -> int:
        return _config.SPARE_ACTORS + self._spare_extra if _config.SPARE_ACTORS > 0 else 0

    def _refill_spares(self) -> None:
        """Start spares up to ``SPARE_ACTORS`` (plus what demand added), a moment later: a new
        spare booting must not slow the first calls of the actor that just took one."""
        if len(self.spares) < self._spares_wanted() and not self._refilling:
            self._refilling = True
            timer = threading.Timer(_SPARE_DELAY_S, self._start_spares)
            timer.daemon = True
            timer.start()

    def _start_spares(self, since: float | None = None) -> None:
        """Start the spares once the runtime has had no call for a moment (a spare booting takes
        a core for a few hundred ms, its imports: not while calls are timed), or after
        ``_SPARE_MAX_DELAY_S`` in any case."""
        now = time.monotonic()
        since = now if since is None else since
        if now - self.last_submit < _SPARE_QUIET_S and now - since < _SPARE_MAX_DELAY_S \
                and not self.closed:
            timer = threading.Timer(_SPARE_QUIET_S, self._start_spares, (since,))
            timer.daemon = True
            timer.start()
            return
        with self.lock:
            self._refilling = False
            while len(self.spares) < self._spares_wanted() and not self.closed:
                self.spares.append(self._spawn("actor", "spare"))
                self._spares_started = True

    def kill_actor(self, actor: ActorRecord, no_restart: bool = True) -> None:
        with self.lock:
            if actor.state is ActorState.DEAD:
                return
            if no_restart:
                actor.killed = True
                if actor.name is not None and self.named.get(actor.name) is actor:
                    del self.named[actor.name]       # the name is free again at once
            proc = actor.proc
        _kill(proc.popen)

    def release_actor_soon(self, actor: ActorRecord) -> None:
        """From a garbage-collection callback: the I/O thread releases the actor (no lock here)."""
        self.released.append(actor)
        self.wake_io()

    def _release_dropped(self) -> None:
        while self.released:
            self.release_actor(self.released.popleft())

    def release_actor(self, actor: ActorRecord) -> None:
        """The last handle to an unnamed actor is gone: end it once its queue is done."""
        finishes: list[Finish] = []
        with self.lock:
            if self.closed or actor.state is ActorState.DEAD or actor.name is not None:
                return
            marker = TaskRecord(new_ref_id(), f"{actor.label}.__exit__", [], None, {},
                                actor=actor, is_exit=True)
            advance(marker, TaskState.QUEUED)
            self.tasks[marker.tid] = marker
            actor.queue.append(marker)
            self._pump(actor, finishes)
        _run(finishes)

    # -- objects ----------------------------------------------------------------------------
    def put(self, value: Any) -> ObjectRef:
        if isinstance(value, Ref):
            raise TypeError("hr.put() of a ref is not allowed; pass the ref itself instead")
        self._check_open()
        payload = encode(value, owner_pid=self.pid, own=True, table=self.table)
        ref = ObjectRef(new_ref_id(), "put", self)
        ref._finish_payload(payload)
        return ref

    def cancel(self, ref: Ref, *, force: bool = False) -> None:
        finishes: list[Finish] = []
        with self.lock:
            task = getattr(ref, "_task", None)
            if task is None or task.state is TaskState.DONE or ref.done():
                return
            if force and task.actor is not None:
                raise ValueError(f"force=True is not supported for actor calls ({task.name}); "
                                 "use hr.kill(actor) to end the actor instead")
            if task.state is not TaskState.SENT:
                self._fail_unsent(task, TaskCancelledError(
                    f"{task.name} ({ref.key}) was cancelled before it ran"), finishes)
            elif force:
                task.proc.forced_cancel = task.tid
                _kill(task.proc.popen)
            else:
                self._send(task.proc, (Msg.CANCEL, task.tid), ctl=True)
        _run(finishes)

    def _cancel_refs(self, task: TaskRecord, out: list[Finish]) -> None:
        err = TaskCancelledError(f"{task.name} ({task.refs[0].key}) was cancelled while running"
                                 if task.refs else f"{task.name} was cancelled")
        out.extend(_finisher(r._finish_cancelled, err) for r in task.refs)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the headrace runtime was shut down; call hr.init() again")

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End every child, fail every pending ref, unlink every segment. Idempotent."""
        for dag in list(self.dags):
            dag.teardown()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            procs = list(self.procs.values())
            for proc in procs:
                try:
                    self._send(proc, (Msg.EXIT,))
                except zmq.ZMQError:
                    pass
        self.inbox.closed = True
        self.wake_io()
        self.io.join(2.0)
        if self.cluster is not None:            # every process on every host, then the rest
            self.cluster.close()
        _reap(procs, _config.SHUTDOWN_GRACE_S)
        for proc in procs:
            if proc.remote is None:
                unlink_owned(proc.popen.pid)
        if self.warmup is not None and self.warmup.poll() is None:
            _kill(self.warmup)          # not done yet: the next process compiles instead
            self.warmup.wait(2.0)
        if self.zygote is not None:     # after its children: it reported their exits
            self.zygote.close()
        finishes: list[Finish] = []
        with self.lock:
            err = ObjectLostError("the headrace runtime was shut down before this value was "
                                  "computed; call hr.init() and submit the work again")
            for task in self.tasks.values():
                out = [_finisher(r._finish_error, err) for r in task.refs]
                finishes.extend(out)
            self.tasks.clear()
            for proc in procs:
                for sock in (proc.push, proc.ctl):
                    if sock is not None:
                        sock.close(linger=0)
                if proc.pidfd is not None:
                    _close_fd(proc.pidfd)
        _run(finishes)
        if self.inbox.role.take_blocking(1.0):     # receivers leave within one poll slice
            for sock in self.inbox.socks:
                sock.close(linger=0)
            self.inbox.role.give()
        self.ctx.destroy(linger=0)
        if self.cluster is not None:
            self.cluster.release()
        if self.logs is not None:
            self.logs.close()
        for fd in (self.wake_r, self.wake_w):
            _close_fd(fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        for proc in procs:
            for lane in (proc.lane, proc.pending_lane):
                if lane is not None:
                    lane.close()
        self.table.pool.clear()
        unlink_owned(self.pid)


_BAD = frozenset({RefState.FAILED, RefState.CANCELLED})
#: After a clean exit, how long the driver waits for the child's BYE (its last message).
_BYE_WAIT_S = 2.0
_LANE_SEND_S = 0.5      # INIT/EXIT into a call ring: it has room, or the actor drains it fast
_MAX_START_FAILURES = 3
#: A spare actor process starts this long after an actor took the last one (see _refill_spares).
_SPARE_DELAY_S = 1.0
#: ...and then waits for this long without a call (at most _SPARE_MAX_DELAY_S in all).
_SPARE_QUIET_S = 0.25
_SPARE_MAX_DELAY_S = 20.0
#: At most this many spares beyond SPARE_ACTORS when actors come faster than one boots.
_MAX_EXTRA_SPARES = 2

_HANDLERS: dict[int, Callable[..., None]] = {
    Msg.READY: Runtime._on_ready, Msg.ACTOR_READY: Runtime._on_actor_ready,
    Msg.REQUEST: Runtime._on_request, Msg.RESULT: Runtime._on_result, Msg.ERROR: Runtime._on_error,
    Msg.CANCELLED: Runtime._on_cancelled, Msg.INIT_FAILED: Runtime._on_init_failed,
    Msg.LANE_READY: Runtime._on_lane_ready, Msg.BYE: Runtime._on_bye,
}


def _finisher(method: Callable[[Any], Any], arg: Any) -> Finish:
    return lambda: method(arg)


def _run(finishes: list[Finish]) -> None:
    for fn in finishes:
        fn()


def _payload_of(ref: Ref, rt: Runtime) -> Payload:
    payload = ref._payload
    if payload is None:          # a ref that finished with a plain value (a compiled DAG's)
        payload = encode(ref._outcome(), owner_pid=rt.pid, own=True, table=rt.table)
    return payload


def _death_reason(popen: subprocess.Popen) -> tuple[str, int | None, int | None]:
    if hasattr(popen, "death_reason"):      # on another host (runtime/hosts/cluster.py)
        return popen.death_reason()
    try:
        code = popen.wait(timeout=1.0)
    except subprocess.TimeoutExpired:   # still tearing down (threads, big mappings)
        _reap_later(popen)
        return "it stopped responding", None, None
    if code < 0:
        sig = -code
        return f"killed by signal {signal.Signals(sig).name} ({sig})", None, sig
    return f"exited with code {code}", code, None


def _death_hint(sig: int | None, code: int | None) -> str:
    if sig == signal.SIGKILL:
        return ("SIGKILL usually comes from the kernel's OOM killer (check `dmesg`) or a "
                "`kill -9`; reduce memory use or free memory.")
    if sig is not None:
        return "A signal ended the process; check what sent it (a crash in native code?)."
    return ("The process called os._exit() or sys.exit(), or crashed in native code; "
            "raise an exception instead to report an error.")


def _kill(popen: subprocess.Popen) -> None:
    try:
        popen.kill()
    except ProcessLookupError:
        pass


def _reap(procs: list[Proc], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.popen.poll() is None:
            _kill(proc.popen)
    for proc in procs:
        try:
            proc.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            _reap_later(proc.popen)


def _reap_later(popen: subprocess.Popen) -> None:
    """A daemon thread reaps ``popen`` once it ends (a killed child still dying, the warm-up),
    so it never stays a zombie."""
    threading.Thread(target=popen.wait, name="headrace-reaper", daemon=True).start()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
