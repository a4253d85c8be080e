"""The zygote: one process that has made the worker's imports and forks workers on request.

In: spawn requests from the driver (a worker's id and spec, the write end of its output pipe)
on a Unix seqpacket socket. Out: each child's pid, and later its exit status (the zygote reaps
its children: the driver is not their parent).
Invariants:
- The zygote runs one Python thread (numpy's BLAS may start native ones; it stops them around
  a fork itself), so a fork copies a consistent process. A child starts from the imports
  already made: a worker is up in milliseconds instead of ~0.3 s of interpreter start and
  imports (a pool that grows under nested tasks, actors beyond the spares).
- A child gets the driver's environment and working directory as they are at its spawn (they
  travel with the request); settings read once at import (BLAS thread counts) are the zygote's.
- A request the zygote cannot serve (a failed fork) is answered "no pid": the driver starts
  that worker as a process of its own; the zygote goes on.
- A child is a worker as a started one would be: its own output pipe, its spec in the
  environment, Python's default signal handlers, fresh random state (``random`` reseeds itself
  at a fork; numpy's global generator is reseeded here).
- The zygote ends with the driver: its socket reads EOF once the driver's process is gone (not
  PR_SET_PDEATHSIG, which fires when the *thread* that started it ends); workers watch the
  driver themselves. If it dies while the driver lives, the driver kills its children (their
  exit codes are lost with it) and starts workers as plain processes from then on.

  driver ──(wid, spec; out fd)──▶ zygote ──fork──▶ worker (READY to the driver, as any worker)
         ◀──("pid", wid, pid) · ("exit", pid, code)──┘
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

#: How long a spawn waits for the zygote to answer with the child's pid.
_SPAWN_S = 5.0
#: After a child's pidfd says it exited, how long its exit code may take to come.
_CODE_S = 2.0
#: The biggest request (a worker's spec, the environment).
_REQUEST_BYTES = 1 << 20


# -- the zygote process -------------------------------------------------------------------
def serve(fd: int) -> None:
    """The zygote's main loop (``python -c "...; serve(fd)"``, ``fd``: its end of the socket)."""
    sock = socket.socket(fileno=fd)
    try:        # the driver's end of the socket may live on in a process it forked: watch it too
        driver: int | None = os.pidfd_open(os.getppid())
    except OSError:
        driver = None
    from . import worker  # noqa: F401 - the imports every child starts from
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)      # wakes the poll through wake_w
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the driver's to handle
    try:
        sock.sendall(pickle.dumps(("ready", os.getpid())))
    except OSError:                         # the driver is gone already
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    if driver is not None:
        poller.register(driver, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if driver is not None and driver in events:
            return                          # the driver is gone: nobody to report to
        _reap(sock, wake_r)
        try:    # NOTE: not socket.recv_fds: Python 3.11's ignores its flags (it would block)
            msg, ancdata, flags, _ = sock.recvmsg(_REQUEST_BYTES, socket.CMSG_LEN(4),
                                                  socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        fds = [int.from_bytes(data[:4], sys.byteorder) for level, kind, data in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
        if not msg:                         # the driver is gone: nobody to report to
            return
        wid, pid = None, None
        try:
            wid, spec, env, cwd = pickle.loads(msg)
            if not flags & socket.MSG_TRUNC:
                pid = os.fork()
                if pid == 0:
                    _child(sock, (wake_r, wake_w, *(() if driver is None else (driver,))),
                           spec, env, cwd, fds[0] if fds else None)
        except Exception:                   # noqa: BLE001 - this one starts elsewhere
            import traceback
            traceback.print_exc()
        finally:
            for f in fds:
                os.close(f)
        sock.sendall(pickle.dumps(("pid", wid, pid)))


def _reap(sock: socket.socket, wake_r: int) -> None:
    try:
        while os.read(wake_r, 4096):
            pass
    except BlockingIOError:
        pass
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.sendall(pickle.dumps(("exit", pid, os.waitstatus_to_exitcode(status))))


def _child(sock: socket.socket, own: tuple[int, ...], spec: str, env: dict[str, str],
           cwd: str, out: int | None) -> None:
    """In the forked child: become the worker, then end (never returns)."""
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        for fd in own:                      # the zygote's wake pipe and driver pidfd
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if out is None:
            out = os.open(os.devnull, os.O_WRONLY)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()             # as a started process would: its own random state
        from .worker import PARENT_ENV, SPEC_ENV, main
        os.environ.clear()
        os.environ.update(env)
        os.environ[SPEC_ENV] = spec
        os.environ[PARENT_ENV] = str(os.getppid())
        try:
            os.chdir(cwd)
        except OSError:                     # gone meanwhile: the worker runs where it is
            pass
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:                   # noqa: BLE001 - say why, then end
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# -- the driver's side --------------------------------------------------------------------
class Zygote:
    """The driver's handle on its zygote: ``spawn`` forks a worker there."""

    def __init__(self, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c",
                 f"from headrace.runtime.procs.zygote import serve; serve({theirs.fileno()})"],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.sock = mine
        self.ready = threading.Event()
        self.gone = False
        self._lock = threading.Lock()
        self._pending: dict[str, list[Any]] = {}       # wid -> [event, pid]
        self._children: dict[int, ForkedProcess] = {}
        self._codes: dict[int, int] = {}                # exits reported before their spawn returned
        self._orphans: set[int] = set()                 # forked after their spawn gave up: killed
        self._reader = threading.Thread(target=self._read, daemon=True, name="headrace-zygote")
        self._reader.start()

    def spawn(self, wid: str, spec: str, out_fd: int | None) -> ForkedProcess | None:
        """Fork worker ``wid``; None if the zygote cannot now (the caller starts a process)."""
        if not self.ready.is_set() or self.gone:
            return None
        slot: list[Any] = [threading.Event(), None]
        with self._lock:
            self._pending[wid] = slot
        request = pickle.dumps((wid, spec, dict(os.environ), os.getcwd()))
        ancdata = [] if out_fd is None else \
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, out_fd.to_bytes(4, sys.byteorder))]
        try:    # never waits (the runtime lock may be held): a full queue means a stuck zygote
            self.sock.sendmsg([request], ancdata, socket.MSG_DONTWAIT)
        except OSError:
            with self._lock:
                self._pending.pop(wid, None)
            return None
        if not slot[0].wait(_SPAWN_S) or slot[1] is None:
            with self._lock:        # late: its pid, when it comes, is killed (see _read)
                self._pending.pop(wid, None)
            return None
        pid = slot[1]
        with self._lock:
            proc = ForkedProcess(pid, self)
            code = self._codes.pop(pid, None)
            if code is None and not self.gone:
                self._children[pid] = proc
        if code is not None:
            proc.ended(code)
        elif self.gone:                     # the zygote ended as we got the pid: as _lost does
            proc.kill()
            proc.ended(-int(signal.SIGKILL))
        return proc

    def _read(self) -> None:
        try:
            while True:
                msg = self.sock.recv(65536)
                if not msg:
                    break
                kind, *rest = pickle.loads(msg)
                if kind == "ready":
                    self.ready.set()
                elif kind == "pid":
                    wid, pid = rest
                    with self._lock:
                        slot = self._pending.pop(wid, None)
                        if slot is None and pid is not None:
                            self._orphans.add(pid)
                    if slot is not None:
                        slot[1] = pid
                        slot[0].set()
                    elif pid is not None:   # its spawn gave up (and started it elsewhere)
                        _kill_pid(pid)
                elif kind == "exit":
                    pid, code = rest
                    with self._lock:
                        proc = self._children.pop(pid, None)
                        if proc is None and pid not in self._orphans:
                            self._codes[pid] = code
                        self._orphans.discard(pid)
                    if proc is not None:
                        proc.ended(code)
        except OSError:
            pass
        finally:
            self._lost()

    def _lost(self) -> None:
        """The zygote ended: its children's codes are lost with it; end them ourselves (so
        they are what they are reported as: killed) and report each as killed."""
        self.gone = True
        with self._lock:
            children, self._children = list(self._children.values()), {}
            pending, self._pending = list(self._pending.values()), {}
        for slot in pending:
            slot[0].set()
        for proc in children:
            proc.kill()
            proc.ended(-int(signal.SIGKILL))

    def close(self) -> None:
        """After the workers are gone: end the zygote."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(2.0)
        self._reader.join(2.0)
        self.sock.close()


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)        # (the zygote has not reaped it: the pid is its own)
    except ProcessLookupError:
        pass


class ForkedProcess:
    """A worker forked by the zygote, as ``subprocess.Popen`` looks to the runtime: its exit is
    seen on its pidfd, its code comes from the zygote."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.args = f"zygote child {pid}"
        self._zygote = zygote
        self._code = threading.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:                     # gone already (its code is on its way), or no fd
            self._pidfd = None

    def ended(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._code.set()

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0.0):
            self._code.wait(_CODE_S)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        if timeout is None:             # as Popen: until it ends (its code comes, or the
            while not self._code.wait(0.5) and not self._zygote.gone:   # zygote's end gives one)
                pass
        elif not self._code.wait(max(timeout, 0.05)):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode          # type: ignore[return-value]

    def _exited(self, timeout: float | None) -> bool:
        if self._code.is_set():
            return True
        if self._pidfd is None:             # no pidfd (gone already, or none to be had)
            return self._code.wait(timeout)
        poller = select.poll()              # (not select(): pidfds may be numbered >= 1024)
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def send_signal(self, sig: int) -> None:
        if self._code.is_set():
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:                           # not reaped yet (no exit code): still its pid
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def __del__(self) -> None:
        if self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
