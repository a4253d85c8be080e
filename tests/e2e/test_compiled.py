"""Compiled DAGs end to end: real actor processes, shm channels, refs resolved by hr.get."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import types

import numpy as np
import pytest

import headrace as hr
from headrace import InputNode, MultiOutputNode
from headrace.exceptions import (ActorDiedError, ChannelClosedError, GetTimeoutError,
                                 TaskError)


@hr.remote
class Stage:
    def __init__(self, k=1):
        self.k = k
        self.calls = 0

    def add(self, x, *more, scale=1):
        self.calls += 1
        return (x + sum(more)) * scale + self.k

    def echo(self, x):
        return x

    def boom(self, x):
        if x == 3:
            raise ValueError(f"three at {self.k}")
        return x

    def nap(self, x, delay_s=0.0):
        time.sleep(delay_s)
        return x

    def lock(self, x):
        return threading.Lock()

    def count(self):
        return self.calls

    def pid(self):
        return os.getpid()


@hr.remote
def times10(x):
    return x * 10


@hr.remote
def plus(x, y):
    return x + y


@pytest.fixture(scope="module")
def stages():
    return [Stage.remote(k) for k in (1, 2, 3)]


def test_a_chain_of_three_actors_matches_the_uncompiled_oracle(stages) -> None:
    a, b, c = stages
    with InputNode() as inp:
        dag = c.add.bind(b.add.bind(a.add.bind(inp)))
    with dag.experimental_compile() as compiled:
        assert hr.get(compiled.execute(1), timeout=30) == 7
        refs = [compiled.execute(i) for i in range(200)]
        assert hr.get(refs, timeout=30) == [i + 6 for i in range(200)]
    assert hr.get(dag.execute(1), timeout=30) == 7


def test_fan_out_fan_in_function_nodes_kwargs_and_multi_output(stages) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        x = times10.bind(inp.x)
        left = a.add.bind(x, scale=inp.scale)
        right = b.add.bind(x, inp.y)
        joined = plus.bind(left, right)
        dag = MultiOutputNode([joined, x, inp.y, b.echo.bind([left, {"r": right}])])
    with dag.compile(max_inflight_executions=3) as compiled:
        for i in range(20):
            refs = compiled.execute(x=i, y=1, scale=2)
            expect = hr.get(dag.execute(x=i, y=1, scale=2), timeout=30)
            assert hr.get(refs, timeout=30) == expect
            assert expect[0] == (i * 10 * 2 + 1) + (i * 10 + 1 + 2)


def test_ten_thousand_executions_keep_their_order(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile() as compiled:
        refs = [compiled.execute(i) for i in range(10_000)]    # no get: never a capacity error
        assert hr.get(refs[::-1], timeout=60) == list(range(10_000))[::-1]
        assert compiled.stats()["completed"] == 10_000


def test_get_mixes_compiled_refs_of_two_dags_and_object_refs(stages) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        d1 = a.add.bind(inp)
    with InputNode() as inp:
        d2 = b.echo.bind(inp)
    with d1.experimental_compile() as c1, d2.experimental_compile() as c2:
        mixed = [c1.execute(1), a.add.remote(10), c2.execute("x"), hr.put(5), c1.execute(2)]
        assert hr.get(mixed, timeout=30) == [2, 11, "x", 5, 3]
        ready, not_ready = hr.wait([c2.execute(1), c1.execute(1)], num_returns=2, timeout=30)
        assert len(ready) == 2 and not not_ready
        assert hr.get(times10.remote(c1.execute(4)), timeout=30) == 50     # a ref as argument
        assert hr.get(c2.execute(c1.execute(5)), timeout=30) == 6          # into execute()


def test_ref_contract_many_reads_retry_after_timeout_and_out_of_order(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.nap.bind(inp, 0.3)
    with dag.experimental_compile() as compiled:
        first, second = compiled.execute(1), compiled.execute(2)
        with pytest.raises(GetTimeoutError, match="1 of 1 ref still pending"):
            hr.get(second, timeout=0.05)
        assert second.status == "pending"
        assert hr.get(second, timeout=30) == 2          # retry works, first is buffered
        assert first.done() and first.result() == 1 and hr.get(first) == 1
        got = []
        t = threading.Thread(target=lambda: got.append(hr.get(first, timeout=5)))
        t.start()
        t.join(5)
        assert got == [1]


def test_callbacks_futures_and_await_without_anyone_in_get(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile() as compiled:
        done = threading.Event()
        ref = compiled.execute(7)
        ref.add_done_callback(lambda r: done.set())
        assert done.wait(10)
        assert compiled.execute(8).future().result(timeout=10) == 8

        async def main():
            fut = await compiled.execute_async(9)
            return await fut, await compiled.execute(10)
        assert asyncio.run(asyncio.wait_for(main(), 10)) == (9, 10)


def test_execute_async_of_a_multi_output_dag_gives_one_future_per_output(stages) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        dag = MultiOutputNode([a.echo.bind(inp), b.echo.bind(inp)])
    with dag.experimental_compile() as compiled:
        async def main():
            futs = await compiled.execute_async(5)
            assert isinstance(futs, list) and len(futs) == 2
            each = [await f for f in futs]
            return each, await asyncio.gather(*await compiled.execute_async(6))
        assert asyncio.run(asyncio.wait_for(main(), 10)) == ([5, 5], [6, 6])


def test_execute_async_never_blocks_the_event_loop_when_the_pipeline_is_full(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.nap.bind(inp, 0.3)
    with dag.experimental_compile(max_inflight_executions=1) as compiled:
        async def main():
            gaps, last = [], time.monotonic()

            async def tick():
                nonlocal last
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
            ticker = asyncio.create_task(tick())
            futs = [await compiled.execute_async(i) for i in range(4)]   # 3 wait for room
            values = [await f for f in futs]
            ticker.cancel()
            return values, max(gaps)
        values, worst_gap = asyncio.run(asyncio.wait_for(main(), 30))
        assert values == [0, 1, 2, 3]
        assert worst_gap < 0.25          # a blocked loop would stall for a whole 0.3 s nap


def test_a_user_exception_is_that_executions_value_and_reaches_dependent_outputs(stages) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        x = a.boom.bind(inp)
        dag = MultiOutputNode([b.add.bind(x), inp, b.echo.bind(5)])
    with dag.experimental_compile() as compiled:
        assert hr.get(compiled.execute(1), timeout=30) == [3, 1, 5]
        refs = compiled.execute(3)
        with pytest.raises(ValueError, match="three at 1") as info:
            hr.get(refs, timeout=30)
        err = info.value
        assert isinstance(err, TaskError) and err.function_name == "Stage.boom"
        assert err.site.startswith(__file__) and "raise ValueError" in err.traceback_str
        assert hr.get(refs[1:], timeout=30) == [3, 5]       # the other outputs still arrive
        assert hr.get(compiled.execute(4), timeout=30) == [6, 4, 5]


def test_unpicklable_output_and_bad_input_are_errors_of_that_execution(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = MultiOutputNode([a.lock.bind(inp.v), a.echo.bind(inp.v)])
    with dag.experimental_compile() as compiled:
        with pytest.raises(TaskError, match="could not serialize the value of Stage.lock"):
            hr.get(compiled.execute(v=1), timeout=30)
        with pytest.raises(ValueError, match=r"must be called with kwarg `v` .* got \['w'\]"):
            compiled.execute(w=1)           # refused before it is submitted (Ray's rule)
        with pytest.raises(TypeError, match=r"^keyword argument 'v' of execute\(\) cannot be "
                                            "serialized: lock"):
            compiled.execute(v=threading.Lock())
        assert hr.get(compiled.execute(v=2)[1], timeout=30) == 2
    with InputNode() as inp:
        dag = a.echo.bind(inp[0].missing)
    with dag.experimental_compile() as compiled:      # a bad part of a good argument
        with pytest.raises(TaskError, match=r"has no attribute 'missing'"):
            hr.get(compiled.execute(1), timeout=30)
        assert hr.get(compiled.execute(types.SimpleNamespace(missing=3)), timeout=30) == 3


def test_teardown_is_idempotent_fast_and_later_calls_raise(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.nap.bind(inp, 0.5)
    compiled = dag.experimental_compile()
    pending = compiled.execute(1)
    t0 = time.monotonic()
    compiled.teardown()
    compiled.teardown()
    assert time.monotonic() - t0 < 0.1
    with pytest.raises(ChannelClosedError, match="torn down"):
        hr.get(pending, timeout=5)
    with pytest.raises(ChannelClosedError, match="torn down"):
        compiled.execute(2)
    assert hr.get(a.echo.remote(3), timeout=30) == 3        # the actor still serves calls


def test_actor_serves_ordinary_calls_while_in_two_dags(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        d1 = a.add.bind(inp)
    with InputNode() as inp:
        d2 = a.echo.bind(inp)
    with d1.experimental_compile() as c1, d2.experimental_compile() as c2:
        refs = [(c1.execute(i), c2.execute(i), a.echo.remote(i)) for i in range(50)]
        assert hr.get([r for trio in refs for r in trio], timeout=30) == \
            [v for i in range(50) for v in (i + 1, i, i)]


def test_large_numpy_values_travel_zero_copy(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile(buffer_size_bytes=1 << 16) as compiled:
        for n in (10, 1 << 20, 8 << 20):
            arr = np.arange(n, dtype=np.int64)
            out = hr.get(compiled.execute(arr), timeout=30)
            assert np.array_equal(out, arr)


def test_values_passed_on_unchanged_stay_right_while_results_are_held(stages) -> None:
    """A 3-actor chain of echoes forwards each input (it is not copied at each hop): results
    held across many executions keep their own values, in slots and in spills, and Arrow
    tables too."""
    import pyarrow as pa

    from headrace.channels.shm import _ORIGINS
    a, b, c = stages
    with InputNode() as inp:
        dag = c.echo.bind(b.echo.bind(a.echo.bind(inp)))
    with dag.experimental_compile(buffer_size_bytes=1 << 20) as compiled:
        held = []
        for k in range(40):
            n = (1 << 15) if k % 2 else (1 << 18)         # 256 KiB in slots, 2 MiB spilled
            arr = np.full(n, k, dtype=np.int64)
            out = hr.get(compiled.execute(arr), timeout=30)
            assert out.shape == (n,) and out[0] == out[-1] == k
            if k % 3 == 0:
                held.append((k, out))
            if k == 1:      # it lives where the driver wrote it: no hop copied it
                assert _ORIGINS[id(out)].ring.name == \
                    compiled._channels[compiled.plan.input_channel].name
        assert all(o[0] == o[-1] == k for k, o in held)
        table = pa.table({"i": np.arange(50_000), "s": [f"r{i}" for i in range(50_000)]})
        assert hr.get(compiled.execute(table), timeout=30).equals(table)


@pytest.mark.deadline_s(60)
def test_sigkill_mid_execution_fails_pending_refs_within_a_second() -> None:
    victim, after = Stage.remote(1), Stage.remote(2)
    pid = hr.get(victim.pid.remote(), timeout=30)
    with InputNode() as inp:
        dag = after.add.bind(victim.nap.bind(inp, 5.0))
    compiled = dag.experimental_compile()
    refs = [compiled.execute(i) for i in range(3)]
    time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError, match="died"):
        hr.get(refs, timeout=10)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ActorDiedError):
        compiled.execute(5)
    compiled.teardown()
    assert hr.get(after.add.remote(1), timeout=30) == 3


@pytest.mark.deadline_s(60)
def test_os_exit_in_a_function_node_fails_the_execution() -> None:
    @hr.remote
    def die(x):
        os._exit(3)
    with InputNode() as inp:
        dag = die.bind(inp)
    with dag.experimental_compile() as compiled:
        with pytest.raises(ActorDiedError, match="exit code 3|died"):
            hr.get(compiled.execute(1), timeout=10)


def test_socket_channels_visualize_and_stats(stages, tmp_path) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        dag = b.add.bind(a.add.bind(inp))
    with dag.experimental_compile(channel="socket") as compiled:
        assert hr.get([compiled.execute(i) for i in range(30)], timeout=30) == \
            [i + 3 for i in range(30)]
        base = str(tmp_path / "plan")
        dot = compiled.visualize(base, format="dot")        # Ray's signature
        assert dot.startswith("digraph compiled_dag {") and '"ch1 socket"' in dot
        assert (tmp_path / "plan").read_text() == (tmp_path / "plan.dot").read_text() == dot
        detailed = compiled.visualize(return_dot=True, channel_details=True)
        assert "ch1 socket" in detailed and "actor:" in detailed and "x 10" in detailed
        assert compiled.visualize(format="ascii") == compiled.plan.as_text()
        with pytest.raises(ValueError, match="format must be one of"):
            compiled.visualize(base, format="gif2")
        if shutil.which("dot"):             # Graphviz here: a real PNG
            compiled.visualize(base)
            assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with pytest.MonkeyPatch.context() as mp:    # no Graphviz: says what to install
            mp.setenv("PATH", str(tmp_path))
            with pytest.raises(ImportError, match=r"needs Graphviz's `dot` program, .* the "
                                                   r"DOT source is in .*other"):
                compiled.visualize(str(tmp_path / "other"), format="svg")
            assert (tmp_path / "other").read_text() == dot
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:                                # Ray's default name, in the current directory
            assert compiled.visualize(format="dot") == dot
            assert (tmp_path / "compiled_graph.dot").read_text() == dot
        finally:
            os.chdir(cwd)
        stats = compiled.stats()
        assert stats["executions"] == stats["completed"] == 30
        assert stats["latency_us"]["samples"] == 30 and stats["latency_us"]["median"] > 0
        assert {c["kind"] for c in stats["channels"].values()} == {"socket"}


def test_pipeline_full_only_when_results_stay_unread(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile(max_inflight_executions=2, max_buffered_results=3,
                                  submit_timeout_s=0.2) as compiled:
        held = [compiled.execute(i) for i in range(6)]      # 2 in flight + 4 read, un-read
        with pytest.raises(hr.PipelineFullError, match="max_buffered_results=3"):
            for i in range(6, 12):
                held.append(compiled.execute(i))
        assert hr.get(held, timeout=30) == list(range(len(held)))    # reading frees room
        assert hr.get(compiled.execute(99), timeout=30) == 99


def test_dropped_refs_release_their_values_and_order_holds(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dag.experimental_compile(max_inflight_executions=4) as compiled:
        for i in range(40):
            compiled.execute(np.full(1 << 15, i))        # dropped at once: read and freed
        last = compiled.execute(np.full(4, 7))
        assert hr.get(last, timeout=30).tolist() == [7, 7, 7, 7]
        assert compiled.stats()["in_flight"] == 0


def test_profile_writes_a_chrome_trace_of_every_step_in_every_process(stages, tmp_path,
                                                                       monkeypatch) -> None:
    a, b, _ = stages
    with InputNode() as inp:
        dag = times10.bind(b.add.bind(a.add.bind(inp)))
    path = tmp_path / "dag.trace.json"
    with dag.experimental_compile(profile=str(path)) as compiled:
        assert compiled.profile_path == str(path)
        assert hr.get([compiled.execute(i) for i in range(5)], timeout=30) == \
            [(i + 3) * 10 for i in range(5)]
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    a_pid, b_pid = hr.get([a.pid.remote(), b.pid.remote()], timeout=30)
    assert names[os.getpid()] == "driver" and names[a_pid] == names[b_pid] == "Stage"
    assert sorted(names.values()) == ["Stage", "Stage", "driver", "times10"]
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 for e in spans)

    def span(pid: int, name: str, execution: int) -> dict:
        found = [e for e in spans if e["pid"] == pid and e["name"] == name
                 and e["args"]["execution"] == execution]
        assert len(found) == 1, (pid, name, execution, found)
        return found[0]
    fn_pid = next(p for p, n in names.items() if n == "times10")
    for e in range(5):              # one clock for all processes: each step follows the last
        submit = span(os.getpid(), "execute", e)
        first = span(a_pid, "Stage.add", e)
        second = span(b_pid, "Stage.add", e)
        last = span(fn_pid, "times10", e)
        read = span(os.getpid(), "read outputs", e)
        assert submit["ts"] <= first["ts"] and first["ts"] + first["dur"] <= second["ts"]
        assert second["ts"] + second["dur"] <= last["ts"]
        assert last["ts"] + last["dur"] <= read["ts"] + read["dur"]
    assert trace["otherData"]["executions"] == 5 and trace["otherData"]["missing"] == []
    assert "process fn:" in trace["otherData"]["plan"]
    assert glob.glob(os.path.join(tempfile.gettempdir(), "headrace-trace-*")) == []

    with pytest.raises(FileNotFoundError, match="the directory .*nowhere does not exist"):
        dag.experimental_compile(profile=str(tmp_path / "nowhere" / "t.json"))
    monkeypatch.chdir(tmp_path)         # profile=True: a new file in the current directory
    with dag.experimental_compile(profile=True) as compiled:
        hr.get(compiled.execute(1), timeout=30)
    assert os.path.dirname(compiled.profile_path) == str(tmp_path)
    assert os.path.basename(compiled.profile_path).startswith("headrace-trace-")
    assert json.loads(open(compiled.profile_path).read())["otherData"]["executions"] == 1


def test_an_input_chain_means_the_same_on_the_driver_in_a_process_and_uncompiled(stages) -> None:
    a, _, _ = stages
    with InputNode() as inp:
        part = inp[0].inner["k"]                    # one chain: item, attribute, item
        dag = MultiOutputNode([part, a.echo.bind(part), a.echo.bind(inp[1])])
    args = (types.SimpleNamespace(inner={"k": 7}), 8)
    assert hr.get(dag.execute(*args), timeout=30) == [7, 7, 8]
    with dag.experimental_compile() as compiled:
        assert hr.get(compiled.execute(*args), timeout=30) == [7, 7, 8]
        refs = compiled.execute(types.SimpleNamespace(inner={}), 9)
        for ref in refs[:2]:                        # the driver's output and the process's
            with pytest.raises(KeyError, match="'k'"):
                hr.get(ref, timeout=30)
        assert hr.get(refs[2], timeout=30) == 9


def test_each_reader_gets_only_the_parts_of_the_input_it_uses(stages) -> None:
    """Ray's "multi-args": actor i binds inp[i]. Each reads a channel of its own that carries
    its part only (a 1 MiB array, not all three); a part that cannot be evaluated is the error
    of that execution's ops that use it, and the others' values are intact."""
    with InputNode() as inp:
        dag = MultiOutputNode([stages[0].echo.bind(inp[0]), stages[1].echo.bind(inp[1]),
                               stages[2].echo.bind(inp[2]["v"]),
                               stages[0].add.bind(inp[1], inp.scale)])
    with dag.experimental_compile() as compiled:
        assert compiled.plan.input_channel == -1 and len(compiled.plan.input_splits) == 3
        for _ in range(20):
            a0, a1, a2 = (np.full(1 << 17, float(i)) for i in range(3))     # 1 MiB each
            out = hr.get(compiled.execute(a0, a1, {"v": a2}, scale=2), timeout=30)
            assert [float(a[0]) for a in out[:3]] == [0.0, 1.0, 2.0] and \
                all(a.nbytes == 1 << 20 for a in out[:3])
            assert float(out[3][0]) == (1.0 + 2) * 1 + 1    # add(x, *more, scale) + k
        for c, _ in compiled.plan.input_splits:                 # 1 MiB slots: no spill
            assert compiled._channels[c].statistics()["spills"] == 0
        refs = compiled.execute(1, 2, {}, scale=1)              # no ["v"]: only its op fails
        assert hr.get(refs[:2] + refs[3:], timeout=30) == [1, 2, (2 + 1) + 1]
        with pytest.raises(TaskError, match="KeyError"):
            hr.get(refs[2], timeout=30)
        assert hr.get(compiled.execute(4, 5, {"v": 6}, scale=1), timeout=30) == [4, 5, 6, 7]


def test_a_ring_of_one_part_carries_the_part_itself(stages) -> None:
    """A reader that uses one part of the input gets that part as itself (an array travels as an
    array, a number in the slot header), next to a reader of two parts (inp[0] and inp[0]["k"]);
    a part that fails is that reader's error alone."""
    with InputNode() as inp:
        dag = MultiOutputNode([stages[0].echo.bind(inp[0]["k"]), stages[1].echo.bind(inp[1])])
    with dag.experimental_compile() as compiled:
        assert sorted(len(ops) for _, ops in compiled.plan.input_splits) == [1, 2]
        big = np.arange(1 << 17)
        for k in range(5):
            out = hr.get(compiled.execute({"k": big + k}, k), timeout=30)
            assert np.array_equal(out[0], big + k) and out[1] == k
        assert hr.get(compiled.execute({"k": None}, "s"), timeout=30) == [None, "s"]
        refs = compiled.execute({}, 2.5)
        with pytest.raises(TaskError, match="KeyError"):
            hr.get(refs[0], timeout=30)
        assert hr.get(refs[1], timeout=30) == 2.5
        assert hr.get(compiled.execute({"k": 1}, [3]), timeout=30) == [1, [3]]
