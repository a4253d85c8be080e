"""The driver's side of scale-out: a Dask distributed cluster whose workers host our processes.

In: ``hr.init(address="tcp://scheduler:8786")`` or ``hr.init(address=client)``. Out: placement
of actors on the cluster's workers, ``RemoteProcess``es standing in for ``subprocess.Popen``,
and deaths reported to the runtime (``lost``) with the host in the reason.
Invariants:
- Processes start through the session's ``HeadracePlugin`` on the chosen worker (never as a
  Dask task); the plugin owns them, and ``close`` ends them all and unregisters it.
- The control plane between hosts is zmq over TCP with CURVE (runtime/hosts/keys.py): the
  driver's TCP inbox admits only the session's key; the runtime's Inbox reads it next to its
  own.
- A remote process is dead when its worker says so (EXITED, with its exit code), when the
  scheduler no longer lists its worker, or when the connection to its control socket drops
  (ZMTP heartbeats, answered by zmq's I/O thread, not by Python, unanswered for
  ``LOST_AFTER_S``): whichever comes first, within 2 s of the death.

  driver ◀─ipc─ local children         driver ◀─tcp+CURVE─ remote children (RESULT, REQUEST, ...)
  (the runtime's Inbox reads both sockets: no thread in between)
  driver ─tcp+CURVE─▶ remote child's inbox/ctl/client     plugin ─tcp+CURVE─▶ driver (EXITED)
"""

from __future__ import annotations

import itertools
import logging
import pickle
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import zmq

from .keys import SessionKeys, admit_only

logger = logging.getLogger(__name__)

#: zmq heartbeats on the driver's connection to each remote child's control socket this often.
HEARTBEAT_S = 0.25
#: The driver pings each remote child this often (the child exits when the pings stop), and
#: checks the scheduler's list of workers as often (a host that dies is also caught sooner by
#: the heartbeats).
TICK_S = 1.0
#: A remote child whose zmq I/O thread answered no ZMTP heartbeat for this long is lost (its
#: Python may hold the GIL for minutes in one C call: the heartbeat does not need it).
LOST_AFTER_S = 1.5
#: How long a remote child may take from launch to READY.
START_TIMEOUT_S = 60.0
#: How long init waits for the Dask scheduler to answer.
CONNECT_TIMEOUT_S = 5.0
_SESSIONS = itertools.count(1)
_CHANNELS = itertools.count(1)


#: Bound on one request to a Dask worker through the scheduler (start, stop, a port, a channel).
CALL_TIMEOUT_S = 15.0


