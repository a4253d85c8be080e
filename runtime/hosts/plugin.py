"""Runs inside each Dask worker: starts, watches and ends one session's headrace processes.

In: ``launch``/``stop`` run on a worker through ``Client.run`` (they find the session's
``HeadracePlugin`` among the worker's plugins). Out: child processes running
``headrace.runtime.procs.worker``, and an EXITED message to the driver when one ends.
Invariants: the plugin owns its children: ``stop`` and the plugin's ``teardown`` (when the
driver unregisters it, or the worker closes) end them, SIGKILL after a grace period; a child
also ends on its own within a second when this worker dies (it watches its parent).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlparse

from distributed.diagnostics.plugin import WorkerPlugin

_WORKER_CMD = "from headrace.runtime.procs.worker import main; main()"
SPEC_ENV = "HEADRACE_WORKER_SPEC"


class HeadracePlugin(WorkerPlugin):
    """One session's children on this worker (registered by the driver under ``name``)."""

    def __init__(self, name: str, driver: str, keys: tuple[bytes, bytes, bytes, bytes]) -> None:
        self.name = name
        self.driver = driver
        self.keys = keys

    def setup(self, worker: Any) -> None:
        """On the worker (the plugin arrives pickled; its state is made here)."""
        self.address = worker.address
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.closed = False
        self._ctx: Any = None
        self._sock: Any = None
        self.channels: dict[str, Any] = {}     # shm channels made here for compiled DAGs

    def teardown(self, worker: Any) -> None:
        for key in list(self.channels):
            self.close_channel(key, None)
        self.stop(None, grace_s=1.0)
        self.closed = True
        with self.lock:
            if self._sock is not None:
                self._sock.close(linger=500)
                self._ctx.term()
                self._sock = None

    def launch(self, spec_blob: bytes) -> int:
        """Start a child from the driver's spec (this host's address and our pid filled in)."""
        spec = pickle.loads(spec_blob)
        remote = dataclasses.replace(spec.remote, bind_ip=urlparse(self.address).hostname,
                                     parent_pid=os.getpid(), host=self.address)
        spec = dataclasses.replace(spec, remote=remote)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HEADRACE_DIRECT_CALLS="0")
        env[SPEC_ENV] = base64.b64encode(pickle.dumps(spec)).decode()
        forward = spec.log_to_driver       # its output goes to the driver's stderr
        popen = subprocess.Popen([sys.executable, "-c", _WORKER_CMD], env=env,
                                 stdin=subprocess.DEVNULL, close_fds=True,
                                 stdout=subprocess.PIPE if forward else None,
                                 stderr=subprocess.STDOUT if forward else None)
        with self.lock:
            self.children[spec.wid] = popen
        if forward:
            threading.Thread(target=self._forward, args=(spec.wid, popen.stdout), daemon=True,
                             name=f"headrace-output-{spec.wid}").start()
        threading.Thread(target=self._watch, args=(spec.wid, popen), daemon=True,
                         name=f"headrace-watch-{spec.wid}").start()
        return popen.pid

    def _watch(self, wid: str, popen: subprocess.Popen) -> None:
        code = popen.wait()
        with self.lock:
            self.children.pop(wid, None)
            if self.closed:
                return
            try:
                self._tell((19, wid, code))     # Msg.EXITED
            except Exception:  # noqa: BLE001,S110 - the driver is gone: nobody to tell
                pass

    def _forward(self, wid: str, pipe: Any) -> None:
        """Send the child's output to the driver, a chunk of whole lines at a time."""
        with pipe:
            while chunk := pipe.read1(65536):
                while not chunk.endswith(b"\n"):
                    more = pipe.read1(65536)
                    if not more:
                        break
                    chunk += more
                with self.lock:
                    if self.closed:
                        return
                    try:
                        self._tell((22, wid, chunk))        # Msg.OUTPUT
                    except Exception:  # noqa: BLE001,S110 - the driver is gone
                        pass

    def _tell(self, header: tuple) -> None:
        """Under ``lock``: send ``header`` to the driver's inbox (CURVE client)."""
        import zmq
        if self._sock is None:
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.curve_serverkey = self.keys[0]
            self._sock.curve_publickey = self.keys[2]
            self._sock.curve_secretkey = self.keys[3]
            self._sock.connect(self.driver)
        self._sock.send(pickle.dumps(header, protocol=5))

    def stop(self, wids: list[str] | None, grace_s: float) -> dict[str, int | None]:
        """End children (all when ``wids`` is None): those that do not exit within ``grace_s``
        (the driver sent them EXIT) get SIGKILL. Returns their exit codes."""
        with self.lock:
            chosen = {w: p for w, p in self.children.items() if wids is None or w in wids}
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for wid, popen in chosen.items():
            try:
                codes[wid] = popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    popen.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    codes[wid] = popen.wait(5.0)
                except subprocess.TimeoutExpired:
                    codes[wid] = None
        return codes


    def make_channel(self, key: str, args: tuple, kwargs: dict) -> tuple[bytes, list[bytes]]:
        """A shm channel on this host (for processes here); returns its pickled endpoints."""
        from headrace.channels.shm import ShmChannel
        channel = ShmChannel(*args, **kwargs)
        self.channels[key] = channel
        n = args[0]
        return pickle.dumps(channel.writer()), [pickle.dumps(channel.reader(i)) for i in range(n)]

    def close_channel(self, key: str, reason: str | None) -> None:
        channel = self.channels.pop(key, None) if reason is None else self.channels.get(key)
        if channel is not None:
            channel.close() if reason is None else channel.mark_broken(reason)


def _plugin(dask_worker: Any, name: str) -> HeadracePlugin:
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        raise RuntimeError(f"the headrace plugin {name!r} is not registered on this worker")
    return plugin


def launch(spec_blob: bytes, name: str, dask_worker: Any = None) -> int:
    """``Client.run`` target: start one child on this worker; returns its pid."""
    return _plugin(dask_worker, name).launch(spec_blob)


def stop(wids: list[str] | None, grace_s: float, name: str,
         dask_worker: Any = None) -> dict[str, int | None]:
    """``Client.run`` target: end children of the session on this worker."""
    return _plugin(dask_worker, name).stop(wids, grace_s)


def free_port(dask_worker: Any = None) -> int:
    """``Client.run`` target: a TCP port free now on this worker's host address."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((urlparse(dask_worker.address).hostname, 0))
        return probe.getsockname()[1]


def make_channel(key: str, args: tuple, kwargs: dict, name: str,
                 dask_worker: Any = None) -> tuple[bytes, list[bytes]]:
    """``Client.run`` target: a shm channel on this host, owned by the plugin."""
    return _plugin(dask_worker, name).make_channel(key, args, kwargs)


def close_channel(key: str, reason: str | None, name: str, dask_worker: Any = None) -> None:
    """``Client.run`` target: close (``reason`` None) or break a channel made here."""
    _plugin(dask_worker, name).close_channel(key, reason)
