"""The public runtime API: init/shutdown, put/get/wait/gather, cancel, kill, get_actor.

In: refs of any kind (ObjectRef, CompiledDAGRef) and user timeouts. Out: values, in input order.
Invariants (DESIGN 2.2): a list keeps its order and may hold duplicates; anything else that is not
a single ref is an error both TypeError and ValueError; ``timeout`` becomes one Deadline for the
whole call; the first error is raised as soon as it arrives; no wait outlives a dead process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from ..dag.walk import DROP, leaves, map_leaves
from ..exceptions import RefsTypeError
from . import session
from .refs.deadline import Deadline, check_timeout
from .refs.ref import ObjectRef, Ref, RefState, timeout_error
from .session import init, is_initialized, shutdown  # noqa: F401 - re-exported: the public API
from .refs.waiting import wait_until

_WARNED_LOOP = False


def put(value: Any) -> ObjectRef:
    """Store ``value`` once; large buffers go to shared memory and are read without copies."""
    return session.current().put(value)


def cancel(ref: Ref, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task behind ``ref``: a queued task never runs, a running one is interrupted.

    ``force=True`` kills the worker running it (it is replaced). Its refs raise
    ``TaskCancelledError``. A ref that already finished is left alone.
    """
    if not isinstance(ref, Ref):
        raise TypeError(f"hr.cancel() expects a ref, got {type(ref).__name__}")
    if not ref.done():
        ref._on_cancel(force)


def kill(actor: Any, *, no_restart: bool = True) -> None:
    """End an actor now (SIGKILL); its pending and later calls raise ``ActorDiedError``."""
    from .remote import ActorHandle
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"hr.kill() expects an actor handle, got {type(actor).__name__}")
    session.current().kill_actor(actor._record, no_restart=no_restart)


def get_actor(name: str) -> Any:
    """A handle to the live actor created with ``.options(name=name)``."""
    from .remote import ActorHandle
    rt = session.current()
    return ActorHandle(rt.get_actor(name), rt)


# -- get / wait / gather ----------------------------------------------------------------------
def _check_refs(refs: Any, fn: str) -> tuple[list[Ref], bool]:
    """Returns (refs as a list, whether a single ref was given)."""
    if isinstance(refs, Ref):
        return [refs], True
    if not isinstance(refs, list):
        raise RefsTypeError(
            f"{fn}() expects a ref or a list of refs, got {type(refs).__name__}"
            + (f"; pass a list instead: hr.{fn}(list(refs))" if isinstance(refs, Iterable)
               else ""))
    for i, ref in enumerate(refs):
        if not isinstance(ref, Ref):
            raise RefsTypeError(f"{fn}() expects a list of refs, but element {i} is "
                                f"{type(ref).__name__}: {ref!r:.60}")
    return refs, False


def _warn_if_in_loop(fn: str) -> None:
    global _WARNED_LOOP
    if _WARNED_LOOP:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    _WARNED_LOOP = True
    warnings.warn(f"hr.{fn}() called inside a running asyncio event loop blocks the loop; "
                  "use `await ref` or `await asyncio.gather(*refs)` instead",
                  RuntimeWarning, stacklevel=3)


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """Return the values of ``refs``, waiting for them if needed.

    Args:
        refs: A ref, or a list mixing ObjectRefs and CompiledDAGRefs of any compiled DAGs.
        timeout: Seconds for the whole call, one deadline for all refs; None waits, 0 polls.

    Returns:
        The value of one ref, or a list of values in the order of ``refs``.

    Raises:
        GetTimeoutError: The deadline passed; the message counts the refs still pending.
        TaskError: A task raised; raised as soon as it arrives, without waiting for the rest.
    """
    items, single = _check_refs(refs, "get")
    deadline = Deadline(timeout if timeout is not None else _dag_get_timeout(items))
    _warn_if_in_loop("get")
    if single:
        ref = items[0]
        if not ref._wait(deadline):
            raise timeout_error(deadline, [ref], 1)
        return ref._outcome()
    _wait_all(items, deadline)
    return [ref._outcome() for ref in items]


def _dag_get_timeout(items: list[Ref]) -> float | None:
    """``get(timeout=None)``: the shortest ``DAGContext.get_timeout`` of the compiled DAGs of
    ``items`` (None, the default, for all: no deadline)."""
    found = [r._dag.get_timeout_s for r in items if r._compiled and
             r._dag.get_timeout_s is not None]
    return min(found) if found else None


def _wait_all(items: list[Ref], deadline: Deadline) -> None:
    """Wait until every ref is final, raising the first error as soon as it is seen."""
    _raise_first_error(items)
    pending = [r for r in dict.fromkeys(items) if r._state is RefState.PENDING]
    if not pending:
        return

    with _Tally(pending) as tally:
        if not wait_until(lambda: tally.finished >= len(pending) or tally.failed, pending,
                          deadline):
            still = [r for r in items if r._state is RefState.PENDING]
            raise timeout_error(deadline, still, len(items))
    _raise_first_error(items)


