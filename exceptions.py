"""Every error headrace raises, under one root: ``HeadraceError``.

```text
HeadraceError
├─ TaskError            also an instance of the user's exception class
├─ ActorDiedError       WorkerCrashedError   ObjectLostError   TaskCancelledError
├─ GetTimeoutError      ChannelTimeoutError   (both also a builtin TimeoutError)
├─ DAGCompileError      PipelineFullError    ChannelClosedError   WouldBlock (*_nowait)
└─ InternalError        "this is a bug in headrace; please report it"
```
A leaf module: any layer may import it. ``TaskError`` subclasses that mix in a user's exception
class are made here, on the driver, because dynamically made classes do not pickle.
"""

from __future__ import annotations

import functools
from typing import Any


class HeadraceError(Exception):
    """The root of every headrace error."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process (set as ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class TaskError(HeadraceError):
    """A user's function or method raised; the instance is also an instance of the user's class.

    Attributes:
        cause: The user's exception as it was raised remotely (None if it could not be pickled).
        function_name: The function, ``Class.method`` or DAG node that raised.
        traceback_str: The remote traceback text.
        site: Where the failing node was bound (``file:line``), or None outside compiled DAGs.
        pid: The process the exception was raised in.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None,
                 function_name: str = "", traceback_str: str = "", site: str | None = None,
                 pid: int | None = None, cause_type: type[BaseException] | None = None) -> None:
        # NOTE: never call the user's __init__: its signature is unknown.
        Exception.__init__(self, message)
        self.cause = cause
        self.cause_type = cause_type if cause_type is not None else type(cause)
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.site = site
        self.pid = pid
        if traceback_str:
            self.__cause__ = RemoteTraceback(traceback_str)

    def __str__(self) -> str:
        """The message, then the remote traceback with the user's source lines (as Ray's)."""
        message = str(self.args[0]) if self.args else ""
        text = getattr(self, "traceback_str", "")
        return f"{message}\n\n{text.rstrip()}" if text else message

    def __reduce__(self) -> tuple[Any, ...]:     # rebuilt on unpickle, dynamic class included
        return (_rebuild_task_error, (self.args[0] if self.args else "", self.cause_type,
                                      self.cause, self.function_name, self.traceback_str,
                                      self.site, self.pid))


@functools.cache
def _task_error_class(user_cls: type[BaseException]) -> type[TaskError]:
    if user_cls is None or issubclass(user_cls, TaskError) or not issubclass(user_cls, Exception):
        return TaskError
    try:    # TaskError.__init__ calls Exception.__init__ directly, never the user's __init__
        return type(f"TaskError({user_cls.__name__})", (TaskError, user_cls),
                    {"__module__": __name__, "__str__": TaskError.__str__,
                     "__reduce__": TaskError.__reduce__})
    except TypeError:                        # a final class or an incompatible layout
        return TaskError


def make_task_error(message: str, *, cause_type: type[BaseException] | None,
                    cause: BaseException | None = None, function_name: str = "",
                    traceback_str: str = "", site: str | None = None,
                    pid: int | None = None) -> TaskError:
    """Build a ``TaskError`` that is also an instance of ``cause_type`` where Python allows it."""
    cls = _task_error_class(cause_type) if isinstance(cause_type, type) else TaskError
    err = cls.__new__(cls)
    TaskError.__init__(err, message, cause=cause, function_name=function_name,
                       traceback_str=traceback_str, site=site, pid=pid, cause_type=cause_type)
    return err


def _rebuild_task_error(message: str, cause_type: type[BaseException] | None,
                        cause: BaseException | None, function_name: str, traceback_str: str,
                        site: str | None, pid: int | None) -> TaskError:
    return make_task_error(message, cause_type=cause_type, cause=cause,
                           function_name=function_name, traceback_str=traceback_str,
                           site=site, pid=pid)


