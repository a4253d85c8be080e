"""The scale-out suite: headrace across hosts of a Dask cluster, next to raw TCP and Dask.

Hosts are network namespaces joined by veth pairs (tests/scaleout/netns.py: root needed); the
driver and the Dask scheduler share the root namespace, the peers run on host 1. Cases:

- ``roundtrip_small``: an int there and back. ``tcp-channel`` (two headrace TCP channels,
  channels/tcp.py, and an echo process on host 1), ``socket-channel`` (the same over the zmq
  socket channel), ``compiled-hop`` (a compiled DAG of one actor on host 1:
  input channel, actor, output channel, relay), ``actor-call`` (``hr.get(a.ping.remote())``,
  the actor on host 1), ``dask-actor`` (a Dask actor on host 1), ``dask-submit``
  (``client.submit(f, workers=[host 1]).result()``) and ``tcp-floor`` (blocking stdlib sockets,
  TCP_NODELAY, ``recv_into``: the floor). ``tcp-signed-floor``: the least a signed channel does
  in Python (one recv, an HMAC-SHA256 checked, one signed back, one ``sendmsg``): how much of the
  gap to the floor is the signing the issue asks for rather than the channel.
  ``tcp-signed-2conn``: the same on one connection per direction, the TCP channels' shape (a
  reply then carries no ACK of the other direction: each direction acknowledges on its own).
- ``oneway_100mb``: a 100 MB array to host 1, acknowledged with an int: ``tcp-channel``,
  ``socket-channel`` and ``tcp-floor`` (``sendall`` of the buffer, ``recv_into`` preallocated memory).

Placement: each host gets a CPU of its own (the driver, the scheduler and the root namespace
on the first, host 1's worker and every peer on the second), as on separate machines. Left to
the kernel, a round trip's cost depends on where it put the two ends: on this kind of VM two
identical floor peers measured 29 and 104 us in the same run (one shared the driver's CPU, the
other was woken across CPUs).
"""

from __future__ import annotations

import os
import pickle
import random
import select
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from . import common
from .common import Record, Target, alternate

SUITE = "scaleout"
BIG_BYTES = 100_000_000
TIMEOUT_S = 60.0
CASES: dict[str, tuple[str, ...]] = {
    "roundtrip_small": ("tcp-channel", "socket-channel", "compiled-hop", "actor-call",
                        "dask-actor", "dask-submit", "tcp-floor", "tcp-signed-floor",
                        "tcp-signed-2conn"),
    "oneway_100mb": ("tcp-channel", "socket-channel", "tcp-floor"),
}

