"""The API inside a worker: ``.remote()``, ``get``, ``put``, handles, through the driver.

In: the API calls of user code running in a task worker or an actor (``session.current()`` is a
``WorkerClient`` there). Out: requests to the driver, which owns every process, task and value
(``Msg.REQUEST`` over the worker's own channel: its lane or zmq, so they stay in order with its
replies), and ``ClientRef``s that the driver's ``Msg.REPLY``s finish (on the worker's control
thread, which reads the client socket).
Invariants:
- The driver holds a value for the worker while the worker holds its ref: a ref's death queues a
  release, and so does a handle's last death in this process (its actor may then end). Queued
  releases and handle counts go out before the next message of this process (``flush``), so the
  driver learns of a handle that arrived here before the reply of the call that brought it.
- A ref made here stays in this process: it can be an argument of calls made here, and
  ``get``/``wait``/``await`` read it; pickling it into a return value is refused (typed error).
- A blocked ``get`` in a task worker gives its CPU slot back to the driver while it waits, so
  tasks that wait for tasks they submitted cannot starve the pool.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ... import _config
from ...exceptions import RefsTypeError, TaskCancelledError
from ..refs.ref import ObjectRef, Ref, RefState, as_arguments, capturing_refs, new_ref_id
from .links import LINK, Link, Route

#: The client of this process, set by a worker as it starts (None in the driver).
CLIENT: WorkerClient | None = None

#: Options a worker's ``.remote()`` sends along (the driver checks nothing twice).
_TASK_OPTIONS = ("num_cpus", "max_retries")
_ACTOR_OPTIONS = ("max_concurrency", "num_cpus", "max_restarts", "get_if_exists",
                  "max_task_retries")
#: Marks a ref the driver finished (``ClientRef._keep``): the driver has its value.
_FROM_DRIVER = object()
#: The longest a worker waits for the driver to answer a lookup or an actor's creation.
_ANSWER_S = 60.0


class RemoteBody:
    """What a handle needs of its actor's class in a process that did not define it."""

    __slots__ = ("name", "methods", "cls")

    def __init__(self, name: str, methods: dict[str, int]) -> None:
        self.name, self.methods, self.cls = name, methods, None


class RemoteActor:
    """A worker's record of an actor it holds handles to (the driver has the real one)."""

    __slots__ = ("aid", "name", "label", "body", "handles", "route", "__weakref__")

    def __init__(self, aid: str, name: str | None, label: str, body: RemoteBody) -> None:
        self.aid, self.name, self.label, self.body = aid, name, label, body
        self.handles = 0
        self.route = Route()            # direct or through the driver (procs/links.py)


