"""Actors on the hosts of a Dask cluster: placement, calls, values, errors, deaths, keys, ends.

Hosts are network namespaces (tests/scaleout/netns.py): real processes, real TCP between them.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import headrace as hr
from headrace.exceptions import ActorDiedError

pytestmark = pytest.mark.deadline_s(90)


@hr.remote
class Where:
    def __init__(self, tag):
        self.tag = tag

    def where(self):
        """This process's pid and the IPv4 addresses of its network namespace."""
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        addrs = sorted(line.split()[3].split("/")[0] for line in out.splitlines())
        return os.getpid(), self.tag, [a for a in addrs if not a.startswith("127.")]

    def echo(self, x):
        return x

    def total(self, arr):
        return int(arr.sum())

    def boom(self):
        raise ValueError(f"bad input on {self.tag}")

    def sleep(self, s):
        time.sleep(s)
        return s

    def say(self, text):
        print(text)

    def busy(self, n):
        return sum(range(n))                    # one C call holding the GIL for seconds

    def hold_gil(self, seconds):
        import ctypes                           # a C call that keeps the GIL, idle
        open("/tmp/dbg.txt","a").write(f"HOLD {time.monotonic():.2f}\n"); ctypes.PyDLL(None).usleep(int(seconds * 1e6))
        return seconds

    def call(self, other, x):
        return hr.get(other.echo.remote(x), timeout=30)

    def put_big(self, n):
        return [hr.put(np.arange(n))]           # a ref made on this host, nested: stays a ref

    def total_of(self, refs):
        return int(sum(hr.get(refs, timeout=30)[0]))


@pytest.fixture
def session(cluster):
    """A runtime on the cluster (kept from test to test; no_leaks shuts it down at the end)."""
    from headrace.runtime.session import current
    if hr.is_initialized() and current().cluster is None:
        hr.shutdown()
    if not hr.is_initialized():
        hr.init(num_cpus=1, address=cluster.address, log_to_driver=False)
    return cluster


def test_actors_spread_over_hosts_and_pin_by_host_and_resources(session) -> None:
    a, b = Where.remote("a"), Where.remote("b")
    (_, _, ips_a), (_, _, ips_b) = hr.get([a.where.remote(), b.where.remote()], timeout=60)
    hosts = {h.address for h in session.hosts}
    assert {ips_a[0], ips_b[0]} == hosts               # one on each host
    second = session.hosts[1]
    for pin in (second.address, second.name):          # an IP, a worker name
        _, _, ips = hr.get(Where.options(host=pin).remote("p").where.remote(), timeout=60)
        assert ips == [second.address]
    holder = Where.options(resources={"SLOT": 1}).remote("r")
    _, _, ips = hr.get(holder.where.remote(), timeout=60)
    assert ips == [session.hosts[0].address]           # only the first host has SLOT
    with pytest.raises(ValueError, match="no Dask worker has resources=.* free"):
        Where.options(resources={"SLOT": 1}).remote("r2")   # the one SLOT is held
    with pytest.raises(ValueError, match="no Dask worker has resources"):
        Where.options(resources={"GPU": 1}).remote("g")
    with pytest.raises(ValueError, match="no Dask worker matches host='nowhere'"):
        Where.options(host="nowhere").remote("n")
    hr.kill(holder)                                     # its SLOT is free again
    deadline = time.monotonic() + 10
    while True:
        try:
            again = Where.options(resources={"SLOT": 1}).remote("r3")
            break
        except ValueError:
            assert time.monotonic() < deadline, "the SLOT of a killed actor was never freed"
            time.sleep(0.05)
    assert hr.get(again.echo.remote(1), timeout=60) == 1


