"""Serialization: a value <-> (a pickle stream, its out-of-band buffers).

In: any picklable value. Out: ``(meta, buffers)``: pickle protocol 5, with numpy arrays, Arrow
buffers and other large ``PickleBuffer``s handed out of band, so the caller can place them in
shared memory and read them back without a copy.
Invariants: the C pickler is tried first; cloudpickle takes over for what it cannot do by reference
(lambdas, closures, anything defined in ``__main__``, which another process cannot import).
A value that cannot be pickled raises ``TypeError`` naming its type.
"""

from __future__ import annotations

import io
import linecache
import pickle
import types
from collections import ChainMap
from collections.abc import Sequence
from typing import Any

import cloudpickle

Buffers = list[pickle.PickleBuffer]
_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_reduce_keeping_file(code: types.CodeType) -> Any:
    ctor, args = _code_reduce(code)
    return ctor, tuple(code.co_filename if type(a) is str and a == "<dynamic-code>" else a
                       for a in args)


def _code_reduce_with_source(code: types.CodeType) -> Any:
    ctor, args = _code_reduce_keeping_file(code)
    lines = linecache.getlines(code.co_filename)
    if not lines:
        return ctor, args
    # NOTE: every code object of one file shares linecache's one list: pickled once (memo)
    return _code_with_source, (ctor, args, code.co_filename, lines)


def _code_with_source(ctor: Any, args: tuple, filename: str, lines: list[str]) -> Any:
    """Unpickling code shipped by value: its source lines join this process's ``linecache``
    (where the file is not readable, e.g. a notebook cell or another host), so tracebacks
    raised here show the user's source."""
    if not linecache.getlines(filename):
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return ctor(*args)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping each code object's file name.

    cloudpickle >= 3.1 writes ``<dynamic-code>`` instead, so a remote traceback would lose the
    user's file, line text and bind-site match.
    """

    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_keeping_file},
                                  cloudpickle.Pickler.dispatch_table)


class _FunctionPickler(_Pickler):
    """``_Pickler`` for functions and classes shipped to run elsewhere: each code object also
    carries its file's source lines, which the receiving process puts in its ``linecache``."""

    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_with_source},
                                  cloudpickle.Pickler.dispatch_table)


def cloud_dumps(value: Any, buffer_callback: Any = None, *, source: bool = False) -> bytes:
    """``cloudpickle.dumps(value, protocol=5)``, file names of code kept (``source``: and the
    source lines of by-value code)."""
    out = io.BytesIO()
    pickler = _FunctionPickler if source else _Pickler
    pickler(out, protocol=5, buffer_callback=buffer_callback).dump(value)
    return out.getvalue()


def dumps(value: Any) -> tuple[bytes, Buffers]:
    """Pickle ``value``; returns the stream and its out-of-band buffers.

    Raises:
        TypeError: ``value`` (or something inside it) cannot be pickled; the message names it.
    """
    buffers: Buffers = []
    try:
        meta = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        if b"__main__" not in meta:
            return meta, buffers
    except Exception:   # noqa: BLE001 - anything the C pickler refuses, cloudpickle may manage
        pass
    buffers = []
    try:
        meta = cloud_dumps(value, buffers.append)
    except Exception as exc:
        raise TypeError(f"cannot serialize a value of type {type(value).__qualname__}: "
                        f"{type(exc).__name__}: {exc}") from exc
    return meta, buffers


def loads(meta: bytes | memoryview, buffers: Sequence[Any] = ()) -> Any:
    """Unpickle a stream made by ``dumps``; buffers are used in place (zero copy)."""
    return pickle.loads(meta, buffers=buffers)


def dumps_function(fn: Any) -> bytes:
    """Pickle a function or class by value where needed (cloudpickle), for shipping to workers."""
    try:
        return cloud_dumps(fn, source=True)
    except Exception as exc:
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise TypeError(f"cannot serialize {name!r} to send it to a worker process: "
                        f"{type(exc).__name__}: {exc}\n\nA function or class that captures "
                        "locks, sockets, open files or similar state cannot be shipped; create "
                        "that state inside the function or the actor's __init__ instead.") from exc


def buffer_nbytes(buffers: Buffers) -> int:
    """Total size of out-of-band buffers."""
    return sum(memoryview(b).nbytes for b in buffers)