class ActorDiedError(HeadraceError):
    """An actor's process ended; its pending and later calls fail with this error.

    Attributes:
        actor_name: The actor's name (its class name when it has none).
        pid: The process id, or None if it never started.
        exit_code: The exit code, or None.
        signal: The signal number that killed it, or None.
    """

    def __init__(self, message: str, *, actor_name: str = "", pid: int | None = None,
                 exit_code: int | None = None, signal: int | None = None) -> None:
        super().__init__(message)
        self.actor_name = actor_name
        self.pid = pid
        self.exit_code = exit_code
        self.signal = signal

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class WorkerCrashedError(HeadraceError):
    """A pooled task worker died while running a task (it is replaced)."""

    def __init__(self, message: str, *, pid: int | None = None, exit_code: int | None = None,
                 signal: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exit_code = exit_code
        self.signal = signal

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type, args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class GetTimeoutError(HeadraceError, TimeoutError):
    """``get`` (or ``result``) passed its deadline; the message counts the refs still pending."""


class ObjectLostError(HeadraceError):
    """A value is gone: its shared-memory segment was removed or its owner ended."""


class TaskCancelledError(HeadraceError):
    """The task was cancelled with ``hr.cancel`` before it could return."""


class DAGCompileError(HeadraceError, ValueError):
    """A DAG cannot be compiled: the message says which node, where it was bound and how to fix.

    Also a ``ValueError``, as Ray's graph errors are.
    """


class PipelineFullError(HeadraceError):
    """``execute()`` could not submit: too many results are held un-read by the caller."""


class ChannelClosedError(HeadraceError):
    """The channel was closed (the compiled DAG was torn down) while waiting on it."""


class ChannelTimeoutError(HeadraceError, TimeoutError):
    """A channel ``read``/``write`` did not complete within its ``timeout_s``."""


class SubmitTimeoutError(ChannelTimeoutError, GetTimeoutError):
    """``execute()`` made no progress for ``submit_timeout_s``: a stage holds the pipeline.

    The message names the stage(s) (process, pid, whether the OS reports them stopped) and the
    setting to change; nothing was submitted, and the DAG works again once the stage moves.
    """


class CompiledGetTimeoutError(GetTimeoutError, ChannelTimeoutError):
    """A wait for ``CompiledDAGRef``s passed its deadline (``get``, ``result``, ``wait``...).

    A ``GetTimeoutError`` (our one timeout rule) and a ``ChannelTimeoutError``, so Ray's
    ``except RayChannelTimeoutError`` catches it as it does in Ray.
    """


class ValueDecodeError(HeadraceError):
    """A channel took a value off its ring but could not rebuild it (``__cause__`` says why).

    The value is consumed: the next read returns the next value, so nothing shifts.
    """


class WouldBlock(HeadraceError):
    """A ``*_nowait`` call would have had to wait."""


class InternalError(HeadraceError):
    """An invariant of headrace itself broke: this is a bug in headrace; please report it."""


class RefsTypeError(TypeError, ValueError):
    """``get``/``wait`` got something other than a ref or a list of refs (a tuple, a generator,
    a list holding ``None``), or a ref was pickled on its own.

    Both a ``TypeError`` (Python's convention) and a ``ValueError`` (what Ray raises), so either
    ``except`` works.
    """


# Ray's names, for programs that run with ``import headrace as ray`` (same classes, other names).
RayError = HeadraceError
RaySystemError = HeadraceError
RayTaskError = TaskError
RayActorError = ActorDiedError
RayChannelError = ChannelClosedError
RayChannelTimeoutError = ChannelTimeoutError
RayCgraphCapacityExceeded = PipelineFullError

__all__ = [
    "RayActorError", "RayCgraphCapacityExceeded", "RayChannelError", "RayChannelTimeoutError",
    "RayError", "RaySystemError", "RayTaskError",
    "ActorDiedError", "ChannelClosedError", "ChannelTimeoutError", "CompiledGetTimeoutError",
    "DAGCompileError", "GetTimeoutError",
    "HeadraceError", "InternalError", "ObjectLostError", "PipelineFullError", "RefsTypeError",
    "RemoteTraceback", "SubmitTimeoutError", "TaskCancelledError", "TaskError", "ValueDecodeError",
    "WorkerCrashedError", "WouldBlock",
    "make_task_error",
]