class _Tally:
    """Counts refs as they finish (a done-callback on each, run by whichever thread finishes
    it), so a wait's condition costs O(1) however many refs it waits for."""

    def __init__(self, refs: list[Ref]) -> None:
        self._refs = refs
        self._finished: list[Ref] = []      # list.append is atomic: any thread may call it
        self._failed: list[Ref] = []

    def _count(self, ref: Ref) -> None:
        self._finished.append(ref)
        if ref._state is not RefState.READY:
            self._failed.append(ref)

    @property
    def finished(self) -> int:
        return len(self._finished)

    @property
    def failed(self) -> bool:
        return bool(self._failed)

    def __enter__(self) -> _Tally:
        for ref in self._refs:
            ref._add_waiter(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        for ref in self._refs:
            ref._remove_done_callback(self._count)


def _raise_first_error(refs: list[Ref]) -> None:
    for ref in refs:
        if ref._state is RefState.FAILED or ref._state is RefState.CANCELLED:
            ref._outcome()


def wait(refs: list[Ref], *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[Ref], list[Ref]]:
    """Wait until ``num_returns`` refs are final or the deadline; returns (ready, not_ready).

    Both lists keep the input order; a ref that failed counts as ready. No error on timeout.
    """
    deadline = Deadline(timeout)
    items, single = _check_refs(refs, "wait")
    if single:
        raise RefsTypeError("wait() expects a list of refs, got a single ref; pass [ref]")
    if not isinstance(num_returns, int) or isinstance(num_returns, bool) or num_returns < 1:
        raise ValueError(f"num_returns must be an int >= 1, got {num_returns!r}")
    if num_returns > len(items):
        raise ValueError(f"num_returns={num_returns} is more than the {len(items)} refs given")
    _warn_if_in_loop("wait")
    watched = [r for r in dict.fromkeys(items) if not r._final()]
    with _Tally(watched) as tally:
        counted = [-1, False]           # finished refs when last counted, and the answer

        def enough() -> bool:           # recounted only when a ref finished since last time
            if tally.finished != counted[0]:
                counted[0] = tally.finished
                counted[1] = sum(r._final() for r in items) >= num_returns
            return counted[1]
        wait_until(enough, watched, deadline)
    ready: list[Ref] = []
    not_ready: list[Ref] = []
    for ref in items:
        (ready if ref.done() and len(ready) < num_returns else not_ready).append(ref)
    return ready, not_ready


def gather(obj: Any, *, errors: str = "raise", timeout: float | None = None,
           asynchronous: bool = False) -> Any:
    """Resolve every ref inside nested lists, tuples, dicts and sets, keeping their shape.

    Like Dask's ``Client.gather``: an iterator gives an iterator, a ``queue.Queue`` gives a
    queue fed as values arrive; ``errors="skip"`` drops failed entries; ``asynchronous=True``
    returns an awaitable.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    timeout = check_timeout(timeout)            # inf (or decades) becomes None: no deadline
    if asynchronous:
        return _gather_async(obj, errors, timeout)
    if isinstance(obj, queue.Queue):
        return _gather_queue(obj, errors)
    if isinstance(obj, Iterator):
        return _gather_iter(obj, errors, timeout)
    deadline = Deadline(timeout)
    refs = list(dict.fromkeys(_collect(obj)))
    _warn_if_in_loop("gather")
    if errors == "raise":
        _wait_all(refs, deadline)
    else:
        _wait_done(refs, deadline)
    return _rebuild(obj, errors)


def _wait_done(refs: list[Ref], deadline: Deadline) -> None:
    """Wait until every ref is final, failed ones included (``errors="skip"``)."""
    pending = [r for r in refs if not r._final()]
    with _Tally(pending) as tally:
        if not wait_until(lambda: tally.finished >= len(pending), pending, deadline):
            raise timeout_error(deadline, [r for r in refs if not r._final()], len(refs))


def _is_ref(obj: Any) -> bool:
    return isinstance(obj, Ref)


def _collect(obj: Any) -> Iterator[Ref]:
    return leaves(obj, _is_ref)


def _rebuild(obj: Any, errors: str) -> Any:
    def outcome(ref: Ref) -> Any:
        if errors == "skip" and ref._state is not RefState.READY:
            return DROP
        try:
            return ref._outcome()
        except Exception:
            if errors == "skip":
                return DROP
            raise
    return map_leaves(obj, outcome, _is_ref)


def _gather_iter(items: Iterator[Any], errors: str, timeout: float | None) -> Iterator[Any]:
    for item in items:
        value = gather(item, errors=errors, timeout=timeout)
        if errors == "skip" and isinstance(item, Ref) and item._state is not RefState.READY:
            continue
        yield value


def _gather_queue(source: queue.Queue, errors: str) -> queue.Queue:
    """Feed a new queue with the values of the refs put on ``source``, as they arrive."""
    out: queue.Queue = queue.Queue()

    def feed() -> None:
        while True:
            item = source.get()
            if item is None:                       # the producer is done
                out.put(None)
                return
            try:
                out.put(gather(item, errors=errors))
            except Exception as exc:               # noqa: BLE001 - the consumer sees it
                out.put(exc)
    threading.Thread(target=feed, name="headrace-gather-queue", daemon=True).start()
    return out


async def _gather_async(obj: Any, errors: str, timeout: float | None) -> Any:
    refs = list(dict.fromkeys(_collect(obj)))
    waits = [asyncio.ensure_future(_settled(r)) for r in refs]
    if waits:
        done, not_done = await asyncio.wait(waits, timeout=timeout)
        for task in not_done:
            task.cancel()
        if not_done:
            raise timeout_error(Deadline(timeout),
                                 [r for r, w in zip(refs, waits, strict=True) if w in not_done],
                                 len(refs))
    return _rebuild(obj, errors)


async def _settled(ref: Ref) -> None:
    try:
        await ref
    except BaseException:               # noqa: BLE001 - _rebuild raises or skips it
        pass