def test_calls_values_and_errors_cross_hosts(session) -> None:
    a = Where.options(host=session.hosts[0].address).remote("a")
    b = Where.options(host=session.hosts[1].address).remote("b")
    big = np.arange(3_000_000, dtype=np.int64)            # 24 MB: shm on one host, TCP here
    assert hr.get(a.total.remote(hr.put(big)), timeout=60) == int(big.sum())
    back = hr.get(b.echo.remote(big), timeout=60)
    assert back.dtype == big.dtype and np.array_equal(back, big)
    refs = [a.echo.remote(i) for i in range(200)]       # in order, none lost or repeated
    assert hr.get(refs, timeout=60) == list(range(200))
    with pytest.raises(ValueError, match="bad input on b") as info:
        hr.get(b.boom.remote(), timeout=30)
    assert isinstance(info.value, hr.TaskError)
    assert hr.get(a.call.remote(b, {"k": [1, 2]}), timeout=60) == {"k": [1, 2]}   # A calls B
    assert hr.get(b.echo.remote("still works"), timeout=30) == "still works"


@hr.remote
def total_here(arr):
    return int(arr.sum())


def test_refs_made_on_one_host_are_read_on_the_driver_and_on_another_host(session) -> None:
    a = Where.options(host=session.hosts[0].address).remote("a")
    b = Where.options(host=session.hosts[1].address).remote("b")
    n = 2_000_000                                          # 16 MB
    [ref] = hr.get(a.put_big.remote(n), timeout=60)
    assert int(hr.get(ref, timeout=60).sum()) == n * (n - 1) // 2
    assert hr.get(total_here.remote(ref), timeout=60) == n * (n - 1) // 2   # a local task
    assert hr.get(b.total_of.remote([ref]), timeout=60) == n * (n - 1) // 2  # the other host


def test_a_killed_remote_process_fails_its_calls_naming_the_host(session) -> None:
    host = session.hosts[1]
    victim = Where.options(host=host.address).remote("v")
    pid, _, _ = hr.get(victim.where.remote(), timeout=60)
    running = victim.sleep.remote(30)
    queued = victim.echo.remote(1)
    time.sleep(0.3)
    start = time.monotonic()
    os.kill(pid, 9)
    for ref in (running, queued):
        with pytest.raises(ActorDiedError, match=host.address):
            hr.get(ref, timeout=10)
    assert time.monotonic() - start < 2.0
    with pytest.raises(ActorDiedError):
        hr.get(victim.echo.remote(2), timeout=10)
    other = Where.options(host=host.address).remote("o")          # the host still works
    assert hr.get(other.echo.remote(3), timeout=60) == 3


def test_an_actor_holding_the_gil_for_seconds_is_not_taken_for_dead(session) -> None:
    a = Where.options(host=session.hosts[0].address).remote("a")
    start = time.monotonic()
    n = 250_000_000
    assert hr.get(a.busy.remote(n), timeout=60) == n * (n - 1) // 2
    assert time.monotonic() - start > 2.0             # longer than the heartbeat timeout


def test_an_actor_holding_the_gil_longer_than_the_driver_silence_bound_lives_on(
        session, monkeypatch) -> None:
    """Its control thread cannot run while the GIL is held: when it can again, it must count
    the driver's pings that queued up meanwhile, not take them for stopped (the driver also
    holds its pings for the hold's first 1.5 s, so that thread's poll slice passes empty)."""
    from headrace.runtime.procs.worker import _DRIVER_SILENCE_S
    from headrace.runtime.session import current
    cluster = current().cluster
    a = Where.options(host=session.hosts[0].address).remote("a")
    assert hr.get(a.echo.remote(1), timeout=60) == 1
    ping, quiet_until = cluster._ping, [0.0]
    monkeypatch.setattr(cluster, "_ping",
                        lambda wid: None if time.monotonic() < quiet_until[0] else ping(wid))
    hold = _DRIVER_SILENCE_S + 1.5
    quiet_until[0] = time.monotonic() + 1.5
    assert hr.get(a.hold_gil.remote(hold), timeout=60) == hold
    assert hr.get(a.echo.remote(2), timeout=60) == 2