#: The echo peer of ``tcp-floor`` on host 1: 8-byte pings come back; "B" + size: read that
#: many bytes into preallocated memory, answer one byte.
_TCP_ECHO = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("up", flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(8); big = bytearray(int(sys.argv[3])); view = memoryview(big)
def fill(v):
    got = 0
    while got < len(v):
        n = conn.recv_into(v[got:])
        if not n:
            sys.exit(0)
        got += n
while True:
    fill(memoryview(buf))
    if buf[:1] == b"B":
        size = int.from_bytes(buf[1:8], "little")
        fill(view[:size]); conn.sendall(b"k")
    else:
        conn.sendall(buf)
"""

#: The echo peer of ``tcp-signed-floor`` on host 1: a frame is a body and its HMAC-SHA256 (the
#: key on argv); checks it, signs the body back. With argv[4] == "2" (``tcp-signed-2conn``, the
#: TCP channels' shape): frames come on the first connection accepted and go back on a second.
_TCP_SIGNED_ECHO = r"""
import hmac, select, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(2)
key = bytes.fromhex(sys.argv[3])
print("up", flush=True)
inp, _ = srv.accept()
out = srv.accept()[0] if sys.argv[4] == "2" else inp
for c in {inp, out}:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
inp.setblocking(False)
poller = select.poll(); poller.register(inp, select.POLLIN)
buf = bytearray(65536); view = memoryview(buf)
while True:
    poller.poll(-1)
    n = inp.recv_into(buf)
    if not n:
        sys.exit(0)
    body = view[:n - 32]
    if not hmac.compare_digest(hmac.digest(key, body, "sha256"), view[n - 32:n]):
        sys.exit("bad signature")
    out.sendmsg([body, hmac.digest(key, body, "sha256")])
"""

#: The echo peer of ``socket-channel`` on host 1: reads pickled endpoints on stdin, echoes
#: ints and acknowledges arrays with their size.
_CHANNEL_ECHO = r"""
import pickle, sys
inp, out = pickle.load(sys.stdin.buffer)
print("up", flush=True)
while True:
    v = inp.read()
    if v is None:
        break
    out.write(v if isinstance(v, int) else int(v.nbytes))
out.close()
"""


def _netns(host: Any, cpu: int | None, code: str, *args: str,
           stdin: bytes | None = None) -> subprocess.Popen:
    from tests.scaleout.netns import pin
    proc = subprocess.Popen(["ip", "netns", "exec", host.name, sys.executable, "-c", code, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=None if cpu is None else pin(cpu))
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()
    line = proc.stdout.readline()
    if line.strip() != b"up":
        raise RuntimeError(f"the peer on {host.name} did not start")
    return proc


class Impls:
    """Starts every implementation on the cluster, hands out operations, stops them."""

    def __init__(self, cluster: Any, big: np.ndarray) -> None:
        self.cluster, self.big = cluster, big
        self.cpu = cluster.cpus.get(0)            # host 1's CPU
        self.host = cluster.hosts[0]
        self.ops: dict[tuple[str, str], Callable[[], object]] = {}
        self.notes: dict[str, str] = {}
        self.stops: list[Callable[[], None]] = []

    def start(self, names: tuple[str, ...], starter: Callable[[], None]) -> None:
        try:
            starter()
        except ImportError as exc:
            for n in names:
                self.notes[n] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # noqa: BLE001 - a broken impl becomes a row, not a crash
            for n in names:
                self.notes[n] = f"setup failed: {type(exc).__name__}: {exc}"[:200]
        print(f"[{SUITE}] started {', '.join(names)}: "
              f"{self.notes.get(names[0], 'ok')}", flush=True)

    def stop(self) -> None:
        common.stop_all(SUITE, self.stops)

    def tcp_floor(self) -> None:
        port = random.randint(20000, 60000)
        peer = _netns(self.host, self.cpu, _TCP_ECHO, self.host.address, str(port),
                      str(BIG_BYTES))
        self.stops.append(peer.kill)
        sock = socket.create_connection((self.host.address, port), timeout=TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stops.append(sock.close)
        ping, buf = b"p" * 8, bytearray(8)
        view, head = memoryview(buf), b"B" + BIG_BYTES.to_bytes(7, "little")

        def fill(v: memoryview) -> None:
            got = 0
            while got < len(v):
                got += sock.recv_into(v[got:])

        def roundtrip() -> None:
            sock.sendall(ping)
            fill(view)

        def oneway() -> None:
            sock.sendall(head)
            sock.sendall(memoryview(self.big).cast("B"))
            fill(view[:1])
        roundtrip()
        self.ops["roundtrip_small", "tcp-floor"] = roundtrip
        self.ops["oneway_100mb", "tcp-floor"] = oneway

    def tcp_signed_floor(self, conns: int = 1) -> None:
        """``tcp-signed-floor`` (one connection), or ``tcp-signed-2conn`` (one per direction)."""
        import hmac
        port, key = random.randint(20000, 60000), os.urandom(32)
        peer = _netns(self.host, self.cpu, _TCP_SIGNED_ECHO, self.host.address, str(port),
                      key.hex(), str(conns))
        self.stops.append(peer.kill)
        out = socket.create_connection((self.host.address, port), timeout=TIMEOUT_S)
        inp = out if conns == 1 else \
            socket.create_connection((self.host.address, port), timeout=TIMEOUT_S)
        for sock in {out, inp}:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stops.append(sock.close)
        inp.setblocking(False)
        out.setblocking(False)
        poller = select.poll()
        poller.register(inp, select.POLLIN)
        body = bytes(96)             # our frame of an int: 32-byte frame header, 64-byte codec one
        buf = bytearray(65536)
        view = memoryview(buf)

        def roundtrip() -> None:
            out.sendmsg([body, hmac.digest(key, body, "sha256")])
            poller.poll(int(TIMEOUT_S * 1000))
            n = inp.recv_into(buf)
            assert hmac.compare_digest(hmac.digest(key, view[:n - 32], "sha256"), view[n - 32:n])
        roundtrip()
        self.ops["roundtrip_small", "tcp-signed-floor" if conns == 1 else "tcp-signed-2conn"] = \
            roundtrip

    def socket_channel(self, kind: str = "socket-channel") -> None:
        import os
        here, there = self.cluster.bridge_ip, self.host.address
        if kind == "tcp-channel":
            from headrace.channels.tcp import TcpChannel
            to = TcpChannel(1, 8, host=here)
            back = TcpChannel(1, 8, host=there, port=random.randint(20000, 60000))
        else:
            from headrace.channels.socket import HMACAuth, SocketChannel
            to = SocketChannel(1, 8, host=here, auth=HMACAuth(os.urandom(32)))
            back = SocketChannel(1, 8, host=there, port=random.randint(20000, 60000),
                                 auth=HMACAuth(os.urandom(32)))
        peer = _netns(self.host, self.cpu, _CHANNEL_ECHO,
                      stdin=pickle.dumps((to.reader(0), back.writer())))
        w, r = to.writer(), back.reader(0)

        def stop() -> None:
            w.write(None, timeout_s=5)
            peer.wait(5)
            to.close()
            back.close()
        self.stops.append(stop)

        def roundtrip() -> None:
            w.write(1, timeout_s=TIMEOUT_S)
            r.read(timeout_s=TIMEOUT_S)

        def oneway() -> None:
            w.write(self.big, timeout_s=TIMEOUT_S)
            assert r.read(timeout_s=TIMEOUT_S) == BIG_BYTES
        roundtrip()
        self.ops["roundtrip_small", kind] = roundtrip
        self.ops["oneway_100mb", kind] = oneway

    def headrace(self) -> None:
        import headrace as hr
        hr.init(num_cpus=1, address=self.cluster.address, log_to_driver=False)
        self.stops.append(hr.shutdown)
        actor = hr.remote(Echo).options(host=self.host.address).remote()
        assert hr.get(actor.ping.remote(), timeout=TIMEOUT_S) == 1
        with hr.InputNode() as inp:
            dag = actor.echo.bind(inp)
        compiled = dag.experimental_compile()
        self.stops.append(compiled.teardown)
        assert hr.get(compiled.execute(1), timeout=TIMEOUT_S) == 1
        self.ops["roundtrip_small", "actor-call"] = lambda: hr.get(actor.ping.remote(),
                                                                   timeout=TIMEOUT_S)
        self.ops["roundtrip_small", "compiled-hop"] = lambda: hr.get(compiled.execute(1),
                                                                     timeout=TIMEOUT_S)

    def dask(self) -> None:
        from distributed import Client
        client = Client(self.cluster.address)       # (a Dask actor needs the default client)
        self.stops.append(client.close)
        worker = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                      if w.get("name") == self.host.name)
        actor = client.submit(Echo, actor=True, workers=[worker]).result(timeout=TIMEOUT_S)
        assert actor.ping().result() == 1
        self.ops["roundtrip_small", "dask-actor"] = lambda: actor.ping().result()
        self.ops["roundtrip_small", "dask-submit"] = lambda: client.submit(
            one, workers=[worker], pure=False).result(timeout=TIMEOUT_S)


class Echo:
    """The actor of every runtime."""

    def ping(self) -> int:
        return 1

    def echo(self, x: Any) -> Any:
        return x


def one() -> int:
    return 1


def judge(records: list[Record]) -> list[Target]:
    by = {(r.case, r.impl): r for r in records}

    def ratio(case: str, a: str, b: str, gbps: bool = False) -> float | None:
        x, y = by.get((case, a)), by.get((case, b))
        if not x or not y or not x.median_us or not y.median_us:
            return None
        return x.gbps / y.gbps if gbps and x.gbps and y.gbps else x.median_us / y.median_us

    def target(name: str, r: float | None, ok: Callable[[float], bool] | None,
               unit: str = "x") -> Target:
        return Target(name, None if r is None or ok is None else ok(r),
                      "not measured" if r is None else f"{r:.2f}{unit}")
    return [
        target("tcp channel round trip <= 1.3x the raw TCP floor",
               ratio("roundtrip_small", "tcp-channel", "tcp-floor"), lambda r: r <= 1.3),
        target("tcp channel 100 MB GB/s >= 0.7x the raw TCP floor's",
               ratio("oneway_100mb", "tcp-channel", "tcp-floor", gbps=True),
               lambda r: r >= 0.7),
        target("tcp channel round trip vs the signed floor (reference)",
               ratio("roundtrip_small", "tcp-channel", "tcp-signed-floor"), None),
        target("signed floor round trip vs the raw TCP floor (reference)",
               ratio("roundtrip_small", "tcp-signed-floor", "tcp-floor"), None),
        target("tcp channel round trip vs the signed floor with one connection per direction, "
               "its shape (reference)",
               ratio("roundtrip_small", "tcp-channel", "tcp-signed-2conn"), None),
        target("zmq socket channel round trip vs the raw TCP floor (reference)",
               ratio("roundtrip_small", "socket-channel", "tcp-floor"), None),
        target("headrace cross-host actor call <= 0.2x Dask's actor call",
               ratio("roundtrip_small", "actor-call", "dask-actor"), lambda r: r <= 0.2),
        target("compiled hop across hosts vs the raw TCP floor (reference)",
               ratio("roundtrip_small", "compiled-hop", "tcp-floor"), None),
        target("headrace cross-host actor call vs the raw TCP floor (reference)",
               ratio("roundtrip_small", "actor-call", "tcp-floor"), None),
        target("headrace cross-host actor call vs Dask's submit (reference)",
               ratio("roundtrip_small", "actor-call", "dask-submit"), None),
    ]


def run(quick: bool = False) -> list[Record]:
    """Run the suite (needs root for the namespaces); write ``bench/results/scaleout.*``."""
    from tests.scaleout.netns import NetnsCluster, NetnsUnavailable
    rounds, per_round, budget = (4, 100, 0.5) if quick else (10, 300, 1.5)
    host = common.host_facts()
    print(f"[{SUITE}] {host['cpu']}, {host['cores']} cores{', quick' if quick else ''}",
          flush=True)
    records: list[Record] = []
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2
    if pinned:              # the driver's host: the first CPU (threads started later inherit it)
        os.sched_setaffinity(0, cpus[:1])
    try:
        cluster = NetnsCluster(1, cpus={0: cpus[1]} if pinned else {}).start()
    except NetnsUnavailable as exc:
        print(f"[{SUITE}] skipped: {exc}", flush=True)
        os.sched_setaffinity(0, cpus)
        return records
    impls = Impls(cluster, np.full(BIG_BYTES // 8, 1.0))
    try:
        impls.start(("tcp-floor",), impls.tcp_floor)
        impls.start(("tcp-signed-floor",), impls.tcp_signed_floor)
        impls.start(("tcp-signed-2conn",), lambda: impls.tcp_signed_floor(2))
        impls.start(("socket-channel",), impls.socket_channel)
        impls.start(("tcp-channel",), lambda: impls.socket_channel("tcp-channel"))
        impls.start(("actor-call", "compiled-hop"), impls.headrace)
        impls.start(("dask-actor", "dask-submit"), impls.dask)
        for case, names in CASES.items():
            big = case == "oneway_100mb"
            fns = {n: impls.ops[case, n] for n in names if (case, n) in impls.ops}
            samples, errors = alternate(fns, rounds=rounds if not big else 6,
                                        per_round=per_round if not big else 3,
                                        warmup=20 if not big else 1,
                                        round_budget_s=budget * (4 if big else 1))
            records += common.case_records(SUITE, case, names, samples,
                                           {**errors, **impls.notes},
                                           nbytes=BIG_BYTES if big else None)
    finally:
        impls.stop()
        cluster.close()
        os.sched_setaffinity(0, cpus)
    where = (f"Each host on a CPU of its own: driver and scheduler on CPU {cpus[0]}, host 1 "
             f"(its Dask worker, every peer) on CPU {cpus[1]}." if pinned else
             "One CPU: placement left to the kernel.")
    path = common.write_results(SUITE, records, host, judge(records), quick=quick,
                                legend=f"{common.LEGEND} {where}")
    print(f"[{SUITE}] wrote {path}", flush=True)
    return records