def _bounded(what: str, fn: Callable[..., Any], *args: Any, timeout_s: float = CALL_TIMEOUT_S,
             **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a blocking Dask client call, which takes no timeout of its own)
    on a thread, for at most ``timeout_s``.

    Raises:
        TimeoutError: it did not return in time (``what`` says what was asked).
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True, name="headrace-dask-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the Dask cluster did not answer within {timeout_s:g} s: {what}")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _dask_client(address: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` for ``address`` (or ``address`` itself), and whether it is ours."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise ImportError(
            "hr.init(address=...) runs headrace on a Dask distributed cluster, which needs "
            "Dask: pip install 'headrace[dask]'") from exc
    if isinstance(address, Client):
        return address, False
    if not isinstance(address, str) or not address.startswith(("tcp://", "tls://")):
        raise ValueError(f"address={address!r}: pass a Dask scheduler address such as "
                         "'tcp://scheduler:8786', a distributed.Client, or None for the "
                         "embedded local runtime")
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False), True
    except OSError as exc:
        raise ConnectionError(f"could not reach the Dask scheduler at {address}: {exc}\n\n"
                              "Check that `dask scheduler` runs there and the port is open."
                              ) from exc


def _local_ip_towards(address: str) -> str:
    """This machine's address on the route to ``address`` (what the workers can reach)."""
    url = urlparse(address)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((url.hostname, url.port or 8786))
        return probe.getsockname()[0]
    finally:
        probe.close()


class RemoteProcess:
    """A child on another host, as ``subprocess.Popen`` looks to the runtime."""

    def __init__(self, cluster: DaskCluster, wid: str, worker: str) -> None:
        self.cluster, self.wid, self.worker = cluster, wid, worker
        self.host = urlparse(worker).hostname or worker
        self.pid = 0                        # known once launched
        self.returncode: int | None = None
        self.lost: str | None = None        # why it counts as dead without an exit code
        self.started = time.monotonic()
        self.last_seen = time.monotonic()
        self.ready = False
        self.resources: dict[str, float] = {}
        self._done = threading.Event()
        self._end_lock = threading.Lock()

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"{self.wid} on {self.worker}", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL it; its worker reports the exit (EXITED), as for any death."""
        threading.Thread(target=self.cluster.stop, args=([self], 0.0, False), daemon=True,
                         name=f"headrace-kill-{self.wid}").start()

    def ended(self, code: int | None, lost: str | None = None) -> bool:
        """Record the end (first report wins); True if this was news."""
        with self._end_lock:                # reported by several threads
            if self._done.is_set():
                return False
            self.returncode, self.lost = code, lost
            self._done.set()
            return True

    def death_reason(self) -> tuple[str, int | None, int | None]:
        where = f"on host {self.host} (Dask worker {self.worker})"
        if self.lost is not None:
            return f"{self.lost} {where}", None, None
        code = self.returncode
        if code is not None and code < 0:
            import signal
            return f"killed by signal {signal.Signals(-code).name} ({-code}) {where}", None, -code
        return f"exited with code {code} {where}", code, None


class _Opaque:
    """A pickled endpoint kept as bytes here; it unpickles in the process it is sent to (the
    segment it names lives on that process's host, not on this one)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> tuple:
        return pickle.loads, (self.blob,)


class RemoteChannel:
    """A shm channel that lives on another host (made and owned by our plugin there)."""

    kind = "shm"

    def __init__(self, cluster: DaskCluster, worker: str, key: str, writer: bytes,
                 readers: list[bytes]) -> None:
        self.cluster, self.worker, self.key = cluster, worker, key
        self._writer, self._readers = writer, readers
        self._closed = False

    def writer(self) -> _Opaque:
        return _Opaque(self._writer)

    def reader(self, index: int = 0) -> _Opaque:
        return _Opaque(self._readers[index])

    def _tell(self, reason: str | None) -> None:
        from .plugin import close_channel
        try:
            _bounded(f"close a channel on {self.worker}", self.cluster.client.run,
                     close_channel, self.key, reason, self.cluster.name,
                     workers=[self.worker])
        except Exception:  # noqa: BLE001,S110 - the worker is gone, and the channel with it
            pass

    def mark_broken(self, reason: str) -> None:
        if not self._closed:
            self._tell(str(reason))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tell(None)

    def statistics(self) -> dict[str, Any]:
        return {"host": urlparse(self.worker).hostname, "kind": "shm (remote)"}


class DaskCluster:
    """The session's view of a Dask cluster: its workers, our plugin on them, our processes."""

    def __init__(self, address: Any, lost: Callable[[str, RemoteProcess], None],
                 ping: Callable[[str], None]) -> None:
        self.client, self._own_client = _dask_client(address)
        try:
            self._setup(lost, ping)
        except BaseException:
            self.release()
            if self._own_client:
                self.client.close(timeout=5)
            raise

    def _setup(self, lost: Callable[[str, RemoteProcess], None],
               ping: Callable[[str], None]) -> None:
        self.keys = SessionKeys.new()
        self.ctx = zmq.Context()
        self._auth = admit_only(self.ctx, self.keys)
        self._lost, self._ping = lost, ping
        self.ip = _local_ip_towards(self.client.scheduler.address)
        #: the driver's inbox for children on other hosts; the runtime's Inbox reads it
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, 0)
        self.keys.serve(self.inbox)
        self.driver = f"tcp://{self.ip}:{self.inbox.bind_to_random_port(f'tcp://{self.ip}')}"
        self.name = f"headrace-{socket.gethostname()}-{id(self):x}-{next(_SESSIONS)}"
        from .plugin import HeadracePlugin
        self.client.register_plugin(HeadracePlugin(self.name, self.driver,
                                                   self.keys.as_tuple()), name=self.name)
        self.procs: dict[str, RemoteProcess] = {}
        self.lock = threading.Lock()
        self.closed = False
        self._workers: dict[str, dict] = self._fetch_workers()
        self._fetching = threading.Event()      # a thread is asking for a new list
        self._monitors: list[tuple[str, zmq.Socket]] = []    # made, not yet watched
        self._watch = threading.Thread(target=self._watch_loop, daemon=True,
                                       name="headrace-hosts-watch")
        self._watch.start()

    # -- placement --------------------------------------------------------------------------
    def _fetch_workers(self) -> dict[str, dict]:
        return dict(_bounded("the scheduler's list of workers", self.client.scheduler_info,
                             n_workers=-1)["workers"])

    def place(self, label: str, host: str | None, resources: dict[str, float] | None) -> str:
        """The worker address for a new process: pinned by ``host`` (a worker address, name,
        IP or hostname), limited to workers with ``resources``, else spread (fewest ours)."""
        workers = self._workers
        if not workers:
            raise RuntimeError(f"cannot place {label}: the Dask cluster has no workers.\n\n"
                               "Start `dask worker <scheduler address>` on a host.")
        chosen = list(workers)
        if host is not None:
            chosen = [a for a in chosen if host in (a, workers[a].get("name"),
                                                    workers[a].get("host"),
                                                    urlparse(a).hostname)]
            if not chosen:
                raise ValueError(f"{label}: no Dask worker matches host={host!r}; the workers "
                                 f"are {', '.join(sorted(workers))}")
        if resources:                   # held for the process's life, as Ray's actors do
            free = self._free_resources()
            chosen = [a for a in chosen if all(free[a].get(k, 0) >= v
                                               for k, v in resources.items())]
            if not chosen:
                raise ValueError(f"{label}: no Dask worker has resources={resources!r} free "
                                 f"(free now: {free}).\n\nStart a worker with `dask worker ... "
                                 "--resources ...`, end actors that hold them, or ask for less.")
        with self.lock:
            load = {a: 0 for a in chosen}
            for proc in self.procs.values():
                if proc.worker in load and proc.poll() is None:
                    load[proc.worker] += 1
            least = min(load.values())
            return next(a for a in sorted(chosen) if load[a] == least)

    def _free_resources(self) -> dict[str, dict[str, float]]:
        """Each worker's resources less what our live processes there hold."""
        free = {a: dict(w.get("resources", {})) for a, w in self._workers.items()}
        with self.lock:
            for proc in self.procs.values():
                if proc.poll() is None and proc.worker in free:
                    for k, v in proc.resources.items():
                        free[proc.worker][k] = free[proc.worker].get(k, 0) - v
        return free

    def free_port(self, host: str) -> int:
        """A TCP port free now on ``host`` (this one's address, or a worker's host)."""
        if host == self.ip:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                return probe.getsockname()[1]
        worker = self._worker_on(host)
        from .plugin import free_port
        return _bounded(f"a free port on {worker}", self.client.run, free_port,
                        workers=[worker])[worker]

    def _worker_on(self, host: str) -> str:
        worker = next((a for a in self._workers if urlparse(a).hostname == host), None)
        if worker is None:
            raise RuntimeError(f"no Dask worker runs on host {host} any more")
        return worker

    def make_channel(self, host: str, args: tuple, kwargs: dict) -> RemoteChannel:
        """A shm channel made on ``host`` (by our plugin there), for processes on that host."""
        from .plugin import make_channel
        worker = self._worker_on(host)
        key = f"ch{next(_CHANNELS)}"
        writer, readers = _bounded(f"a shm channel on {worker}", self.client.run,
                                   make_channel, key, args, kwargs, self.name,
                                   workers=[worker])[worker]
        return RemoteChannel(self, worker, key, writer, readers)

    # -- processes --------------------------------------------------------------------------
    def launch(self, wid: str, spec: Any, worker: str,
               resources: dict[str, float] | None = None) -> RemoteProcess:
        """Start the child of ``spec`` on ``worker`` (in the background); returns its stand-in,
        which holds ``resources`` there until it ends."""
        proc = RemoteProcess(self, wid, worker)
        proc.resources = dict(resources or {})
        with self.lock:
            self.procs[wid] = proc
        blob = pickle.dumps(spec)

        def run() -> None:
            from .plugin import launch
            try:
                out = _bounded(f"start {wid} on {worker}", self.client.run, launch, blob,
                               self.name, workers=[worker], timeout_s=START_TIMEOUT_S)
                proc.pid = out[worker]
            except Exception as exc:  # noqa: BLE001 - the start failed: it is a death
                if proc.ended(None, f"could not start ({type(exc).__name__}: {exc})"):
                    self._lost(wid, proc)
        threading.Thread(target=run, daemon=True, name=f"headrace-launch-{wid}").start()
        return proc

    def watch_connection(self, wid: str, sock: zmq.Socket) -> None:
        """Before ``sock`` (the driver's PUSH to a remote child's control socket) connects:
        heartbeat it, and have the watcher hear when it drops."""
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LOST_AFTER_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(LOST_AFTER_S * 1000))
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED)
        with self.lock:
            self._monitors.append((wid, monitor))

    def seen(self, wid: str, ready: bool = False) -> None:
        proc = self.procs.get(wid)
        if proc is not None:
            proc.last_seen = time.monotonic()
            proc.ready = proc.ready or ready

    def exited(self, wid: str, code: int) -> RemoteProcess | None:
        """Its worker reported the exit: the stand-in, if this was news."""
        proc = self.procs.get(wid)
        return proc if proc is not None and proc.ended(code) else None

    def stop(self, procs: list[RemoteProcess], grace_s: float, record: bool = True) -> None:
        """End ``procs`` (SIGKILL after ``grace_s``); ``record`` their exit codes here (else
        their workers report them)."""
        by_worker: dict[str, list[RemoteProcess]] = {}
        for proc in procs:
            by_worker.setdefault(proc.worker, []).append(proc)
        from .plugin import stop
        for worker, group in by_worker.items():
            try:
                codes = _bounded(f"stop processes on {worker}", self.client.run, stop,
                                 [p.wid for p in group], grace_s, self.name,
                                 workers=[worker])[worker]
            except Exception as exc:  # noqa: BLE001 - the worker is gone: so are they
                for p in group if record else ():
                    p.ended(None, f"was lost with its worker ({type(exc).__name__})")
                continue
            for p in group if record else ():
                p.ended(codes.get(p.wid), None if p.wid in codes else "was not running")

    def _watch_loop(self) -> None:
        """Ping our children, hear their connections drop, notice workers that left."""
        from zmq.utils.monitor import recv_monitor_message
        poller = zmq.Poller()
        watched: dict[zmq.Socket, str] = {}
        next_tick = time.monotonic()
        try:
            while not self.closed:
                with self.lock:
                    new, self._monitors = self._monitors, []
                for wid, monitor in new:
                    watched[monitor] = wid
                    poller.register(monitor, zmq.POLLIN)
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                for monitor, _ in poller.poll(wait_ms):
                    event = recv_monitor_message(monitor)["event"]
                    wid = watched[monitor]
                    if event == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(monitor)
                        monitor.close(linger=0)
                        del watched[monitor]
                        continue
                    proc = self.procs.get(wid)
                    if proc is not None and proc.ready and proc.ended(
                            None, f"was lost: its connection dropped (no heartbeat answered "
                                  f"for {LOST_AFTER_S:g} s, or the process ended)"):
                        self._lost(wid, proc)
                if time.monotonic() >= next_tick and not self.closed:
                    next_tick = time.monotonic() + TICK_S
                    self._tick()
        finally:
            for monitor in watched:
                monitor.close(linger=0)

    def _tick(self) -> None:
        """Ping our ready children and check them against the last list of workers; ask the
        scheduler for a new list on a thread of its own. The pings must not wait for the
        scheduler: a child exits after ``_DRIVER_SILENCE_S`` without one (procs/worker.py),
        and a busy scheduler may take seconds to answer."""
        if not self._fetching.is_set():
            self._fetching.set()
            threading.Thread(target=self._refresh_workers, daemon=True,
                             name="headrace-dask-workers").start()
        self._check(self._workers)

    def _refresh_workers(self) -> None:
        try:
            workers = self._fetch_workers()
        except Exception:  # noqa: BLE001 - the scheduler is unreachable: keep the old list
            return
        finally:
            self._fetching.clear()
        self._workers = workers
        if not self.closed:
            self._check(workers, ping=False)        # a worker that left: say so at once

    def _check(self, workers: dict[str, dict], ping: bool = True) -> None:
        now = time.monotonic()
        with self.lock:
            live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            why = None
            if proc.worker not in workers:
                why = "was lost: its Dask worker left the cluster"
            elif not proc.ready and now - proc.started > START_TIMEOUT_S:
                why = f"did not start within {START_TIMEOUT_S:.0f} s"
            if why is not None:
                if proc.ended(None, why):
                    self._lost(proc.wid, proc)
            elif proc.ready and ping:
                self._ping(proc.wid)

    def forget(self, wid: str) -> None:
        with self.lock:
            self.procs.pop(wid, None)

    def close(self) -> None:
        """End every process of the session on every host; unregister the plugin."""
        if self.closed:
            return
        self.closed = True
        with self.lock:
            live = [p for p in self.procs.values() if p.poll() is None]
        try:
            self.stop(live, grace_s=1.0)
            _bounded("unregister the session's plugin", self.client.unregister_worker_plugin,
                     self.name)
        except Exception:  # noqa: BLE001 - a broken cluster must not stop the shutdown
            logger.exception("could not end the session's processes on the Dask cluster")
        self._watch.join(2 * TICK_S)
        if self._own_client:
            self.client.close(timeout=5)

    def release(self) -> None:
        """After ``close`` and once nobody reads ``inbox``: free the sockets and keys' thread."""
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
        if getattr(self, "ctx", None) is not None:
            self.ctx.destroy(linger=0)
