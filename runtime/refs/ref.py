"""Refs: one contract (Ray ObjectRef + Dask Future + Serve DeploymentResponse) for every kind.

In: a producer (the runtime's I/O thread, a compiled DAG's reader) that calls ``_finish_*`` once.
Out: ``Ref`` (the contract) and ``ObjectRef``; ``CompiledDAGRef`` subclasses ``Ref`` too.
Invariants: a ref's state moves PENDING -> READY | FAILED | CANCELLED once, through ``_advance``,
under the module lock; final states are read any number of times from any thread; a timed-out wait
leaves the ref PENDING, so a retry works; the value is cached on the ref until it is collected.

  producer thread              ref                                 caller threads
  _finish_value(payload) ─▶ state=READY, waiters woken ─▶ result()/get() ─▶ value (decoded once)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from ...exceptions import (
    CompiledGetTimeoutError,
    GetTimeoutError,
    InternalError,
    RefsTypeError,
    TaskCancelledError,
)
from .deadline import Deadline, check_timeout
from .waiting import wait_until

log = logging.getLogger("headrace")


class RefState(Enum):
    PENDING = "pending"
    READY = "finished"        # .value is the public `status` string
    FAILED = "error"
    CANCELLED = "cancelled"

    __hash__ = object.__hash__     # Enum hashes its name in Python: µs per table lookup


_NEXT = {RefState.PENDING: frozenset({RefState.READY, RefState.FAILED, RefState.CANCELLED})}
_FINAL = frozenset({RefState.READY, RefState.FAILED, RefState.CANCELLED})
_NO_VALUE = object()
#: One lock for every ref's state: transitions are short and rare next to the work they report.
_LOCK = threading.Lock()
_SESSION = os.urandom(4).hex()
_COUNTER = itertools.count(1)


def _new_session() -> None:
    """A forked child (a worker from the zygote, a user's fork) makes ids of its own: the
    parent's prefix and counter would give the same ids in every child."""
    global _SESSION, _COUNTER
    _SESSION, _COUNTER = os.urandom(4).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_new_session)


def new_ref_id() -> str:
    """A process-unique ref id (hex), cheap to make."""
    return f"{_SESSION}{next(_COUNTER):016x}"


