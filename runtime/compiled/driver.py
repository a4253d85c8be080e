"""Compiled DAGs on the driver: open a Plan, submit executions, read outputs, tear down.

In: a DAG's root node and compile options. Out: ``CompiledDAG`` (``execute``, ``execute_async``,
``teardown``, ``visualize``, ``stats``) whose executions return ``CompiledDAGRef``s.
Invariants:
- Executions are numbered from 0; outputs are read in execution order by whichever thread waits
  (one at a time, ``_role``), so a round trip costs no hand-off between threads. The DAG is the
  ``runtime.refs.waiting.Producer`` of its refs: ``get`` over refs of several DAGs and the runtime
  waits on all their words at once.
- Backpressure (DESIGN 4): rings hold ``max_inflight_executions``; at that many in flight,
  ``execute`` first reads finished outputs into their refs, and only then waits; it raises
  ``PipelineFullError`` only if more than ``max_buffered_results`` results stay un-read for
  ``submit_timeout_s``.
- A death closes every channel (blocked ends wake) and fails every pending ref with the
  ``ActorDiedError``; teardown fails them with ``ChannelClosedError``. Nothing waits forever.

  execute(x) ─WRITE─▶ [input ch] ─▶ actor loops ─▶ [output chs] ─READ (waiting thread)─▶ refs
"""

from __future__ import annotations

import array
import os
import shutil
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ... import _config
from ... import dag as dag_layer
from ...compiler.plan import DRIVER, ChannelKind, Plan
from ...dag.context import DAGContext
from ...dag.ir import DagIR, OpKind, eval_input, trace
from ...dag.nodes import DAGNode
from ...dag.walk import has_leaf
from ...exceptions import (
    ActorDiedError,
    ChannelClosedError,
    ChannelTimeoutError,
    PipelineFullError,
    SubmitTimeoutError,
    ValueDecodeError,
    WouldBlock,
    make_task_error,
)
from ..refs.compiled_ref import CompiledDAGFuture, CompiledDAGRef
from ..loops.values import FunctionHost, InputParts, OpFailure, PackedArgs, eval_part
from ..refs.deadline import Deadline
from ..procs.records import ActorState
from ..refs.ref import Ref, RefState
from ..refs.waiting import ReadRole, wait_until

#: How long a startup may take (with the JIT fallback, the first attach in a fresh process loads numba's cache).
START_TIMEOUT_S = 120.0
#: After a channel broke on its own, how long to wait for the runtime to say which process died.
_DEATH_REPORT_S = 1.0
#: A wait on the output channels' doorbell re-checks the DAG's state this often.
_BELL_SLICE_NS = 100_000_000
#: A deadline that has passed: poll without waiting.
_NOW = Deadline(0)
#: stats() reports the latency of this many latest executions.
_LATENCY_SAMPLES = 16_384


