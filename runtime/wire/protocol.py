"""Control-plane messages between the driver and its children (pyzmq over ``ipc://``; children
on other hosts use ``tcp://`` with CURVE, see runtime/hosts).

Every message is a multipart zmq message: frame 0 is a pickled tuple whose first item is a
``Msg``; inline payload buffers follow as frames 1.. and payload descriptors point at them.

  driver                                                        child (task worker or actor)
  PUSH ipc://<dir>/<wid>      ── INIT_ACTOR, TASK, CALL, EXIT ─▶  PULL (main thread runs them)
  PUSH ipc://<dir>/<wid>.ctl  ── CANCEL ──────────────────────▶  PULL (control thread)
  PUSH ipc://<dir>/<wid>.client ── REPLY ─────────────────────▶  PULL (control thread)
  PULL ipc://<dir>/driver     ◀─ READY, RESULT, ERROR, CANCELLED, INIT_FAILED, REQUEST ── PUSH
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import zmq


class Msg:
    """Message kinds: plain ints, not an IntEnum (an enum member pickles as a reference to its
    class, about 1 µs more to write and 1 µs more to read, in every message)."""

    # driver -> child
    INIT_ACTOR = 1      # (kind, cls_blob, args_desc, deps, max_concurrency, label)
    TASK = 2            # (kind, task_id, fn_id, fn_blob | None, args_desc, deps, nret, label)
    CALL = 3            # (kind, task_id, method, args_desc, deps, nret)
    EXIT = 4            # (kind,)
    CANCEL = 5          # (kind, task_id)             on the control socket
    LANE = 6            # (kind, ends_blob)           attach shm rings (in the background)
    SWITCH = 7          # (kind,)                     the last message on zmq: read the ring
    REPLY = 8           # (kind, ref_id, ok, desc | error blob)   on the client socket
    # child -> driver
    READY = 10          # (kind, wid, pid)
    RESULT = 11         # (kind, wid, task_id, [desc, ...])
    ERROR = 12          # (kind, wid, task_id, ErrorInfo)
    CANCELLED = 13      # (kind, wid, task_id)
    INIT_FAILED = 14    # (kind, wid, ErrorInfo)
    ACTOR_READY = 15    # (kind, wid)
    DOORBELL = 16       # (kind, wid)          an actor wrote its result ring while nobody read
    LANE_READY = 17     # (kind, wid)          the rings are attached: switch calls to them
    REQUEST = 18        # (kind, wid, op, body)  the API used inside the child (procs/client.py)
    # scale-out (runtime/hosts): processes on other hosts, over CURVE-authenticated TCP
    EXITED = 19         # (kind, wid, returncode)  from the Dask worker that started the child
    PING = 21           # (kind,)                  on the control socket: the driver is alive
    OUTPUT = 22         # (kind, wid, bytes)       a remote child's output lines, from its worker
    BYE = 23            # (kind, wid)              a child's last message before a clean exit


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A remote exception as it travels: enough to rebuild a TaskError on the driver."""

    function_name: str
    type_name: str
    message: str
    traceback_str: str
    pid: int
    type_blob: bytes | None       # cloudpickled exception class, if it pickles
    exc_blob: bytes | None        # cloudpickled exception instance, if it pickles


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a child needs to start: handed over in an environment variable."""

    wid: str
    kind: str                     # "task" | "actor"
    session_dir: str
    driver_pid: int
    sys_path: tuple[str, ...]
    label: str
    logging_level: int
    log_to_driver: bool
    num_cpus: int = 1             # the driver's CPU slots (what .remote() checks against)
    remote: RemoteSpec | None = None   # set for a child on another host than the driver


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """How a child on another host reaches the driver (runtime/hosts)."""

    bind_ip: str                  # this host's address (the Dask worker's)
    driver: str                   # tcp://ip:port of the driver's inbox
    keys: tuple[bytes, bytes, bytes, bytes]   # CURVE: server public/secret, client public/secret
    parent_pid: int               # the Dask worker that started it: its death ends the child
    host: str                     # the host's name in errors (the Dask worker's address)


def endpoint(session_dir: str, name: str) -> str:
    return f"ipc://{session_dir}/{name}"


def send(sock: zmq.Socket, header: tuple[Any, ...], frames: list[Any] | None = None) -> None:
    """Send ``header`` pickled as frame 0, then the inline buffers in ``frames[1:]``."""
    head = pickle.dumps(header, protocol=5)
    if not frames or len(frames) == 1:
        sock.send(head)
        return
    frames[0] = head
    sock.send_multipart(frames)


def recv(sock: zmq.Socket, flags: int = 0) -> tuple[tuple[Any, ...], list[Any]]:
    """Receive one message: its header and all its frames (frames[0] is the header's)."""
    frames = sock.recv_multipart(flags, copy=False)
    return pickle.loads(frames[0].buffer), frames