class Ref:
    """The contract every ref implements: result, exception, done, callbacks, futures, await.

    Subclasses set ``_decode`` (payload -> value) where values arrive encoded, and ``_on_cancel``.
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_error",
        "_id",
        "_name",
        "_payload",
        "_state",
        "_value",
    )
    _compiled = False       # a CompiledDAGRef: its waits time out as Ray's channels do
    _travels = False        # pickled inside a value, it stays a ref (ObjectRef) or is resolved

    def __init__(self, ref_id: str, name: str) -> None:
        self._id = ref_id
        self._name = name
        self._state = RefState.PENDING
        self._value: Any = _NO_VALUE
        self._payload: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Ref], Any]] | None = None

    # -- identity ---------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """A Dask-like key: ``<function name>-<hex id>``."""
        return f"{self._name}-{self._id}"

    def hex(self) -> str:
        return self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other._id == self._id

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: status: {self._state.value}, key: {self.key}>"

    def __copy__(self) -> Ref:
        return self             # a handle to one value: a copy is the same handle

    def __deepcopy__(self, memo: dict[int, Any]) -> Ref:
        return self

    def __reduce__(self) -> Any:
        exported = getattr(_CAPTURE, "exported", None)
        if exported is not None and self._travels and not getattr(_CAPTURE, "resolve_all", 0):
            exported.append(self)           # Ray's rule: a nested ref arrives as a ref
            return (_ref_from_wire, (self._id, self._name))
        return self._as_dependency()

    def _as_dependency(self) -> Any:
        deps = getattr(_CAPTURE, "deps", None)
        if deps is None:
            raise RefsTypeError(
                f"{type(self).__name__} {self.key} cannot be pickled on its own.\n\n"
                "Pass refs as arguments of .remote() calls, or return them from tasks and "
                "actor methods; or pass hr.get(ref) instead.")
        deps[self._id] = self               # a top-level argument: its value is passed
        return (_resolve_ref, (self._id,))

    # -- state ------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``"pending" | "finished" | "error" | "cancelled"``."""
        return self._state.value

    def done(self) -> bool:
        """Whether the ref is in a final state (finished, error or cancelled)."""
        return self._state in _FINAL

    def cancelled(self) -> bool:
        return self._state is RefState.CANCELLED

    def cancel(self, force: bool = False) -> bool:
        """Ask for the producing task to be cancelled; False if the ref is already final."""
        if self.done():
            return False
        self._on_cancel(force)
        return True

    def _on_cancel(self, force: bool) -> None:
        self._finish_cancelled(TaskCancelledError(f"{self.key} was cancelled"))

    # -- producer side: each moves PENDING to a final state once ---------------------------
    def _finish_payload(self, payload: Any) -> bool:
        return self._finish(RefState.READY, payload=payload)

    def _finish_value(self, value: Any) -> bool:
        return self._finish(RefState.READY, value=value)

    def _finish_error(self, error: BaseException) -> bool:
        return self._finish(RefState.FAILED, error=error)

    def _finish_cancelled(self, error: BaseException) -> bool:
        return self._finish(RefState.CANCELLED, error=error)

    def _finish(self, new: RefState, *, value: Any = _NO_VALUE, payload: Any = None,
                error: BaseException | None = None) -> bool:
        with _LOCK:
            if self._state is not RefState.PENDING:
                return False              # a late result after cancel or death: dropped
            self._advance(new)
            self._value, self._payload, self._error = value, payload, error
            callbacks, self._callbacks = self._callbacks, None
            self._release_producer()
        for fn in callbacks or ():
            _run_callback(fn, self)
        return True

    def _release_producer(self) -> None:
        """Drop links to whatever produced the value (no cycles keep segments alive)."""

    def _advance(self, new: RefState) -> None:      # caller holds _LOCK
        if new not in _NEXT.get(self._state, frozenset()):
            raise InternalError(f"ref {self.key}: {self._state.name} -> {new.name} is not allowed"
                                "; this is a bug in headrace; please report it")
        self._state = new

    # -- consumer side ----------------------------------------------------------------------
    def add_done_callback(self, fn: Callable[[Ref], Any]) -> None:
        """Call ``fn(ref)`` once the ref is final (at once, here, if it already is).

        Callbacks run on the thread that finishes the ref: keep them short and non-blocking.
        """
        with _LOCK:
            if self._state is RefState.PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    def _add_waiter(self, fn: Callable[[Ref], Any]) -> None:
        """``add_done_callback`` for a thread that will itself wait (``runtime.refs.waiting``): no
        helper thread is started for it."""
        Ref.add_done_callback(self, fn)

    def _producer(self) -> Any:
        """What makes this ref final (a ``runtime.refs.waiting.Producer``), or None: another thread
        finishes it, and its callbacks wake the waiter."""
        return None

    def _final(self) -> bool:
        return self._state is not RefState.PENDING

    def _remove_done_callback(self, fn: Callable[[Ref], Any]) -> None:
        with _LOCK:
            if self._callbacks is not None:
                try:
                    self._callbacks.remove(fn)
                except ValueError:
                    pass

    def _wait(self, deadline: Deadline) -> bool:
        """Block until final or the deadline; True if final."""
        if self._state is not RefState.PENDING:
            return True
        producer = self._producer()         # the hot path: read it on this thread
        if producer is not None and producer.drive(self._final, deadline):
            return self._state is not RefState.PENDING
        return wait_until(self._final, (self,), deadline)

    def _outcome(self) -> Any:
        """The value of a final ref, or raise its error."""
        state = self._state
        if state is RefState.READY:
            value = self._value
            if value is _NO_VALUE:
                value = self._decode_payload()
            return value
        if state is RefState.PENDING:
            raise InternalError(f"{self.key} read while pending; this is a bug in headrace")
        raise self._error  # type: ignore[misc]

    def _decode_payload(self) -> Any:
        with _LOCK:
            if self._value is not _NO_VALUE:
                return self._value
            payload = self._payload
        try:
            value = self._decode(payload)
        except BaseException as exc:
            with _LOCK:
                self._state = RefState.FAILED      # decoding failed: the error is the outcome
                self._error = exc
            raise
        with _LOCK:
            self._value = value        # the payload stays: it is what ships to other tasks
        return value

    def _decode(self, payload: Any) -> Any:
        return payload

    def result(self, timeout: float | None = None, *, timeout_s: float | None = None) -> Any:
        """Return the value, waiting up to ``timeout`` seconds (Serve spells it ``timeout_s``).

        Raises:
            GetTimeoutError: the value did not arrive in time; the ref stays usable.
            TaskError: the task raised; TaskCancelledError: it was cancelled.
        """
        deadline = Deadline(_pick_timeout(timeout, timeout_s))
        if not self._wait(deadline):
            raise timeout_error(deadline, [self], 1)
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error the ref ended with, or None if it has a value; waits like ``result``."""
        deadline = Deadline(check_timeout(timeout))
        if not self._wait(deadline):
            raise timeout_error(deadline, [self], 1)
        if self._state is RefState.READY:
            try:
                self._outcome()
            except BaseException as exc:   # a value that fails to decode is this ref's error
                return exc
            return None
        return self._error

    def traceback(self, timeout: float | None = None) -> str | None:
        """The remote traceback text of the ref's error, or None."""
        exc = self.exception(timeout)
        if exc is None:
            return None
        return getattr(exc, "traceback_str", None) or _format_local(exc)

    def future(self) -> concurrent.futures.Future:
        """A ``concurrent.futures.Future`` that completes with this ref."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()

        def finish(ref: Ref) -> None:
            try:
                fut.set_result(ref._outcome())
            except BaseException as exc:    # noqa: BLE001 - the ref's error is the future's
                fut.set_exception(exc)
        self.add_done_callback(finish)
        return fut

    def as_future(self) -> asyncio.Future:
        """An asyncio future on the running event loop that completes with this ref."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def finish(ref: Ref) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, ref)
            except RuntimeError:               # the loop is closed: nobody is waiting any more
                pass
        self.add_done_callback(finish)
        return fut

    def __await__(self) -> Any:
        return self.as_future().__await__()