class CompiledDAG:
    """A DAG lowered to processes and channels; ``execute()`` runs it once per call."""

    def __init__(self, runtime: Any, ir: DagIR, plan: Plan, actors: dict[str, Any],
                 hosts: list[tuple[str, Any]], channels: dict[int, Any],
                 trace: tuple[str, str] | None = None, bell: Any = None) -> None:
        self._rt = runtime
        self.ir = ir
        self.plan = plan
        self._actors = actors                   # process key -> ActorRecord
        self._hosts = hosts                     # (label, handle) of the function hosts we use
        self._channels = channels               # channel id -> the owner's handle
        opts = plan.options
        self._max_inflight = opts.max_inflight_executions
        self._input = channels[plan.input_channel].writer() if plan.input_channel >= 0 \
            else None
        # several readers: a channel each, with the parts of the input it uses
        self._splits = [(channels[c].writer(), ops) for c, ops in plan.input_splits]
        if self._splits:
            self._input = self._splits[0][0]
        order = list(dict.fromkeys(c for c in plan.output_channels if c >= 0))
        self._readers = [(c, channels[c].reader(channels_readers(plan, c).index(DRIVER)))
                         for c in order]
        # per reader: the outputs it carries, and the next execution it has a value of
        self._outputs_of = [tuple(k for k, oc in enumerate(plan.output_channels) if oc == c)
                            for c in order]
        self._next = [0] * len(order)
        self._bell = bell           # the output channels' writers ring it (several readers)
        self._driver_outputs = [(k, plan.tasks[i]) for k, (i, c) in
                                enumerate(zip(plan.outputs, plan.output_channels, strict=True))
                                if c < 0]
        self._names = [plan.tasks[i].name for i in plan.outputs]
        self._arity = _arity(plan)              # what execute() must be given (Ray checks it)
        self._id = uuid.uuid4().hex
        #: get(timeout=None) of this DAG's refs waits this long (DAGContext.get_timeout)
        self.get_timeout_s: float | None = DAGContext.get_current().get_timeout
        self._submit_lock = threading.Lock()
        self._cond = threading.Lock()           # _unread, _watched, _closed
        self._role = ReadRole(self._ring)       # which thread reads the output channels
        self._submitted = 0
        self._fetched = 0
        self._pending: dict[int, list[weakref.ref]] = {}
        self._started: dict[int, int] = {}      # execution -> perf_counter_ns at submit
        # the latest _LATENCY_SAMPLES latencies, a ring of fixed size: a long run's memory stays
        # flat (a deque of ints grew the driver by ~4 MB over its first 100,000 executions)
        self._latency_ns = array.array("q", bytes(8 * _LATENCY_SAMPLES))
        self._latencies = 0
        self._unread: deque[list[weakref.ref]] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self._died = threading.Event()
        self._watched: set[CompiledDAGRef] = set()
        self._watcher: threading.Thread | None = None
        #: Where teardown writes the Chrome trace (``profile=True`` or a path), else None.
        self.profile_path: str | None = None
        self._trace_dir: str | None = None
        self._recorder: Any = None
        if trace is not None:
            from ..loops.profiling import Recorder
            self.profile_path, self._trace_dir = trace
            self._recorder = Recorder("driver")
            self._recorder.kind("execute", "submit", "submit")
            self._recorder.kind("read outputs", "read", "outputs")

    # -- submitting -------------------------------------------------------------------------
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Run the DAG once on ``args``/``kwargs``; refs among them are resolved first.

        Returns:
            A ``CompiledDAGRef`` (a list of them for a ``MultiOutputNode``).

        Raises:
            ChannelClosedError: the DAG was torn down. ActorDiedError: a process of it died.
            PipelineFullError: more than ``max_buffered_results`` results stayed un-read.
            TypeError: an argument cannot be serialized (nothing was submitted).
        """
        if self._closed:
            raise self._closed_error()
        if kwargs or len(args) != 1 or self._arity[0] != 1:
            self._check_arguments(args, kwargs)
        if (kwargs or len(args) != 1 or type(args[0]) not in _PLAIN) and (
                _has_refs(args) or _has_refs(kwargs)):
            from ..api import gather
            args, kwargs = gather((args, kwargs))
        with self._submit_lock:
            e = self._submitted
            if e - self._fetched >= self._max_inflight:
                self._make_room(e)
            started = time.perf_counter_ns()
            self._rt.last_submit = time.monotonic()     # spares boot when calls pause
            if self._input is not None:
                if self._recorder is None:
                    self._write_input(args, kwargs)
                else:
                    start = time.monotonic_ns()
                    self._write_input(args, kwargs)
                    self._recorder.add(_SUBMIT, e, start, time.monotonic_ns())
            refs = [CompiledDAGRef(self, e, k, name) for k, name in enumerate(self._names)]
            self._pending[e] = [weakref.ref(r) for r in refs]
            self._started[e] = started
            # NOTE: last: a reader on another thread reads execution e only from now on, and
            # finds its refs registered
            self._submitted = e + 1
        if self._closed or self._error is not None:    # closed while we submitted
            self._fail_pending(self._closed_error())
        for k, task in self._driver_outputs:
            self._finish_driver_output(refs[k], task, args, kwargs)
        return refs if self.plan.multi else refs[0]

    async def execute_async(self, *args: Any, **kwargs: Any) -> Any:
        """``execute`` for asyncio: ``fut = await compiled.execute_async(x); v = await fut``.

        As in Ray, a ``MultiOutputNode`` gives a list of futures, one per output
        (``for f in futs: await f``, ``await asyncio.gather(*futs)``).

        It never blocks the event loop: when ``execute`` could wait (the pipeline is full, or
        refs among the arguments must be resolved first), it runs on a worker thread.
        """
        if self._submitted - self._fetched < self._max_inflight - 1 and not (
                _has_refs(args) or _has_refs(kwargs)):
            refs = self.execute(*args, **kwargs)
        else:
            import asyncio
            refs = await asyncio.to_thread(self.execute, *args, **kwargs)
        if self.plan.multi:
            return [CompiledDAGFuture(ref) for ref in refs]
        return CompiledDAGFuture(refs)

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        """ValueError (Ray's) unless ``execute(*args, **kwargs)`` gives the DAG's input what it
        reads: as many positional arguments as it indexes, each keyword it reads."""
        count, names, site = self._arity
        if count is not None and len(args) != count:
            whole = " (it binds its InputNode itself: one value)" if count == 1 and not \
                names else ""
            raise ValueError(
                f"dag.execute() or dag.execute_async() must be called with {count} positional "
                f"args, got {len(args)}: the DAG's input (bound at {site}) reads {count}"
                f"{whole}.\n\nPass exactly those; nothing was submitted.")
        if count == 1 and not names and kwargs:
            raise ValueError(
                f"dag.execute() or dag.execute_async() got keyword arguments "
                f"{sorted(kwargs)}, but the DAG binds its InputNode (bound at {site}) itself, "
                "so it takes one value.\n\nPass one value, or bind inp.key to read keywords; "
                "nothing was submitted.")
        for name in names:
            if name not in kwargs and len(args) != 1:
                raise ValueError(
                    f"dag.execute() or dag.execute_async() must be called with kwarg `{name}` "
                    f"(the DAG reads inp.{name}, bound at {site}); got "
                    f"{sorted(kwargs) or 'no keyword arguments'}.\n\nPass {name}=...; "
                    "nothing was submitted.")

    def _write_input(self, args: tuple, kwargs: dict) -> None:
        arguments = args[0] if len(args) == 1 and not kwargs else PackedArgs(args, kwargs)
        try:       # one positional argument travels as itself (the codec's fast paths apply)
            if not self._splits:
                self._input.write(arguments, self.plan.options.submit_timeout_s)
                return
            from ...channels.codec import T_FLOAT, encode   # NOTE: loads pyarrow: not at import
            # every part encoded before any is written: a TypeError leaves every reader as it
            # was. NOTE: the writes never wait: with fewer executions in flight than the rings'
            # capacity (_make_room), each reader took its value of the execution a ring ago
            parts = self._split(arguments)
            encoded = [encode(part) for part in parts]
            timeout_s = self.plan.options.submit_timeout_s
            for (writer, _), part, enc in zip(self._splits, parts, encoded, strict=True):
                if enc.tag <= T_FLOAT:              # a scalar: header only, nothing encoded
                    writer.write(part, timeout_s)
                else:
                    writer.write_encoded(enc, timeout_s)
        except ChannelTimeoutError:
            raise self._stall_error(self._submitted, "the input ring stayed full") from None
        except TypeError as exc:
            from ..procs.arguments import bad_argument
            raise TypeError(bad_argument(args, kwargs, "execute()", None, exc)) from exc
        except ChannelClosedError:
            raise self._closed_error() from None

    def _split(self, arguments: Any) -> list[Any]:
        """Each split reader's parts of the input, evaluated once each (in op order: a part's
        parent comes first): ``InputParts``, or the part itself where a ring carries one (an
        array then travels as an array, not inside a pickle)."""
        tasks, values = self.plan.tasks, {}
        for i in sorted({i for _, ops in self._splits for i in ops}):
            values[i] = eval_part(tasks[i], tasks, values, arguments)
        return [values[ops[0]] if len(ops) == 1 else InputParts((i, values[i]) for i in ops)
                for _, ops in self._splits]

    def _finish_driver_output(self, ref: CompiledDAGRef, task: Any, args: tuple,
                              kwargs: dict) -> None:
        try:
            value = eval_input(self.plan.tasks, task, args, kwargs, {})
        except Exception as exc:                # noqa: BLE001 - bad execute() arguments
            ref._finish_error(exc)
            return
        ref._finish_value(value)

    def _make_room(self, e: int) -> None:
        """At ``max_inflight_executions``: read finished outputs, then wait (DESIGN 4)."""
        opts = self.plan.options
        deadline = Deadline(opts.submit_timeout_s)
        while e - self._fetched >= self._max_inflight:
            if self._error is not None or self._closed:
                raise self._closed_error()
            limit = opts.max_buffered_results
            if limit is not None and self._count_unread() > limit:
                if deadline.expired():
                    raise PipelineFullError(
                        f"execute() waited {opts.submit_timeout_s:g} s (submit_timeout_s) "
                        f"with {self._count_unread()} results un-read, more than "
                        f"max_buffered_results={limit}.\n\nRead results with hr.get() (or "
                        "drop their refs) as you go, or compile with a larger "
                        "max_buffered_results.")
                time.sleep(0.001)
                continue
            wait_until(lambda: e - self._fetched < self._max_inflight or self._closed or
                       self._error is not None, (), deadline, (self,))
            if self._error is not None or self._closed:
                raise self._closed_error()
            if e - self._fetched >= self._max_inflight and deadline.expired():
                raise self._stall_error(e, "the pipeline stayed full")

    def _stall_error(self, e: int, what: str) -> SubmitTimeoutError:
        """No progress for ``submit_timeout_s``: name the stages that hold the pipeline."""
        from .stalls import describe_stall
        opts = self.plan.options
        return SubmitTimeoutError(
            f"execute() could not submit execution {e}: {what} ({e - self._fetched} "
            f"executions in flight, max_inflight_executions={self._max_inflight}) for "
            f"{opts.submit_timeout_s:g} s (submit_timeout_s) without progress. Holding it:\n"
            f"{describe_stall(self.plan, self._channels, self._actors)}\n\n"
            "Nothing was submitted; the DAG works again once the stage moves on. If it is just "
            "slow, compile with a larger submit_timeout_s (None waits for ever); if it is "
            "stuck, see where with `py-spy dump --pid <pid>`.")

    def _count_unread(self) -> int:
        with self._cond:        # readers on other threads append to it
            self._prune_unread()
            return len(self._unread)

    def _prune_unread(self) -> None:
        """Forget executions whose refs were all read or dropped (``_cond`` held)."""
        self._unread = deque(r for r in self._unread if any(
            (ref := w()) is not None and not ref._read for w in r))

    # -- reading outputs: the Producer of its refs (runtime.refs.waiting) --------------------------
    def drive(self, cond: Callable[[], bool], deadline: Deadline) -> bool:
        """Read outputs on this thread until ``cond()`` or the deadline; False if another thread
        reads them now (the caller then waits for it, woken by its refs' callbacks)."""
        if not self._role.take():
            return False
        try:
            while not cond() and self._fetched < self._submitted:
                if not self._read_some(deadline):
                    break
        finally:
            self._role.give()
        return cond() or deadline.remaining_s() == 0

    def poll(self) -> None:
        """Read whatever outputs are already there, without waiting (``done()``, waiters)."""
        if self._fetched < self._submitted and self._role.take():
            try:
                while self._fetched < self._submitted and self._read_some(_NOW):
                    pass
            finally:
                self._role.give()

    def words(self) -> list[int]:
        """The word that moves when an output arrives: the doorbell's, or the one channel's."""
        if self._bell is not None:
            return [self._bell.address()]
        return [self._readers[0][1].notify_address()] if self._readers else []

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def _ring(self) -> None:
        if self._bell is not None:
            self._bell.ring()
        elif self._readers:
            self._readers[0][1].notify()

    def _read_some(self, deadline: Deadline) -> bool:
        """Read at least one output value (of any execution in flight); False on timeout or
        close. With several output channels, whichever has a value first is read: an error of
        one output is seen at once, whatever its siblings do (one wait, on the doorbell)."""
        if self._closed or self._error is not None:
            self._fail_pending(self._closed_error())
            return False
        if self._bell is None:
            if not self._readers:       # every output is an argument of execute()
                self._complete(self._fetched)
                return True
            return self._read_from(0, deadline.remaining_s())
        readers, nxt, bell = self._readers, self._next, self._bell
        while True:
            seen = bell.seen()
            got = False
            for i in range(len(readers)):
                if nxt[i] < self._submitted and self._read_from(i, 0):
                    got = True
            if got:
                return True
            if self._closed or self._error is not None:
                self._fail_pending(self._closed_error())
                return False
            remaining = deadline.remaining_s()
            if remaining == 0:
                return False
            bell.wait(seen, _BELL_SLICE_NS if remaining is None
                      else min(_BELL_SLICE_NS, int(remaining * 1e9)))

    def _read_from(self, i: int, timeout_s: float | None) -> bool:
        """Read output channel ``i``'s value of its next execution (``timeout_s=0``: only if it
        is there); False on timeout or close."""
        c, reader = self._readers[i]
        if timeout_s == 0 and not reader.has_value():
            return False
        taken = reader.taken()
        start = time.monotonic_ns() if self._recorder is not None else 0
        try:
            value = reader.read_nowait() if timeout_s == 0 and self._bell is not None \
                else reader.read(timeout_s)
        except (ChannelTimeoutError, WouldBlock):
            return False
        except ChannelClosedError as exc:
            self._on_broken(str(exc))
            return False
        except ValueDecodeError as exc:     # taken, but could not be rebuilt
            value = _ReadFailure(c, exc.__cause__ or exc)       # its error; order holds
        except BaseException as exc:        # e.g. Ctrl-C, or a signal handler's error
            # NOTE: it propagates, and nothing else moves: a value left on the ring is read
            # next time; one taken off it is this output's error, so nothing shifts
            if reader.taken() != taken:
                self._deliver(i, _ReadFailure(c, exc))
            raise
        if start:
            self._recorder.add(_READ_OUTPUTS, self._next[i], start, time.monotonic_ns())
        self._deliver(i, value)
        return True

    def _deliver(self, i: int, value: Any) -> None:
        """Output channel ``i``'s value of its next execution: finish the refs it feeds."""
        e = self._next[i]
        refs = self._pending.get(e)
        if refs is not None:
            for k in self._outputs_of[i]:
                ref = refs[k]()
                if ref is None or ref._state is not RefState.PENDING:
                    continue
                if type(value) is OpFailure:
                    ref._finish_error(_task_error(value))
                elif type(value) is _ReadFailure:
                    ref._finish_error(value.error(self.plan, e))
                else:
                    ref._finish_value(value)
        self._next[i] = e + 1
        done = min(self._next) if self._bell is not None else e + 1
        while self._fetched < done:
            self._complete(self._fetched)

    def _complete(self, e: int) -> None:
        """Every output of execution ``e`` was read."""
        refs = self._pending.pop(e, [])
        self._fetched = e + 1
        started = self._started.pop(e, None)
        if started is not None:
            self._latency_ns[self._latencies % _LATENCY_SAMPLES] = \
                time.perf_counter_ns() - started
            self._latencies += 1
        if self.plan.options.max_buffered_results is not None:
            with self._cond:
                self._unread.append(refs)
                if len(self._unread) > 2 * self._max_inflight + 64:
                    self._prune_unread()

    def watch(self, ref: CompiledDAGRef) -> None:
        """Someone wants ``ref`` finished without waiting for it: read in the background."""
        with self._cond:
            self._watched.add(ref)
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch_loop, daemon=True,
                                                 name="headrace-dag-reader")
                self._watcher.start()

    def _watch_loop(self) -> None:
        while True:
            with self._cond:
                self._watched = {r for r in self._watched if r._state is RefState.PENDING}
                if not self._watched or self._closed:
                    self._watcher = None
                    return
                target = max(self._watched, key=lambda r: r._execution)
            wait_until(target._final, (target,), Deadline(None))

    # -- failure and teardown ---------------------------------------------------------------
    def _on_broken(self, reason: str) -> None:
        """A channel closed under us: a teardown, or a death the runtime reports shortly."""
        if not self._closed and self._error is None:
            self._died.wait(_DEATH_REPORT_S)
        if self._error is None and not self._closed:
            self._error = ActorDiedError(f"a process of the compiled DAG is gone: {reason}")
            self._break(reason)
        self._fail_pending(self._closed_error())

    def actor_died(self, actor: Any, error: BaseException) -> None:
        """The runtime saw one of our processes die: break every channel, fail every ref."""
        if self._closed or self._error is not None:
            return
        if not any(a is actor for a in self._actors.values()):
            return
        self._error = error
        self._died.set()
        self._break(f"{actor.label} died")
        self._fail_pending(error)
        # the DAG is over: free its function hosts and channels now, off the runtime's thread
        threading.Thread(target=self.teardown, name="headrace-dag-teardown", daemon=True).start()

    def _break(self, reason: str) -> None:
        for ch in self._channels.values():
            try:
                ch.mark_broken(reason)
            except Exception:               # noqa: BLE001 - already gone
                pass

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for refs in pending.values():
            for w in refs:
                ref = w()
                if ref is not None:
                    ref._finish_error(error)

    def _closed_error(self) -> BaseException:
        if self._error is not None:
            return self._error
        return ChannelClosedError("Channel closed. The compiled DAG was torn down; compile "
                                  "the DAG again to run it.")

    def teardown(self) -> None:
        """Close every channel and stop the DAG's loops; idempotent, returns in milliseconds.

        Refs still pending raise ``ChannelClosedError``; the actors stay alive and usable.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
        for ch in self._channels.values():
            ch.close()
        if self._bell is not None:
            self._bell.close()
        if self._input is not None:     # its spills of executions no loop will read
            # NOTE: not while execute() is making a spill on another thread (it wakes at once:
            # the channel is closed); abandon it anyway if that takes more than a second
            locked = self._submit_lock.acquire(timeout=1.0)
            try:
                self._input.abandon()
            finally:
                if locked:
                    self._submit_lock.release()
        self._fail_pending(self._closed_error())
        self._rt.dags.discard(self)
        try:
            if self._trace_dir is not None:     # the loops write their spans as they end
                self._write_trace()
        finally:
            hosts, self._hosts = self._hosts, []
            _release_hosts(self._rt, hosts)

    def _write_trace(self) -> None:
        from ..loops.profiling import merge
        trace_dir, self._trace_dir = self._trace_dir, None
        info = {"plan": self.plan.as_text(), "executions": self._submitted}
        merge(self.profile_path, trace_dir, [p.key for p in self.plan.processes], self._recorder,
              lambda key: self._actors[key].state is not ActorState.DEAD, info)

    def __enter__(self) -> CompiledDAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def __del__(self) -> None:
        # NOTE: garbage collection runs this on any thread, at any point (maybe while that
        # thread holds the runtime's lock, or another thread waits on it): teardown, which takes
        # locks, runs on a thread of its own
        try:
            if not self._closed:
                threading.Thread(target=self.teardown, name="headrace-dag-teardown",
                                 daemon=True).start()
        except Exception:                   # noqa: BLE001 - interpreter shutdown
            pass

    # -- introspection ----------------------------------------------------------------------
    def get_id(self) -> str:
        """This compiled DAG's id (hex), as Ray's ``get_id()``."""
        return self._id

    def stats(self) -> dict[str, Any]:
        """Executions, latency (submit to outputs read, in µs) and per-channel statistics."""
        lat = sorted(self._latency_ns[:min(self._latencies, _LATENCY_SAMPLES)])

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e3 if lat else None
        return {"executions": self._submitted, "completed": self._fetched,
                "in_flight": self._submitted - self._fetched,
                "latency_us": {"median": q(0.5), "p99": q(0.99), "samples": len(lat)},
                "channels": {f"ch{c}": ch.statistics() for c, ch in self._channels.items()},
                "closed": self._closed}

    def visualize(self, filename: str = "compiled_graph", format: str = "png",
                  view: bool = False, return_dot: bool = False,
                  channel_details: bool = False) -> str:
        """Draw the plan, as Ray does: returns the Graphviz DOT source and writes it to
        ``filename`` and the drawing to ``filename.<format>`` (png, svg, pdf, ... with
        Graphviz's ``dot`` program; ``"dot"`` without it). ``return_dot=True`` only returns the
        source; ``format="ascii"`` returns the plan as text; ``view`` opens the drawing;
        ``channel_details`` labels each channel with its kind, size and readers."""
        from .visualize import render
        return render(self.plan, filename, format, view, return_dot, channel_details)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._error else "open"
        return (f"<CompiledDAG {len(self.plan.processes)} processes, "
                f"{self._submitted} executions, {state}>")


def _arity(plan: Plan) -> tuple[int | None, tuple[str, ...], str]:
    """What ``execute()`` must be given: the exact positional count (None: any), the keywords
    read, and the InputNode's bind site. ``inp`` used whole takes one value; ``inp[i]`` takes
    as many as the largest index needs; ``inp.key`` a keyword (or, alone, an attribute of the
    one positional argument)."""
    inp = next((t for t in plan.tasks if t.kind is OpKind.INPUT), None)
    if inp is None:
        return None, (), "?"
    keys = [t.key for t in plan.tasks if t.kind is OpKind.ATTR and t.deps[0] == inp.index]
    ints = [k for k in keys if isinstance(k, int)]
    names = tuple(dict.fromkeys(k for k in keys if isinstance(k, str)))
    if any(inp.index in t.deps for t in plan.tasks if t.kind is not OpKind.ATTR) or \
            inp.index in plan.outputs:
        return 1, (), inp.site
    if ints and min(ints) >= 0:
        return max(ints) + 1, names, inp.site
    return None, names, inp.site


def channels_readers(plan: Plan, channel: int) -> tuple[str, ...]:
    return plan.channels[channel].readers


def _task_error(failure: OpFailure) -> BaseException:
    from ..wire.errors import task_error  # NOTE: loads cloudpickle: not at import time
    return task_error(failure.info, name=failure.name, site=failure.site)


class _ReadFailure:
    """An output value that arrived but could not be deserialized on the driver."""

    __slots__ = ("channel", "exc")

    def __init__(self, channel: int, exc: BaseException) -> None:
        self.channel, self.exc = channel, exc

    def error(self, plan: Plan, execution: int) -> BaseException:
        task = plan.tasks[plan.channels[self.channel].op]
        return make_task_error(
            f"the value of {task.name} (bound at {task.site}) for execution {execution} "
            f"could not be deserialized on the driver: {type(self.exc).__name__}: {self.exc}",
            cause_type=type(self.exc), cause=self.exc, function_name=task.name,
            site=task.site, pid=os.getpid())


_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_SUBMIT, _READ_OUTPUTS = 0, 1           # the driver's kinds of span (profile=True)


def _has_refs(obj: Any) -> bool:
    return has_leaf(obj, _is_ref)


def _is_ref(obj: Any) -> bool:
    return isinstance(obj, Ref)


# -- compiling ----------------------------------------------------------------------------------
def compile_dag(root: DAGNode, options: dict[str, Any]) -> CompiledDAG:
    """``dag.experimental_compile(**options)``: trace, lower, open the plan, start the loops."""
    from ...compiler.lowering import lower  # NOTE: loads cloudpickle: not at import time
    from .. import session
    from ..api import get
    from ..procs.worker import DAG_START
    rt = session.current()
    ir = trace(root, unused=True)          # validation refuses calls no output depends on
    plan = lower(ir, options, is_alive=lambda key: rt.actors.get(key) is not None)
    actors = {f"actor:{op.actor}": op.target._record for op in ir.ops
              if op.kind is OpKind.METHOD}
    hosts: list[Any] = []
    channels: dict[int, Any] = {}
    files = _trace_files(plan.options.profile)
    bell = None
    try:
        for proc in plan.processes:
            if proc.actor is None:
                handle = _take_host(rt, proc.label)
                hosts.append((proc.label, handle))
                actors[proc.key] = handle._record
        if rt.cluster is not None:      # now each process has a host: plan channels by host
            plan = lower(ir, options, is_alive=lambda key: rt.actors.get(key) is not None,
                         host_of=lambda key: _host_of(actors.get(key)))
        outputs = {c for c in plan.output_channels if c >= 0}
        # the driver waits on one word for whichever output comes first (a socket channel has
        # no word of its own: its writer rings the bell)
        if len(outputs) > 1 or any(plan.channels[c].kind is ChannelKind.SOCKET for c in outputs):
            from ...channels.doorbell import Doorbell
            bell = Doorbell(_config.DAG_SPIN_US)
        for spec in plan.channels:
            channels[spec.id] = _open_channel(spec, plan.options.sync,
                                              bell if spec.id in outputs else None, rt)
        dag = CompiledDAG(rt, ir, plan, actors, hosts, channels, files, bell)
        starts = []
        for proc in plan.processes:
            ends = {}
            for step in proc.steps:
                if step.channel >= 0 and step.channel not in ends:
                    spec = plan.channels[step.channel]
                    ch = channels[step.channel]
                    ends[step.channel] = ch.writer() if spec.writer == proc.key else \
                        ch.reader(spec.readers.index(proc.key))
            starts += rt.submit_call(actors[proc.key], DAG_START, 1,
                                     (plan, proc.key, ends, files and files[1]), {})
        rt.dags.add(dag)
        get(starts, timeout=START_TIMEOUT_S)
    except BaseException:
        for ch in channels.values():
            ch.close()
        if bell is not None:
            bell.close()
        for _, handle in hosts:
            rt.kill_actor(handle._record)
        if files is not None:
            shutil.rmtree(files[1], ignore_errors=True)
        raise
    return dag


def _trace_files(profile: bool | str) -> tuple[str, str] | None:
    """(the trace file, a directory for the loops' parts) when profiling, else None."""
    if profile is False:
        return None
    from ..loops.profiling import default_trace_path, new_trace_dir
    path = default_trace_path() if profile is True else os.path.abspath(profile)
    if not os.path.isdir(os.path.dirname(path)):
        raise FileNotFoundError(f"compile option profile={profile!r}: the directory "
                                f"{os.path.dirname(path)} does not exist; create it or pass "
                                "another path")
    return path, new_trace_dir()


_FRAMING_BYTES = 4096
_HOST_OPTIONS = {"num_cpus": 0.0, "name": None, "max_concurrency": 1, "max_restarts": 0}
#: Idle function hosts kept for later compiles (by function), at most this many in all.
MAX_IDLE_HOSTS = 8
_HOSTS_LOCK = threading.Lock()


def _take_host(rt: Any, label: str) -> Any:
    """A process for the function ops ``label``: an idle one from an earlier DAG, or a new one
    (named ``dag:<label>``, so its log lines say what it runs)."""
    from ..remote import ActorBody, ActorHandle
    with _HOSTS_LOCK:
        idle = rt.dag_hosts.get(label, [])
        while idle:
            handle = idle.pop()
            if handle._record.state is not ActorState.DEAD:
                return handle
    body = ActorBody(FunctionHost)
    body.name = f"dag:{label}"
    return ActorHandle(rt.create_actor(body, _HOST_OPTIONS, (), {}), rt)


def _release_hosts(rt: Any, hosts: list[tuple[str, Any]]) -> None:
    """After a teardown: keep live hosts for the next compile (a host runs each DAG's loop on a
    thread of its own, so an old loop still finishing does not matter); end the rest."""
    for label, handle in hosts:
        with _HOSTS_LOCK:
            keep = not rt.closed and handle._record.state is not ActorState.DEAD and \
                sum(map(len, rt.dag_hosts.values())) < MAX_IDLE_HOSTS
            if keep:
                rt.dag_hosts.setdefault(label, []).append(handle)
        if not keep:
            rt.kill_actor(handle._record)


def _host_of(record: Any) -> str:
    """The host of an actor's process ("": the driver's), from where the cluster placed it."""
    placement = getattr(record, "placement", None)
    if placement is None or placement[2] is None:
        return ""
    from urllib.parse import urlparse
    return urlparse(placement[2]).hostname or placement[2]


def _open_channel(spec: Any, sync: str, bell: Any, rt: Any) -> Any:
    if spec.kind is ChannelKind.SOCKET and rt.cluster is not None:
        from .spanning import open_spanning
        return open_spanning(spec, sync, bell, rt.cluster, spec.slot_bytes + _FRAMING_BYTES)
    if spec.host:                   # shm among processes of another host: made over there
        return rt.cluster.make_channel(spec.host, (len(spec.readers), spec.capacity,
                                                   spec.slot_bytes + _FRAMING_BYTES),
                                       {"sync": sync, "spin_us": _config.DAG_SPIN_US,
                                        "check_s": _config.WATCHED_CHECK_S})
    if spec.kind is ChannelKind.SOCKET:
        from ...channels.socket import SocketChannel
        return SocketChannel(len(spec.readers), spec.capacity, ring=bell)
    from ...channels.shm import ShmChannel
    # NOTE: room for the codec's framing on top, so a value of exactly buffer_size_bytes (a
    # 1 MiB array) fits in its slot instead of spilling.
    return ShmChannel(len(spec.readers), spec.capacity, spec.slot_bytes + _FRAMING_BYTES,
                      sync=sync, spin_us=_config.DAG_SPIN_US,
                      check_s=_config.WATCHED_CHECK_S, ring=bell)


def execute_uncompiled(root: DAGNode, args: tuple, kwargs: dict) -> Any:
    """``dag.execute(...)`` without compiling: the same graph through ordinary calls (the oracle
    the tests compare compiled results with)."""
    from .oracle import run_with_tasks
    return run_with_tasks(trace(root), args, kwargs)


dag_layer.nodes.register("compile", compile_dag)
dag_layer.nodes.register("execute", execute_uncompiled)
