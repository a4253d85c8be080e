"""The driver's live records: child processes, tasks and actors (mutable, with __slots__).

Each record keeps its state in one enum field that only ``advance`` changes, checked against
the record's transition table (``_NEXT``); ``core.Runtime`` calls it under its lock.
"""

from __future__ import annotations

import subprocess
import threading
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any

from ...exceptions import InternalError

if TYPE_CHECKING:
    import zmq

    from ..wire.payload import Payload
    from ..refs.ref import ObjectRef, Ref


class ProcState(Enum):
    STARTING = "starting"      # spawned, READY not yet received
    READY = "ready"
    DEAD = "dead"

    __hash__ = object.__hash__     # Enum hashes its name in Python: µs per table lookup


class TaskState(Enum):
    WAITING = "waiting"        # some argument refs are still pending
    QUEUED = "queued"          # arguments ready, not sent yet
    SENT = "sent"              # in a child's inbox or running
    DONE = "done"

    __hash__ = object.__hash__     # Enum hashes its name in Python: µs per table lookup


class ActorState(Enum):
    STARTING = "starting"      # process spawned (or restarting); calls queue up
    ALIVE = "alive"
    DEAD = "dead"

    __hash__ = object.__hash__     # Enum hashes its name in Python: µs per table lookup


_NEXT: dict[Enum, frozenset[Enum]] = {
    ProcState.STARTING: frozenset({ProcState.READY, ProcState.DEAD}),
    ProcState.READY: frozenset({ProcState.DEAD}),
    TaskState.WAITING: frozenset({TaskState.QUEUED, TaskState.DONE}),
    TaskState.QUEUED: frozenset({TaskState.SENT, TaskState.DONE}),
    TaskState.SENT: frozenset({TaskState.DONE, TaskState.QUEUED}),     # QUEUED: a retry
    ActorState.STARTING: frozenset({ActorState.ALIVE, ActorState.DEAD}),
    ActorState.ALIVE: frozenset({ActorState.STARTING, ActorState.DEAD}),  # STARTING: a restart
}


def advance(record: Proc | TaskRecord | ActorRecord, new: Enum) -> None:
    """Move ``record`` to state ``new`` (staying in its state is allowed: a repeated report).

    Raises:
        InternalError: the record's table does not allow it (a bug in headrace).
    """
    old = record.state
    if new is not old and new not in _NEXT.get(old, frozenset()):
        raise InternalError(f"{type(record).__name__} {getattr(record, 'label', '')}"
                            f"{getattr(record, 'name', '')}: {old.name} -> {new.name} is not "
                            "allowed; this is a bug in headrace; please report it")
    record.state = new


class Proc:
    """One child process: a pooled task worker or an actor's home."""

    __slots__ = ("wid", "kind", "label", "popen", "pid", "pidfd", "push", "ctl", "send_lock",
                 "state", "fn_ids", "task", "actor", "forced_cancel", "lane", "pending_lane",
                 "lane_asked", "client_sock", "client_lock", "borrowed", "held", "lent", "adopted",
                 "remote", "endpoints", "bye")

    def __init__(self, wid: str, kind: str, label: str, popen: subprocess.Popen) -> None:
        self.wid = wid
        self.kind = kind                      # "task" | "actor"
        self.label = label
        self.popen = popen
        self.pid = popen.pid
        self.pidfd: int | None = None
        self.push: zmq.Socket | None = None
        self.ctl: zmq.Socket | None = None
        self.send_lock = threading.Lock()
        self.state = ProcState.STARTING
        self.fn_ids: set[str] = set()         # functions this worker already has
        self.task: TaskRecord | None = None   # the task a pooled worker runs
        self.actor: ActorRecord | None = None
        self.forced_cancel: str | None = None  # task id killed by hr.cancel(force=True)
        self.lane: Any = None                 # an actor's shm call/result rings (DriverLane)
        self.pending_lane: Any = None         # rings made, the actor not attached yet
        self.lane_asked = False               # its lane is being made (or was)
        # the API used inside the child (procs/requests.py)
        self.client_sock: Any = None          # PUSH to its client socket, made on first reply
        self.client_lock = threading.Lock()
        self.borrowed: dict[str, Any] = {}    # ref id -> the ref, while the child holds it
        self.held: dict[str, int] = {}        # actor id -> handles the child holds (one count)
        self.lent = 0.0                       # CPU slots lent while it blocks in get
        self.remote = getattr(popen, "worker", None)   # the Dask worker it runs on, if remote
        self.endpoints: dict[str, str] = {}   # a remote child's sockets (from its READY)
        self.bye = False                      # its last message (BYE) arrived: all before it did
        self.adopted: set[str] = set()        # its direct refs we hold, value to come


class TaskRecord:
    """One ``.remote()`` call (function task, actor call, or the marker that ends an actor)."""

    __slots__ = ("tid", "name", "refs", "fn", "method", "args", "deps", "waiting", "num_cpus",
                 "state", "retries_left", "actor", "proc", "is_exit", "keep")

    def __init__(self, tid: str, name: str, refs: list[ObjectRef], args: Payload | None,
                 deps: dict[str, Ref], *, fn: Any = None, method: str | None = None,
                 num_cpus: float = 0, retries_left: int = 0, actor: ActorRecord | None = None,
                 is_exit: bool = False) -> None:
        self.tid = tid
        self.name = name
        self.refs = refs
        self.fn = fn                          # a FunctionBody for function tasks
        self.method = method
        self.args = args
        self.deps = deps
        self.waiting = 0
        self.num_cpus = num_cpus
        self.state = TaskState.WAITING
        self.retries_left = retries_left
        self.actor = actor
        self.proc: Proc | None = None
        self.is_exit = is_exit
        self.keep: Any = None                 # actors of handles in its arguments, held


class ActorRecord:
    """One actor: its class, constructor arguments, process, and ordered call queue."""

    __slots__ = ("aid", "name", "label", "body", "init_args", "init_deps", "max_concurrency",
                 "num_cpus", "restarts_left", "task_retries", "state", "proc", "queue",
                 "inflight", "error", "init_error", "handles", "killed", "exiting", "keep",
                 "placement", "__weakref__")

    def __init__(self, aid: str, name: str | None, label: str, body: Any, init_args: Payload,
                 init_deps: dict[str, Ref], *, max_concurrency: int, num_cpus: float,
                 max_restarts: int, max_task_retries: int = 0) -> None:
        self.aid = aid
        self.name = name                      # the user's name (named actors) or None
        self.label = label                    # the class name, for messages and log prefixes
        self.body = body
        self.init_args = init_args
        self.init_deps = init_deps
        self.max_concurrency = max_concurrency
        self.num_cpus = num_cpus
        self.restarts_left = max_restarts
        self.task_retries = max_task_retries  # retries of each call cut off by a restart
        self.state = ActorState.STARTING
        self.proc: Proc | None = None
        self.queue: deque[TaskRecord] = deque()        # submitted, not yet sent; in order
        self.inflight: dict[str, TaskRecord] = {}      # sent to the process, not answered
        self.error: BaseException | None = None        # why it is dead
        self.init_error: BaseException | None = None
        self.handles = 0
        self.killed = False
        self.exiting = False                  # its last handle went: it ends after its queue
        self.keep: Any = None                 # actors of handles in its __init__ arguments
        #: on a cluster: (host, resources) asked for, and then the Dask worker it runs on
        self.placement: tuple[str | None, dict | None, str | None] | None = None