class ClientRef(ObjectRef):
    """A ref made in a worker: the driver's reply finishes it (on the control thread)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<ObjectRef: status: {self._state.value}, key: {self.key}>"

    def _producer(self) -> Any:
        link = self._task           # a direct call's: its link's result ring
        if link is not None and link.dead is None:
            return link.lane
        return None                 # finished by another thread: its callbacks wake waiters

    def add_done_callback(self, fn: Callable[[Ref], Any]) -> None:
        """As ``Ref``'s; a pending ref someone waits on this way (``await ref``, ``future()``)
        stays alive until it is final, even if nothing else holds it."""
        if not self.done():
            pinned = self._runtime.pinned
            pinned.add(self)
            super().add_done_callback(fn)
            super().add_done_callback(pinned.discard)
        else:
            super().add_done_callback(fn)

    def _on_cancel(self, force: bool) -> None:
        link = self._task
        if link is not None:            # a direct call: tell its actor itself
            self._runtime.cancel_direct(link, self)
        else:
            self._runtime.cancel(self, force=force)


class WorkerClient:
    """``session.current()`` in a worker process: the runtime's API, served by the driver."""

    def __init__(self, send: Callable[..., None], wake: Callable[[], None], spec: Any,
                 table: Any, pid: int) -> None:
        from ..wire.protocol import Msg
        self._msg = Msg
        self._send = send               # the worker's _send: lane or zmq, in order
        self._wake = wake               # the control thread flushes the queue (idle worker)
        self.wid = spec.wid
        self.dir = spec.session_dir
        self.pid = pid
        self.driver_pid = spec.driver_pid
        self.num_cpus = spec.num_cpus
        self.table = table
        self._refs: weakref.WeakValueDictionary[str, ClientRef] = weakref.WeakValueDictionary()
        self._actors: weakref.WeakValueDictionary[str, RemoteActor] = \
            weakref.WeakValueDictionary()
        self._fn_keys: dict[int, str] = {}     # id(FunctionBody) -> key the driver knows it by
        self._keys = itertools.count(1)
        self._pending: collections.deque = collections.deque()   # releases and handle counts
        self.pinned: set[ClientRef] = set()     # pending refs with callbacks (awaited)
        self._blocked = 0
        self._blocked_lock = threading.Lock()
        self.closed = False
        # direct calls (procs/links.py)
        self.ctx: Any = None            # the worker's zmq context (cancels go to actors' ctl)
        self._local: set[str] = set()   # ids of direct refs the driver does not know
        self.links: weakref.WeakValueDictionary[str, Link] = weakref.WeakValueDictionary()
        self.watches: collections.deque = collections.deque()   # (pidfd, link) to watch
        self._ctl: dict[str, Any] = {}  # actor wid -> PUSH to its control socket
        self._ctl_lock = threading.Lock()

    # -- what goes to the driver --------------------------------------------------------------
    def _request(self, op: str, body: tuple, frames: list[Any] | None = None) -> None:
        self._send((self._msg.REQUEST, self.wid, op, body), frames)

    def flush(self) -> list[tuple]:
        """The queued releases and handle counts, as request headers (the worker sends them
        first, under its send lock)."""
        if not self._pending:
            return []
        items = []
        while self._pending:
            items.append(self._pending.popleft())
        return [(self._msg.REQUEST, self.wid, "batch", (items,))]   # in order

    def holds_refs(self) -> bool:
        """Whether refs made here are alive (the driver holds their values for us)."""
        return len(self._refs) > 0

    def _queue(self, item: tuple) -> None:
        """From anywhere (GC callbacks too): no lock; wakes the flusher (which may have just
        emptied the queue: every item wakes it)."""
        self._pending.append(item)
        self._wake()

    def _new_ref(self, name: str, rid: str | None = None) -> ClientRef:
        ref = ClientRef(rid or new_ref_id(), name, self)
        self._refs[ref._id] = ref
        weakref.finalize(ref, self._dropped, ref._id)
        return ref

    def _dropped(self, rid: str) -> None:
        """A ref of ours died (GC callback): the driver releases it, if it knows it."""
        if rid in self._local:
            self._local.discard(rid)
        else:
            self._queue(("ref", rid, 0))

    def _encode_args(self, args: tuple, kwargs: dict, describe: Callable[[], str],
                     fn: Any, made: list[Any] | None = None,
                     ) -> tuple[Any, list[Any], list[str], Any, bool]:
        """Wire form, frames, ids of top-level refs, payload, and whether refs or handles
        travel inside (the call then needs the driver)."""
        from ..wire.payload import PLAIN_TYPES, Payload, encode
        if not kwargs and all(type(a) in PLAIN_TYPES for a in args):    # the usual call
            payload = Payload(pickle.dumps((args, kwargs), 5), [], [], [])
            return ((payload.to_wire([]), [], []), [None], [], payload, False)
        from .arguments import bad_argument
        deps: dict[str, Ref] = {}
        handles: list[Any] = []
        exported: list[Ref] = []
        try:
            with capturing_refs(deps, handles, exported):
                payload = encode(as_arguments(args, kwargs), owner_pid=self.driver_pid,
                                 own=False, table=self.table, reuse_pid=self.driver_pid,
                                 made=made)
        except TypeError as exc:
            raise TypeError(bad_argument(args, kwargs, describe(), fn, exc)) from exc
        self.export([*deps.values(), *exported])
        foreign = [r for r in deps.values() if not isinstance(r, ClientRef)]
        if foreign:                     # a CompiledDAGRef: it lives in the driver only
            raise RefsTypeError(f"{foreign[0].key} cannot be an argument of a call made in a "
                                "worker; pass its value")
        frames: list[Any] = [None]
        # (handles and refs stay alive in the caller's arguments until the request is sent)
        return ((payload.to_wire(frames), [h._record.aid for h in handles],
                 [r._id for r in exported]), frames, list(deps), payload,
                bool(deps or handles or exported))

    def export(self, refs: Any) -> None:
        """``refs`` leave this process (or go to the driver as arguments): the driver adopts
        those it does not know yet (direct refs), before the message that carries them."""
        for ref in refs:
            if isinstance(ref, ClientRef) and ref._id in self._local:
                self.adopt(ref)

    def adopt(self, ref: ClientRef) -> None:
        rid = ref._id
        self._local.discard(rid)
        if ref.done():
            self._settle(ref)
        else:
            self._request("adopt", (rid, ref._name, "pending", None))
            ref.add_done_callback(self._settle)

    def _settle(self, ref: Ref) -> None:
        """Send the driver the outcome of an adopted ref (a copy: its value was in segments
        named after this process)."""
        from ..wire.payload import encode
        if ref._keep is _FROM_DRIVER:
            return
        frames: list[Any] = [None]
        state = ref._state
        if state is RefState.READY:
            value = ref._value if ref._payload is None else ref._payload.decode()
            payload = encode(value, owner_pid=self.driver_pid, own=False)
            body = (ref._id, ref._name, "value", payload.to_wire(frames))
        else:
            import cloudpickle
            kind = "cancelled" if state is RefState.CANCELLED else "error"
            body = (ref._id, ref._name, kind, cloudpickle.dumps(ref._error))
        self._request("adopt", body, frames)

    # -- the runtime's API --------------------------------------------------------------------
    def submit_task(self, body: Any, options: dict[str, Any], args: tuple,
                    kwargs: dict) -> list[ClientRef]:
        name = options.get("name") or body.name
        desc, frames, deps, _, _ = self._encode_args(args, kwargs, lambda: f"{name}.remote()",
                                                     body.fn)
        key = self._fn_keys.get(id(body))
        blob = None
        if key is None:
            key = self._fn_keys[id(body)] = f"{self.wid}:{next(self._keys)}"
            blob = body.blob
        refs = [self._new_ref(name) for _ in range(options["num_returns"])]
        self._request("task", ([r._id for r in refs], name, key, blob,
                               {k: options[k] for k in _TASK_OPTIONS}, desc, deps), frames)
        return refs

    def submit_call(self, actor: Any, method: str, nret: int, args: tuple, kwargs: dict,
                    fn: Any = None) -> list[ClientRef]:
        name = f"{actor.label}.{method}"
        made: list[Any] = []
        desc, frames, deps, payload, travels = self._encode_args(
            args, kwargs, lambda: f"{name}.remote()", fn, made)
        refs = [self._new_ref(name) for _ in range(nret)]
        ids = [r._id for r in refs]
        route = actor.route
        direct = _config.DIRECT_CALLS and not travels and route.direct_ok
        if direct:
            if route.link is None or route.link.dead is not None:
                self._open_link(actor)
            self._local.update(ids)     # from now on: exported before it goes, it is adopted

        def send(go_direct: bool, _keep: tuple = (args, kwargs)) -> None:
            # (_keep: refs and handles in the arguments stay alive while the call waits here)
            if go_direct:
                for seg in made:        # made for this call: ours until it is answered
                    seg.take_ownership()
                route.link.send(ids[0], refs, (self._msg.CALL, ids[0], method, desc[0], {},
                                               nret, ids), frames, payload)
            else:
                self._local.difference_update(ids)  # the driver makes them (or adopted them)
                self._request("call", (actor.aid, method, ids, desc, deps), frames)

        route.submit(direct, send, refs[0])
        return refs

    # -- direct calls (procs/links.py) --------------------------------------------------------
    def _open_link(self, actor: RemoteActor) -> None:
        """Make the rings of a link to ``actor`` and have the driver hand its end over (an
        internal call, queued behind this process's earlier calls to it)."""
        route = actor.route
        link = Link(actor.label, self._on_link_message)
        route.link = link
        self.links[link.id] = link
        desc, frames, deps, _, _ = self._encode_args(
            (link.ends(), link.id, self.pid, self.wid), {}, lambda: "link", None)
        answer = self._new_ref(f"{actor.label}.link")

        def linked(ref: Ref) -> None:
            if ref._state is not RefState.READY:
                link.dead = f"the link to {actor.label} failed: {ref._error}"
                if type(ref._error) is RuntimeError:    # refused, not dead: for good
                    route.direct_ok = False
                return
            link.pid, link.wid, route.concurrent = ref._outcome()
            try:
                fd = os.pidfd_open(link.pid)
            except OSError:             # already gone: its calls fail
                link.die(f"the actor {actor.label} (pid {link.pid}) died")
                return
            self.watches.append((fd, link))
            self._wake()                # the control thread watches its pid from now on

        def send(go_direct: bool) -> None:
            answer.add_done_callback(linked)    # before the route's own: it sees the link up
            self._request("call", (actor.aid, LINK, [answer._id], desc, deps), frames)

        route.submit(False, send, answer)

    def _on_link_message(self, link: Link, header: tuple, frames: list[Any]) -> None:
        """A reply on a link (on the thread that reads its result ring)."""
        kind, tid = header[0], header[2]
        refs = link.answered(tid)
        if refs is None:
            return
        if kind == self._msg.RESULT:
            if header[3] is None:       # the driver has it (a value with refs or handles)
                self._local.difference_update(r._id for r in refs)
                return
            from ..wire.payload import from_wire
            for ref, desc in zip(refs, header[3], strict=True):
                ref._finish_payload(from_wire(desc, frames, self.table, owner=True))
        elif kind == self._msg.ERROR:
            from ..wire.errors import task_error
            err = task_error(header[3])
            for ref in refs:
                ref._finish_error(err)
        else:
            err = TaskCancelledError(f"{refs[0].key} was cancelled")
            for ref in refs:
                ref._finish_cancelled(err)

    def doorbell(self, link_id: str) -> None:
        """On the control thread: an actor wrote a link's result ring while nobody read it."""
        link = self.links.get(link_id)
        if link is not None:
            link.lane.doorbell()

    def cancel_direct(self, link: Link, ref: Ref) -> None:
        """Cancel a direct call: its actor's control thread hears of it (as from the driver)."""
        if link.wid is None:
            return
        import zmq

        from ..wire import protocol
        with self._ctl_lock:
            sock = self._ctl.get(link.wid)
            if sock is None:
                sock = self._ctl[link.wid] = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(protocol.endpoint(self.dir, link.wid + ".ctl"))
            protocol.send(sock, (self._msg.CANCEL, ref._id))

    def create_actor(self, body: Any, options: dict[str, Any], args: tuple,
                     kwargs: dict) -> RemoteActor:
        """Ask the driver to start the actor; waits for its answer, so a taken name or too
        few CPUs raise here, as on the driver."""
        label = body.name
        desc, frames, deps, _, _ = self._encode_args(args, kwargs, lambda: f"{label}.remote()",
                                                     body.cls.__init__)
        answer = self._new_ref(f"{label}.remote")
        methods = dict(body.methods)
        self._request("actor", (answer._id, label, options.get("name"), body.blob, methods,
                                {k: options[k] for k in _ACTOR_OPTIONS}, desc, deps), frames)
        aid = self._answer(answer)
        return self.actor_record(aid, options.get("name"), label, body.name, methods)

    def _answer(self, ref: ClientRef) -> Any:
        from ..refs.deadline import Deadline
        if not ref._wait(Deadline(_ANSWER_S)):
            raise TimeoutError(f"the driver did not answer {ref.key} within {_ANSWER_S:g} s")
        return ref._outcome()

    def actor_record(self, aid: str, name: str | None, label: str, cls_name: str,
                     methods: dict[str, int]) -> RemoteActor:
        """This process's record of actor ``aid`` (one per actor while handles to it live)."""
        record = self._actors.get(aid)
        if record is None:
            record = self._actors[aid] = RemoteActor(aid, name, label,
                                                     RemoteBody(cls_name, methods))
        return record

    def borrow(self, rid: str, name: str) -> ClientRef:
        """A ref that arrived inside a value: this process now holds it (the driver hears of it
        before anything else this process sends, so before it answers the call it got it in)."""
        ref = self._refs.get(rid)
        if ref is None:
            ref = self._new_ref(name, rid)
            self._queue(("borrow", rid, 0))
        return ref

    def hold_actor(self, record: RemoteActor) -> None:
        """The first handle to ``record`` in this process: it holds the actor for us."""
        self._queue(("handle", record.aid, 1))

    def release_actor_soon(self, record: RemoteActor) -> None:
        """The last handle to ``record`` here died (from a GC callback: only queue)."""
        self._queue(("handle", record.aid, -1))

    def put(self, value: Any) -> ClientRef:
        from ..wire.payload import encode
        if isinstance(value, Ref):
            raise TypeError("hr.put() of a ref is not allowed; pass the ref itself instead")
        payload = encode(value, owner_pid=self.driver_pid, own=False, table=self.table)
        ref = self._new_ref("put")
        frames: list[Any] = [None]
        self._request("put", (ref._id, payload.to_wire(frames)), frames)
        ref._finish_payload(payload)
        return ref

    def get_actor(self, name: str) -> RemoteActor:
        """The record of the live actor named ``name`` (ValueError if there is none)."""
        ref = self._new_ref("get_actor")
        self._request("lookup", (ref._id, name))
        aid, label, cls_name, methods = self._answer(ref)
        return self.actor_record(aid, name, label, cls_name, methods)

    def kill_actor(self, record: RemoteActor, no_restart: bool = True) -> None:
        self._request("kill", (record.aid, no_restart))

    def cancel(self, ref: Ref, *, force: bool = False) -> None:
        self._request("cancel", (ref._id, force))

    def blocked(self) -> _Blocked:
        """While a thread waits in get: the driver may lend our CPU slot to another task
        (``refs.waiting`` calls it around every wait that blocks, in task workers)."""
        return _Blocked(self)

    # -- what comes back ---------------------------------------------------------------------
    def on_reply(self, header: tuple, frames: list[Any]) -> None:
        """On the control thread: the driver finished ref ``header[1]``."""
        _, rid, ok, body = header
        ref = self._refs.get(rid)
        if ref is None:
            return                  # dropped meanwhile: its release is on the way
        self._local.discard(rid)    # a direct call's value that came through the driver
        ref._keep = _FROM_DRIVER    # (it needs no adopting: the driver has it)
        if ok:
            from ..wire.payload import from_wire
            ref._finish_payload(from_wire(body, frames, self.table, owner=False))
        else:
            try:
                import cloudpickle
                err = cloudpickle.loads(body)
            except Exception as exc:   # noqa: BLE001 - an error class this process lacks
                err = RuntimeError(f"{ref.key} failed, and its error could not be rebuilt "
                                   f"here: {exc}")
            if isinstance(err, TaskCancelledError):
                ref._finish_cancelled(err)
            else:
                ref._finish_error(err)

    def fail_all(self, err: BaseException) -> None:
        """The driver is gone: no reply will come."""
        self.closed = True
        for ref in list(self._refs.values()):
            ref._finish_error(err)


class _Blocked:
    """``with client.blocked():`` tells the driver when this process starts and stops waiting
    (counted: several threads of an actor may wait at once)."""

    __slots__ = ("_client",)

    def __init__(self, client: WorkerClient) -> None:
        self._client = client

    def __enter__(self) -> None:
        c = self._client
        with c._blocked_lock:
            c._blocked += 1
            if c._blocked == 1:
                c._request("blocked", (True,))

    def __exit__(self, *exc: object) -> None:
        c = self._client
        with c._blocked_lock:
            c._blocked -= 1
            if c._blocked == 0:
                c._request("blocked", (False,))

