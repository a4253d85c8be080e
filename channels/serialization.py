"""Serialization: a value <-> (a pickle stream, its out-of-band buffers).

In: any picklable value. Out: ``(meta, buffers)``: pickle protocol 5, with numpy arrays, Arrow
buffers and other large ``PickleBuffer``s handed out of band, so the caller can place them in
shared memory and read them back without a copy.
Invariants: the C pickler is tried first; cloudpickle takes over for what it cannot do by reference
(lambdas, closures, anything defined in ``__main__``, which another process cannot import).
A value that cannot be pickled raises ``TypeError`` naming its type.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import cloudpickle

Buffers = list[pickle.PickleBuffer]


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
        meta = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
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
        return cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise TypeError(f"cannot serialize {name!r} to send it to a worker process: "
                        f"{type(exc).__name__}: {exc}\n\nA function or class that captures "
                        "locks, sockets, open files or similar state cannot be shipped; create "
                        "that state inside the function or the actor's __init__ instead.") from exc


def buffer_nbytes(buffers: Buffers) -> int:
    """Total size of out-of-band buffers."""
    return sum(memoryview(b).nbytes for b in buffers)
