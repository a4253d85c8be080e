"""Errors that cross processes: one builder on each side, for ordinary calls and compiled DAGs.

In (where the user's code raised): the exception, ``error_info`` -> ``ErrorInfo`` (picklable:
type name, message, traceback text, the pickled exception and class when they pickle).
Out (on the driver): ``task_error(info)`` -> a ``TaskError`` that is also an instance of the
original class, its ``str()`` the head line and the remote traceback with the user's source.
Invariants: the traceback starts at the user's code (headrace's own frames are left out); a class
the driver cannot import still gives a ``TaskError`` with the type's name and message.
"""

from __future__ import annotations

import traceback
from typing import Any

import cloudpickle

from ...dag.nodes import INTERNAL_DIRS
from ...exceptions import TaskError, make_task_error
from .protocol import ErrorInfo


def error_info(exc: BaseException, name: str, pid: int, prefix: str = "") -> ErrorInfo:
    """Describe ``exc`` for the driver, pickling what can be pickled. The traceback starts at
    the user's code: the frames of headrace's own call into it are left out."""
    frames = exc.__traceback__
    while frames is not None and frames.tb_next is not None and \
            frames.tb_frame.f_code.co_filename.startswith(INTERNAL_DIRS):
        frames = frames.tb_next
    tb = "".join(traceback.format_exception(type(exc), exc, frames))
    return ErrorInfo(function_name=name, type_name=type(exc).__qualname__,
                     message=prefix + str(exc), traceback_str=tb, pid=pid,
                     type_blob=_try_pickle(type(exc)), exc_blob=_try_pickle(exc))


def task_error(info: ErrorInfo, *, name: str | None = None,
               site: str | None = None) -> TaskError:
    """Rebuild a remote exception as a TaskError that is also an instance of its class.

    ``name`` and ``site``: the node and its bind site (compiled DAGs), else the function's name.
    """
    cause_type = try_unpickle(info.type_blob)
    cause = try_unpickle(info.exc_blob)
    where = f"bound at {site}, pid {info.pid}" if site else f"pid {info.pid}"
    message = f"{name or info.function_name} ({where}) raised {info.type_name}: {info.message}"
    return make_task_error(message, cause_type=cause_type if isinstance(cause_type, type)
                           else None, cause=cause if isinstance(cause, BaseException) else None,
                           function_name=name or info.function_name,
                           traceback_str=info.traceback_str, site=site, pid=info.pid)


def try_unpickle(blob: bytes | None) -> Any:
    """The object pickled in ``blob``, or None (no blob, or a class this process cannot
    import)."""
    if blob is None:
        return None
    try:
        return cloudpickle.loads(blob)
    except Exception:                  # noqa: BLE001 - a class the driver cannot import
        return None


def _try_pickle(obj: Any) -> bytes | None:
    try:
        blob = cloudpickle.dumps(obj, protocol=5)
        cloudpickle.loads(blob)             # refuse what would not come back either
        return blob
    except Exception:                       # noqa: BLE001
        return None
