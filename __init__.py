"""headrace: a compiled static-DAG execution engine for Python, Ray-compatible.

``import headrace as hr``: ``@hr.remote`` functions and actors, ``hr.put/get/wait/gather``,
refs that are futures, and (with the DAG work) ``bind()`` + ``experimental_compile()``.
Re-exports only; importing this module starts nothing and loads no compiled code.
"""

# NOTE: absolute imports: pytest may import this file on its own, as a module named __init__,
# when the checkout's folder is no valid package name (headrace-main); it then re-exports the
# installed package instead of failing on a relative import.
from headrace import exceptions
from headrace.dag import InputNode, MultiOutputNode
from headrace.exceptions import (ActorDiedError, ChannelClosedError, DAGCompileError,
                                 GetTimeoutError, HeadraceError, ObjectLostError,
                                 PipelineFullError, SubmitTimeoutError, TaskCancelledError,
                                 TaskError, WorkerCrashedError)
from headrace.runtime.api import (cancel, gather, get, get_actor, init, is_initialized, kill, put,
                                  shutdown, wait)
from headrace.runtime.compiled.driver import CompiledDAG
from headrace.runtime.refs.compiled_ref import CompiledDAGFuture, CompiledDAGRef
from headrace.runtime.refs.ref import ObjectRef, Ref
from headrace.runtime.remote import ActorClass, ActorHandle, RemoteFunction, method, remote

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorDiedError", "ActorHandle", "ChannelClosedError", "CompiledDAG",
    "CompiledDAGFuture", "CompiledDAGRef", "DAGCompileError", "InputNode", "MultiOutputNode",
    "GetTimeoutError", "HeadraceError", "ObjectLostError", "ObjectRef", "PipelineFullError",
    "Ref", "RemoteFunction", "SubmitTimeoutError", "TaskCancelledError", "TaskError",
    "WorkerCrashedError", "cancel", "exceptions", "gather", "get", "get_actor", "init", "is_initialized", "kill", "method", "put",
    "remote", "shutdown", "wait",
]
