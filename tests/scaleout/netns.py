"""Hosts simulated on one machine: Linux network namespaces joined by veth pairs to a bridge.

In: how many worker hosts. Out: a running Dask cluster, scheduler (and the test's driver) in the
root namespace on the bridge's address, one ``dask worker`` per namespace on its own address.
Invariants: every name carries a random tag, so concurrent runs never collide; ``close()``
kills every process left in a namespace, then deletes the namespaces, the veths and the bridge.
A host may be given a CPU of its own (``cpus``): its worker and everything started from it run
there (the benchmarks' model of separate machines; the tests leave placement to the kernel).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, or the kernel refuses)."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done


def _ns_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in done.stdout.split()]


def pin(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn`` that runs the child (and all it starts) on ``cpu`` alone."""
    return lambda: os.sched_setaffinity(0, {cpu})


@dataclass
class Host:
    name: str           # the namespace
    address: str        # its IP on the bridge
    worker: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        return _ns_pids(self.name)

    def kill_all(self) -> None:
        """The host dies: SIGKILL every process in its namespace."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class NetnsCluster:
    """``n`` worker hosts in namespaces and a Dask scheduler on the bridge in the root one."""

    n: int
    resources: dict[int, str] = field(default_factory=dict)   # host index -> "GPU=1 ..."
    cpus: dict[int, int] = field(default_factory=dict)        # host index -> its one CPU
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: list[Host] = field(default_factory=list)
    scheduler: subprocess.Popen | None = None
    address: str = ""
    bridge_ip: str = ""
    _dir: str = ""

    def start(self, timeout_s: float = 60.0) -> NetnsCluster:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NetnsUnavailable("network namespaces need root and iproute2's `ip`")
        net = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}"
        self.bridge_ip = f"{net}.1"
        self._dir = tempfile.mkdtemp(prefix=f"hr-netns-{self.tag}-")
        br = f"hrbr{self.tag}"
        try:
            _ip("link", "add", br, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_ip}/24", "dev", br)
            _ip("link", "set", br, "up")
            for i in range(1, self.n + 1):
                ns, outer, inner = f"hr{self.tag}-{i}", f"hv{self.tag}{i}", f"he{self.tag}{i}"
                _ip("netns", "add", ns)
                self.hosts.append(Host(ns, f"{net}.{1 + i}"))
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", br)
                _ip("link", "set", outer, "up")
                _ip("addr", "add", f"{net}.{1 + i}/24", "dev", inner, ns=ns)
                _ip("link", "set", inner, "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
            self._start_dask(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _start_dask(self, timeout_s: float) -> None:
        sched_file = os.path.join(self._dir, "scheduler.json")
        env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        log = open(os.path.join(self._dir, "scheduler.log"), "wb")
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", self.bridge_ip,
             "--port", "0", "--no-dashboard", "--scheduler-file", sched_file],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(sched_file) or not os.path.getsize(sched_file):
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise NetnsUnavailable(f"the Dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.05)
        time.sleep(0.05)
        self.address = json.load(open(sched_file))["address"]
        for i, host in enumerate(self.hosts):
            log = open(os.path.join(self._dir, f"{host.name}.log"), "wb")
            host.worker = subprocess.Popen(
                ["ip", "netns", "exec", host.name, sys.executable, "-m",
                 "distributed.cli.dask_worker", self.address, "--host", host.address,
                 "--nthreads", "2", "--no-nanny", "--no-dashboard", "--name", host.name,
                 *(["--resources", self.resources[i]] if i in self.resources else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=pin(self.cpus[i]) if i in self.cpus else None)
        from distributed import Client
        with Client(self.address, timeout=timeout_s) as client:
            client.wait_for_workers(self.n, timeout=timeout_s)

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self._dir, f"{name}.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        for host in self.hosts:
            host.kill_all()
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.kill()
        procs = [h.worker for h in self.hosts if h.worker] + [self.scheduler]
        for p in procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for host in self.hosts:
            _ip("netns", "del", host.name, check=False)
        _ip("link", "del", f"hrbr{self.tag}", check=False)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