_CAPTURE = threading.local()


class capturing_refs:        # lower case: used as a function, `with capturing_refs(deps):`
    """While pickling in this block:
    - with ``exported`` (a list), an ObjectRef is appended to it and travels as a ref (Ray's
      rule for refs nested in arguments);
    - a top-level argument (``as_arguments``), or any ref without ``exported``, is recorded in
      ``deps`` and stands in by its id, for its value (``deps=None``: it refuses to be pickled);
    - actor handles are appended to ``handles`` (``note_handle``).
    The sender keeps what it captured alive until the bytes have arrived.
    (A class, not a generator: it is on every call's submit path.)"""

    __slots__ = ("_deps", "_exported", "_handles")

    def __init__(self, deps: dict[str, Ref] | None, handles: list[Any] | None = None,
                 exported: list[Ref] | None = None) -> None:
        self._deps = deps
        self._handles = handles
        self._exported = exported

    def __enter__(self) -> None:
        _CAPTURE.deps = self._deps
        _CAPTURE.handles = self._handles
        _CAPTURE.exported = self._exported

    def __exit__(self, *exc: object) -> None:
        _CAPTURE.deps = _CAPTURE.handles = _CAPTURE.exported = None


class _Argument:
    """A ref that is itself an argument of a call: its value is passed (``as_arguments``)."""

    __slots__ = ("ref",)

    def __init__(self, ref: Ref) -> None:
        self.ref = ref

    def __reduce__(self) -> Any:
        return self.ref._as_dependency()


def as_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to encode: the top-level refs marked as arguments (their values are
    passed), so the same ref nested in a container still travels as a ref."""
    if not any(isinstance(a, Ref) for a in (*args, *kwargs.values())):
        return args, kwargs
    return (tuple(_Argument(a) if isinstance(a, Ref) else a for a in args),
            {k: _Argument(v) if isinstance(v, Ref) else v for k, v in kwargs.items()})


@contextlib.contextmanager
def resolving_nested_refs() -> Iterator[None]:
    """Calls made in this block get the values of refs nested in their arguments too (a DAG's
    nodes nested in containers, run without compiling, mean their values)."""
    _CAPTURE.resolve_all = True
    try:
        yield
    finally:
        _CAPTURE.resolve_all = False


#: Makes the ref an id stands for in this process (the driver's runtime, a worker's client).
_REF_SOURCE: list[Callable[[str, str], Ref]] = []


def set_ref_source(source: Callable[[str, str], Ref]) -> None:
    _REF_SOURCE[:] = [source]


def _ref_from_wire(ref_id: str, name: str) -> Ref:
    if not _REF_SOURCE:
        raise RefsTypeError(f"ref {name}-{ref_id} arrived outside a headrace session")
    return _REF_SOURCE[0](ref_id, name)


def note_handle(handle: Any) -> None:
    """An actor handle is being pickled: record it if a ``capturing_refs`` block wants them."""
    handles = getattr(_CAPTURE, "handles", None)
    if handles is not None:
        handles.append(handle)


@contextlib.contextmanager
def resolving_refs(values: dict[str, Any]) -> Iterator[None]:
    """While unpickling in this block, a ref's id becomes its value from ``values``."""
    _CAPTURE.values = values
    try:
        yield
    finally:
        _CAPTURE.values = None


