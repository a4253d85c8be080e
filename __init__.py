"""headrace: a compiled static-DAG execution engine for Python, Ray-compatible.

``import headrace as hr``: ``@hr.remote`` functions and actors, ``hr.put/get/wait/gather``,
refs that are futures, and (with the DAG work) ``bind()`` + ``experimental_compile()``.
Re-exports only; importing this module starts nothing and loads no compiled code.
"""

from . import exceptions
from .exceptions import (ActorDiedError, ChannelClosedError, DAGCompileError, GetTimeoutError,
                         HeadraceError, ObjectLostError, PipelineFullError, SubmitTimeoutError,
                         TaskCancelledError, TaskError, WorkerCrashedError)
from .runtime.api import (cancel, gather, get, get_actor, init, is_initialized, kill, put,
                          shutdown, wait)
from .dag import InputNode, MultiOutputNode
from .runtime.compiled import CompiledDAG
from .runtime.compiled_ref import CompiledDAGFuture, CompiledDAGRef
from .runtime.refs import ObjectRef, Ref
from .runtime.remote import ActorClass, ActorHandle, RemoteFunction, method, remote

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorDiedError", "ActorHandle", "ChannelClosedError", "CompiledDAG",
    "CompiledDAGFuture", "CompiledDAGRef", "DAGCompileError", "InputNode", "MultiOutputNode",
    "GetTimeoutError", "HeadraceError", "ObjectLostError", "ObjectRef", "PipelineFullError",
    "Ref", "RemoteFunction", "SubmitTimeoutError", "TaskCancelledError", "TaskError", "WorkerCrashedError", "cancel",
    "exceptions", "gather", "get", "get_actor", "init", "is_initialized", "kill", "method", "put",
    "remote", "shutdown", "wait",
]