def test_a_scheduler_slow_to_answer_does_not_silence_the_drivers_pings(
        session, monkeypatch) -> None:
    """The driver asks the scheduler for its workers every tick; an answer that takes longer
    than a remote child's silence bound must not stop the pings (the child would exit, and be
    reported lost)."""
    from headrace.runtime.procs.worker import _DRIVER_SILENCE_S
    from headrace.runtime.session import current
    cluster = current().cluster
    a = Where.options(host=session.hosts[0].address).remote("a")
    assert hr.get(a.echo.remote(1), timeout=60) == 1
    fetch = cluster._fetch_workers

    def slow_fetch():
        time.sleep(_DRIVER_SILENCE_S + 1.5)
        return fetch()
    monkeypatch.setattr(cluster, "_fetch_workers", slow_fetch)
    time.sleep(_DRIVER_SILENCE_S + 2.5)
    assert hr.get(a.echo.remote(2), timeout=60) == 2

def test_a_rogue_process_without_the_keys_is_refused(session, caplog) -> None:
    from headrace.runtime.session import current
    driver = current().cluster.driver
    a = Where.options(host=session.hosts[0].address).remote("a")
    assert hr.get(a.echo.remote(0), timeout=60) == 0
    rogue = (
        "import pickle, socket, sys, time, zmq\n"
        "host, port = sys.argv[1].rsplit(':', 1)\n"
        "raw = socket.create_connection((host.split('//')[1], int(port)), timeout=5)\n"
        "raw.sendall(b'\\xff' * 64 + (2**31).to_bytes(8, 'big') + b'junk')\n"
        "ctx = zmq.Context(); s = ctx.socket(zmq.PUSH); s.linger = 0\n"
        "pub, sec = zmq.curve_keypair(); s.curve_publickey, s.curve_secretkey = pub, sec\n"
        "s.curve_serverkey = sys.argv[2].encode(); s.connect(sys.argv[1])\n"
        "s.send(pickle.dumps((11, 'w1', 'forged', [])), zmq.NOBLOCK) if s.poll(500, zmq.POLLOUT) else 0\n"
        "p = ctx.socket(zmq.PUSH); p.linger = 0; p.connect(sys.argv[1]); p.poll(300, zmq.POLLOUT)\n"
        "time.sleep(1.0)\n")
    keys = current().cluster.keys
    with caplog.at_level(logging.ERROR, logger="headrace.runtime.hosts.keys"):
        done = subprocess.run(["ip", "netns", "exec", session.hosts[1].name, sys.executable,
                               "-c", rogue, driver, keys.server_public.decode()],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 5
        while not any("refused a CURVE client" in r.message for r in caplog.records) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any("refused a CURVE client" in r.message for r in caplog.records)
    refs = [a.echo.remote(i) for i in range(50)]          # the session goes on, unharmed
    assert hr.get(refs, timeout=60) == list(range(50))


def test_print_in_a_remote_actor_reaches_the_driver_naming_its_host(cluster, capfd) -> None:
    hr.shutdown()
    hr.init(num_cpus=1, address=cluster.address, log_to_driver=True)
    try:
        a = Where.options(host=cluster.hosts[1].address).remote("loud")
        pid, _, _ = hr.get(a.where.remote(), timeout=60)
        hr.get(a.say.remote("hello from afar"), timeout=30)
        want = f"(Where pid={pid}, ip={cluster.hosts[1].address}) hello from afar"
        deadline, seen = time.monotonic() + 5, ""
        while want not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capfd.readouterr().err
        assert want in seen, seen
    finally:
        hr.shutdown()


def test_shutdown_leaves_no_process_on_any_host(cluster) -> None:
    hr.shutdown()
    hr.init(num_cpus=1, address=cluster.address, log_to_driver=False)
    actors = [Where.remote(i) for i in range(4)]
    assert len({tuple(ips) for _, _, ips in hr.get([a.where.remote() for a in actors],
                                                    timeout=60)}) == 2
    hr.shutdown()
    for host in cluster.hosts:           # what is left in each namespace: its Dask worker
        assert host.pids() == [host.worker.pid], (host.name, host.pids())


def test_an_unreachable_scheduler_is_a_connection_error_naming_it() -> None:
    with pytest.raises(ConnectionError, match="tcp://127.0.0.1:9"):
        hr.init(address="tcp://127.0.0.1:9")
    assert not hr.is_initialized()


def test_without_dask_the_error_says_what_to_install(tmp_path) -> None:
    code = ("import sys; sys.modules['distributed'] = None\n"
            "import headrace as hr\n"
            "try:\n    hr.init(address='tcp://127.0.0.1:8786')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert "pip install 'headrace[dask]'" in out.stdout, out.stdout + out.stderr


@hr.remote
class Stage:
    def __init__(self, k):
        self.k = k

    def f(self, x):
        return x + self.k

    def pid(self):
        return os.getpid()


def _three_stages(session):
    h0, h1 = session.hosts[0].address, session.hosts[1].address
    a, b = Stage.options(host=h0).remote(1), Stage.options(host=h0).remote(100)
    c = Stage.options(host=h1).remote(np.int64(10_000))
    with hr.InputNode() as inp:
        dag = c.f.bind(b.f.bind(a.f.bind(inp)))
    return (a, b, c), dag.experimental_compile()


def test_a_compiled_dag_across_hosts_plans_shm_inside_and_sockets_between(session) -> None:
    (a, b, c), compiled = _three_stages(session)
    try:
        text = compiled.plan.as_text()
        h0, h1 = session.hosts[0].address, session.hosts[1].address
        lines = text.splitlines()
        kinds = {line.split()[0]: (line.split()[1], line.split("from host ")[-1]
                                   if "from host" in line else "driver")
                 for line in lines if re.match(r"\s+ch\d+ ", line)}
        assert kinds == {"ch0": ("socket", "driver"), "ch1": ("shm", h0),
                         "ch2": ("socket", h0), "ch3": ("socket", h1)}, text
        assert sum(f"on host {h0}" in line for line in lines) == 2, text
        assert sum(f"on host {h1}" in line for line in lines) == 1, text
        dot = compiled.visualize(return_dot=True)
        assert dot.count(f"on host {h0}") == 2 and dot.count(f"on host {h1}") == 1, dot
        refs = [compiled.execute(i) for i in range(50)]        # pipelined, in order
        assert hr.get(refs, timeout=60) == [i + 10_101 for i in range(50)]
        arr = np.arange(200_000, dtype=np.float64)
        assert np.array_equal(hr.get(compiled.execute(arr), timeout=60), arr + 10_101)
    finally:
        compiled.teardown()
    assert hr.get(a.f.remote(1), timeout=30) == 2       # the actors go on after the teardown


def test_a_stage_killed_on_its_host_breaks_the_dag_naming_the_host(session) -> None:
    (a, b, c), compiled = _three_stages(session)
    try:
        assert hr.get(compiled.execute(0), timeout=60) == 10_101
        pid = hr.get(c.pid.remote(), timeout=30)
        start = time.monotonic()
        os.kill(pid, 9)
        with pytest.raises((ActorDiedError, hr.exceptions.ChannelClosedError),
                           match=session.hosts[1].address):
            hr.get(compiled.execute(1), timeout=10)
        assert time.monotonic() - start < 2.0
    finally:
        compiled.teardown()


def test_zz_a_host_that_vanishes_fails_its_calls_within_2_s(session) -> None:
    """The host's link goes down (no RST, no exit report): the heartbeat notices. Runs last:
    the host's Dask worker loses the scheduler too."""
    host = session.hosts[1]
    victim = Where.options(host=host.address).remote("v")
    assert hr.get(victim.echo.remote(1), timeout=60) == 1
    running = victim.sleep.remote(30)
    time.sleep(0.3)
    dev = f"he{session.tag}2"
    subprocess.run(["ip", "netns", "exec", host.name, "ip", "link", "set", dev, "down"],
                   check=True, timeout=10)
    start = time.monotonic()
    try:
        with pytest.raises(ActorDiedError, match=host.address) as info:
            hr.get(running, timeout=10)
        assert time.monotonic() - start < 2.0
        assert "heartbeat" in str(info.value) or "left the cluster" in str(info.value)
        other = Where.options(host=session.hosts[0].address).remote("o")   # the rest works
        assert hr.get(other.echo.remote(2), timeout=60) == 2
    finally:
        subprocess.run(["ip", "netns", "exec", host.name, "ip", "link", "set", dev, "up"],
                       timeout=10)
