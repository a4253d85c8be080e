"""The driver's side of the API used inside workers (``procs/client.py``): one mixin of Runtime.

In: ``Msg.REQUEST``s from a child (on its lane or zmq, in the order it sent them), under the
runtime's lock. Out: tasks, actor calls, actors and values made for the child with the ids it
chose, and a ``Msg.REPLY`` on the child's client socket when each of its refs is final.
Invariants:
- A child's refs are held in ``proc.borrowed`` until it releases them or dies; its handles to an
  actor count as one handle of that actor (``proc.held``) until it drops its last one or dies.
- Handles inside arguments or a result hold their actors (``ActorHold``) while the bytes travel:
  until the call is answered, or as long as the result's ref lives.
- A task worker that blocks in ``get`` lends its CPU slot (``proc.lent``) until it goes on; the
  pool grows by a worker when none is idle for the tasks that wait, so nested tasks finish.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any


from ...exceptions import ActorDiedError, ObjectLostError
from ..refs.ref import ObjectRef, Ref, RefState
from ..wire import protocol
from .links import LINK
from ..wire.payload import encode, from_wire
from ..wire.protocol import Msg
from .records import ActorRecord, ActorState, Proc, ProcState, TaskRecord


logger = logging.getLogger(__name__)


class ShippedFunction:
    """A function a worker submitted: the driver only forwards its pickled bytes."""

    __slots__ = ("fn_id", "name", "blob")

    def __init__(self, fn_id: str, name: str, blob: bytes) -> None:
        self.fn_id, self.name, self.blob = fn_id, name, blob


class ShippedClass:
    """An actor class a worker created an actor of: its pickled bytes and method table."""

    __slots__ = ("name", "methods", "blob", "cls")

    def __init__(self, name: str, methods: dict[str, int], blob: bytes | None) -> None:
        self.name, self.methods, self.blob, self.cls = name, methods, blob, None


class ActorHold:
    """Holds an actor like a handle does (its last holder gone, an unnamed actor ends)."""

    __slots__ = ("__weakref__",)

    def __init__(self, record: ActorRecord, rt: Any) -> None:
        record.handles += 1
        weakref.finalize(self, drop_hold, weakref.ref(record), weakref.ref(rt), 1)


def drop_hold(record_ref: weakref.ref, rt_ref: weakref.ref, n: int) -> None:
    record, rt = record_ref(), rt_ref()
    if record is None:
        return
    record.handles -= n
    if record.handles <= 0 and rt is not None:
        rt.release_actor_soon(record)       # GC may run this anywhere: never lock here


class WorkerRequests:
    """Mixed into ``Runtime``: what a child asks for, and the replies it gets."""

    # attributes of Runtime used here: lock, actors, named, procs, table, pid, dir, ctx, idle,
    # ready, free_cpus, closed, _shipped; methods _submit_locked, _start_actor, _dispatch,
    # _spawn, cancel, kill_actor, release_actor_soon

    def _on_request(self, proc: Proc, header: tuple, frames: list, out: list) -> None:
        _, _, op, body = header
        getattr(self, "_req_" + op)(proc, body, frames, out)

    def _holds(self, proc: Proc, aids: list[str], rids: list[str] = ()) -> list[Any]:
        """What a value from ``proc`` needs alive while it travels: the actors of its handles
        and the refs inside it (which any process may now ask for by id)."""
        keep: list[Any] = [ActorHold(self.actors[aid], self) for aid in aids
                           if aid in self.actors]
        for rid in rids:
            ref = proc.borrowed.get(rid)
            if ref is not None:
                keep.append(ref)
                self.known[rid] = ref
        return keep

    def ref_by_id(self, rid: str, name: str) -> Ref:
        """The ref a value names (unpickling it here): alive, held by what carried it."""
        ref = self.known.get(rid)
        if ref is None:
            ref = ObjectRef(rid, name, self)
            ref._finish_error(ObjectLostError(
                f"{name}-{rid} arrived inside a value after every holder of it let it go"))
        return ref

    def _args(self, proc: Proc, wire: tuple, dep_ids: list[str], frames: list,
              ) -> tuple[Any, dict[str, Ref], list[Any], str | None]:
        """A child's call arguments: payload, dependencies, holds; or why they are unusable."""
        desc, aids, rids = wire
        payload = from_wire(desc, frames, self.table, owner=True)
        deps = {rid: proc.borrowed.get(rid) for rid in dep_ids}
        gone = [rid for rid, ref in deps.items() if ref is None]
        why = f"ref {gone[0]} was already released by its process" if gone else None
        return payload, deps, self._holds(proc, aids, rids), why

    def _own(self, proc: Proc, refs: list[ObjectRef]) -> None:
        for ref in refs:
            proc.borrowed[ref._id] = ref
            ref.add_done_callback(functools.partial(self._reply, proc))

    def _req_task(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        ids, name, key, blob, opts, wire, dep_ids = body
        fn = self._shipped.get(key)
        if fn is None and blob is not None:
            fn = self._shipped[key] = ShippedFunction(key, name, blob)
        payload, deps, holds, why = self._args(proc, wire, dep_ids, frames)
        refs = [ObjectRef(rid, name, self) for rid in ids]
        self._own(proc, refs)
        if fn is None or why is not None:
            err = RuntimeError(f"{name}.remote() from {proc.label} (pid {proc.pid}) failed: "
                               f"{why or 'its function never arrived'}; this is a bug in "
                               "headrace, please report it")
            out.extend(_fail(r, err) for r in refs)
            return
        task = TaskRecord(ids[0], name, refs, payload, deps, fn=fn, num_cpus=opts["num_cpus"],
                          retries_left=opts["max_retries"])
        task.keep = holds
        self._submit_locked(task, refs, out)

    def _req_call(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        aid, method, ids, wire, dep_ids = body
        payload, deps, holds, why = self._args(proc, wire, dep_ids, frames)
        actor = self.actors.get(aid)
        name = f"{actor.label if actor is not None else 'actor'}.{method}"
        # a call meant to go direct may have had its refs adopted before it came here instead
        refs = [proc.borrowed[rid] if rid in proc.adopted else ObjectRef(rid, name, self)
                for rid in ids]
        proc.adopted.difference_update(ids)
        self._own(proc, refs)
        if why is None and method == LINK and actor is not None and (
                proc.remote is not None or actor.placement is not None):
            why = "no direct link between hosts: the calls go through the driver"
        if why is None and method == LINK and actor is not None and actor.task_retries:
            why = "no direct link to an actor with max_task_retries: the calls go through " \
                  "the driver, which retries them"
        if actor is None or why is not None:
            err = ActorDiedError(f"the actor {name} was called from {proc.label} (pid "
                                 f"{proc.pid}), but it is no longer alive.\n\nCreate a new "
                                 "actor.") if actor is None else RuntimeError(why)
            out.extend(_fail(r, err) for r in refs)
            return
        task = TaskRecord(ids[0], name, refs, payload, deps, method=method, actor=actor,
                          retries_left=actor.task_retries)
        task.keep = holds
        self._submit_locked(task, refs, out)

    def _req_actor(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        answer, label, name, blob, methods, opts, wire, dep_ids = body
        payload, deps, holds, why = self._args(proc, wire, dep_ids, frames)
        ref = ObjectRef(answer, f"{label}.remote", self)
        self._own(proc, [ref])
        existing = self.named.get(name) if opts.get("get_if_exists") else None
        if existing is not None:            # get_or_create: that one, its arguments kept
            out.append(lambda: ref._finish_value(existing.aid))
            return
        cls = ShippedClass(label, methods, blob)
        actor = ActorRecord(answer, name, label, cls, payload, deps,
                            max_concurrency=opts["max_concurrency"], num_cpus=opts["num_cpus"],
                            max_restarts=opts["max_restarts"],
                            max_task_retries=opts.get("max_task_retries", 0))
        actor.keep = holds
        try:
            if why is not None:
                raise RuntimeError(why)
            self._start_actor(actor, out)
        except (ValueError, RuntimeError) as exc:       # a taken name, too few CPUs
            out.append(_fail(ref, exc))
            return
        out.append(lambda: ref._finish_value(answer))

    def _req_put(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        rid, desc = body
        ref = ObjectRef(rid, "put", self)
        ref._finish_payload(from_wire(desc, frames, self.table, owner=True))
        proc.borrowed[rid] = ref

    def _req_batch(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        """Releases, borrows and handle counts, in the order the child made them."""
        for kind, key, delta in body[0]:
            if kind == "ref":
                proc.borrowed.pop(key, None)
            elif kind == "borrow":
                ref = self.known.get(key)
                if ref is None:             # cannot happen while the carrier holds it
                    logger.error("%s borrowed ref %s, which nobody holds", proc.label, key)
                    continue
                self._own(proc, [ref])
            else:
                self._handle_count(proc, key, delta)

    def _req_adopt(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        """A direct ref of the child leaves it (procs/links.py): we hold it from now on; its
        value comes now or in a second ``adopt`` once the child has it."""
        rid, name, kind, blob = body
        ref = proc.borrowed.get(rid)
        if ref is None:
            ref = proc.borrowed[rid] = ObjectRef(rid, name, self)
            self.known[rid] = ref
        if kind == "pending":
            if not ref.done():
                proc.adopted.add(rid)
            return
        proc.adopted.discard(rid)
        if kind == "value":
            payload = from_wire(blob, frames, self.table, owner=True)
            out.append(lambda: ref._finish_payload(payload))
        else:
            import cloudpickle
            err = cloudpickle.loads(blob)
            out.append(lambda: ref._finish_cancelled(err) if kind == "cancelled"
                       else ref._finish_error(err))

    def _req_give(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        """An actor answers a direct call with handles or refs inside: we hold them for the
        caller (as for a reply through us) and send it the value."""
        caller_wid, ids, name, descs, aids, rids = body
        caller = self.procs.get(caller_wid)
        payloads = [from_wire(d, frames, self.table, owner=True) for d in descs]
        if caller is None or caller.state is ProcState.DEAD:
            return                          # the caller died meanwhile: nobody wants them
        holds = self._holds(proc, aids, rids)
        refs = [caller.borrowed[rid] if rid in caller.adopted else ObjectRef(rid, name, self)
                for rid in ids]
        caller.adopted.difference_update(ids)
        for ref, payload in zip(refs, payloads, strict=True):
            ref._keep = holds
            ref._finish_payload(payload)
        self._own(caller, refs)

    def _handle_count(self, proc: Proc, aid: str, delta: int) -> None:
        record = self.actors.get(aid)
        held = proc.held.get(aid, 0) + delta
        if held > 0:
            proc.held[aid] = held
        else:
            proc.held.pop(aid, None)
        if record is not None:
            record.handles += delta
            if delta < 0 and record.handles <= 0:
                self.release_actor_soon(record)

    def _req_kill(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        aid, no_restart = body
        actor = self.actors.get(aid)
        if actor is not None:
            self.kill_actor(actor, no_restart=no_restart)

    def _req_cancel(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        rid, force = body
        ref = proc.borrowed.get(rid)
        if ref is not None:
            self.cancel(ref, force=force)

    def _req_lookup(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        rid, name = body
        ref = ObjectRef(rid, "get_actor", self)
        self._own(proc, [ref])
        actor = self.named.get(name)
        if actor is None or actor.state is ActorState.DEAD:
            out.append(_fail(ref, ValueError(
                f"no live actor is named {name!r}; create one with "
                f"Cls.options(name={name!r}).remote()")))
        else:
            value = (actor.aid, actor.label, actor.body.name, dict(actor.body.methods))
            out.append(lambda: ref._finish_value(value))

    def _req_blocked(self, proc: Proc, body: tuple, frames: list, out: list) -> None:
        task = proc.task
        if proc.kind != "task" or task is None:
            return
        if body[0] and not proc.lent:
            proc.lent = task.num_cpus
            self.free_cpus += task.num_cpus
            starting = sum(1 for p in self.procs.values()
                           if p.kind == "task" and p.state is ProcState.STARTING)
            if self.ready and not self.idle and starting < len(self.ready) and not self.closed:
                self._spawn("task", "worker")       # the pool grows: nested tasks must run
            self._dispatch(out)
        elif not body[0] and proc.lent:
            self.free_cpus -= proc.lent
            proc.lent = 0

    # -- replies ------------------------------------------------------------------------------
    def _reply(self, proc: Proc, ref: Ref) -> None:
        """A done callback: send the child the outcome of its ref ``ref``."""
        if proc.state is ProcState.DEAD or ref._id not in proc.borrowed:
            return
        frames: list[Any] = [None]
        if ref._state is RefState.READY:
            payload = ref._payload
            if payload is None:         # finished with a plain value (lookups, answers)
                payload = encode(ref._value, owner_pid=self.pid, own=True, table=self.table)
            header = (Msg.REPLY, ref._id, True,
                      payload.to_wire(frames, inline=proc.remote is not None))
        else:
            header = (Msg.REPLY, ref._id, False, _error_blob(ref._error))
        with proc.client_lock:
            sock = proc.client_sock
            if sock is None:
                if proc.state is ProcState.DEAD:
                    return
                sock = proc.client_sock = self.child_socket(proc, proc.wid + ".client")
            protocol.send(sock, header, frames)

    def _forget_child(self, proc: Proc) -> None:
        """``proc`` died: drop what it held (refs, handles, a lent slot); its direct refs we
        hold for others will never get their values."""
        for rid in proc.adopted:
            ref = proc.borrowed.get(rid)
            if ref is not None:
                ref._finish_error(ObjectLostError(
                    f"{ref.key} was made by {proc.label} (pid {proc.pid}), which died before "
                    "it had the value"))
        proc.adopted.clear()
        proc.borrowed.clear()
        for aid, n in proc.held.items():
            record = self.actors.get(aid)
            if record is not None:
                record.handles -= n
                if record.handles <= 0:
                    self.release_actor_soon(record)
        proc.held.clear()
        if proc.lent:
            self.free_cpus -= proc.lent
            proc.lent = 0
        with proc.client_lock:
            if proc.client_sock is not None:
                proc.client_sock.close(linger=0)
                proc.client_sock = None


def _fail(ref: Ref, err: BaseException) -> Any:
    return lambda: ref._finish_error(err)


def _error_blob(err: BaseException | None) -> bytes:
    import cloudpickle
    try:
        return cloudpickle.dumps(err)
    except Exception:       # noqa: BLE001 - an error that does not pickle: its text then
        return cloudpickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))