def _resolve_ref(ref_id: str) -> Any:
    values = getattr(_CAPTURE, "values", None)
    if values is None or ref_id not in values:
        raise TypeError(f"ref {ref_id} arrived without its value; this is a bug in headrace")
    return values[ref_id]


def _settle(fut: asyncio.Future, ref: Ref) -> None:
    if fut.done():
        return
    try:
        fut.set_result(ref._outcome())
    except BaseException as exc:            # noqa: BLE001
        fut.set_exception(exc)


def _run_callback(fn: Callable[[Ref], Any], ref: Ref) -> None:
    try:
        fn(ref)
    except Exception:
        log.exception("done callback %r of %s raised", fn, ref.key)


def _pick_timeout(timeout: float | None, timeout_s: float | None) -> float | None:
    if timeout is not None and timeout_s is not None:
        raise TypeError("pass timeout or timeout_s, not both")
    return check_timeout(timeout if timeout_s is None else timeout_s,
                         "timeout" if timeout_s is None else "timeout_s")


def timeout_error(deadline: Deadline, pending: list[Ref], total: int) -> BaseException:
    """The error of a wait that gave up: its deadline passed (never one without a deadline).
    A ``CompiledGetTimeoutError`` if ``pending`` holds a CompiledDAGRef (Ray's channel
    timeout), else a ``GetTimeoutError``."""
    if deadline.timeout_s is None:
        return InternalError(f"a wait without a deadline gave up with {len(pending)} of {total}"
                             " refs pending; this is a bug in headrace, please report it")
    cls = CompiledGetTimeoutError if any(r._compiled for r in pending) else GetTimeoutError
    return cls(f"get timed out after {deadline.timeout_s:g} s: {len(pending)} of {total} "
               f"ref{'s' if total != 1 else ''} still pending")


def _format_local(exc: BaseException) -> str:
    import traceback
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class ObjectRef(Ref):
    """A handle to the result of a ``.remote()`` call or an ``hr.put``.

    Holds the encoded value (inline bytes or shared-memory buffers) and decodes it on first read;
    the segments behind it are unlinked once the last ref to them is collected.
    """

    __slots__ = ("_keep", "_runtime", "_task")
    _travels = True

    def __init__(self, ref_id: str, name: str, runtime: Any = None) -> None:
        super().__init__(ref_id, name)
        self._runtime = runtime
        self._task: Any = None          # the producing task record while it is pending
        self._keep: Any = None          # what its value needs alive (actors of handles in it)

    def _on_cancel(self, force: bool) -> None:
        if self._runtime is None:
            super()._on_cancel(force)
        else:
            self._runtime.cancel(self, force=force)

    def _release_producer(self) -> None:
        self._task = None        # NOTE: TaskRecord.refs points back here: break the cycle

    def _decode(self, payload: Any) -> Any:
        return payload.decode()

    def _producer(self) -> Any:
        rt = self._runtime
        if rt is None or rt.inbox.closed:   # shutdown finishes every pending ref
            return None
        if threading.get_ident() == rt.inbox.io_ident:
            raise RuntimeError("a blocking get() inside a done callback would stall headrace's "
                               "I/O thread; use add_done_callback or await the ref instead")
        return self.lane() or rt.inbox      # the actor's result ring, or the replies' socket

    def lane(self) -> Any:
        """The shm lane its reply comes back on (an actor call's, once the lane is up)."""
        task = self._task
        proc = task.proc if task is not None else None
        return proc.lane if proc is not None else None
