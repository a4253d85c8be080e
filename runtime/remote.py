"""``@hr.remote``: remote functions, actor classes, actor handles and their methods.

In: a user's function or class and options. Out: ``RemoteFunction`` / ``ActorClass`` whose
``.remote()`` submits to the runtime and returns ``ObjectRef``s / an ``ActorHandle``.
Invariants: a function or class is cloudpickled once, at its first ``.remote()``; options are
checked when given, so a typo fails where it was written; a method the class lacks raises
``AttributeError`` before anything is submitted.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from collections.abc import Callable
from typing import Any

from . import session
from .procs.records import ActorRecord
from .refs.ref import note_handle

_FUNCTION_OPTIONS = {"num_returns": 1, "num_cpus": 1.0, "name": None, "max_retries": 0}
#: max_concurrency None: Ray's default, 1000 for an actor with ``async def`` methods, else 1
#: host, resources: where on a Dask cluster it runs (runtime/hosts; an error without one)
_ACTOR_OPTIONS = {"num_cpus": 0.0, "name": None, "max_concurrency": None, "max_restarts": 0,
                  "host": None, "resources": None, "get_if_exists": False,
                  "max_task_retries": 0}
_ids = itertools.count(1)


def _runtime() -> Any:
    return session.current()


def _check_options(kind: str, allowed: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for a {kind}; "
                         f"valid options are {', '.join(sorted(allowed))}")
    opts = {**allowed, **given}
    for key in ("num_returns", "max_concurrency"):
        if key in given and (not isinstance(opts[key], int) or opts[key] < 1):
            raise ValueError(f"{key} must be an int >= 1, got {opts[key]!r}")
    for key in ("max_retries", "max_restarts"):
        if key in given and (not isinstance(opts[key], int) or opts[key] < 0):
            raise ValueError(f"{key} must be an int >= 0, got {opts[key]!r}")
    if "num_cpus" in given and (not isinstance(opts["num_cpus"], (int, float))
                                or opts["num_cpus"] < 0):
        raise ValueError(f"num_cpus must be a number >= 0, got {opts['num_cpus']!r}")
    if opts["name"] is not None and not isinstance(opts["name"], str):
        raise TypeError(f"name must be a str, got {type(opts['name']).__name__}")
    if opts.get("host") is not None and not isinstance(opts["host"], str):
        raise TypeError(f"host must be a str (a Dask worker's address, name, IP or hostname), "
                        f"got {type(opts['host']).__name__}")
    if "max_task_retries" in given and (not isinstance(opts["max_task_retries"], int) or
                                        opts["max_task_retries"] < -1):
        raise ValueError(f"max_task_retries must be an int >= -1 (-1: without limit), got "
                         f"{opts['max_task_retries']!r}")
    if opts.get("get_if_exists") and opts["name"] is None:
        raise ValueError("get_if_exists=True (or get_or_create) needs the actor's name: "
                         "Cls.options(name='...', get_if_exists=True).remote(...)")
    res = opts.get("resources")
    if res is not None and (not isinstance(res, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v >= 0 for k, v in res.items())):
        raise ValueError(f"resources must be a dict of names to numbers >= 0 (Dask worker "
                         f"resources), got {res!r}")
    return opts


class FunctionBody:
    """A function shared by a RemoteFunction and its ``.options()`` copies; pickled once."""

    __slots__ = ("fn", "name", "fn_id", "_blob")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self.fn_id = f"f{next(_ids)}"
        self._blob: bytes | None = None

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            from ..channels.serialization import dumps_function
            self._blob = dumps_function(self.fn)
        return self._blob


class RemoteFunction:
    """A function made remote: ``f.remote(*args)`` runs it on a pooled worker process."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any] | None = None,
                 body: FunctionBody | None = None) -> None:
        self._body = body or FunctionBody(fn)
        self._options = _check_options("remote function", _FUNCTION_OPTIONS, options or {})
        functools.update_wrapper(self, fn)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a call; returns an ObjectRef (a list of them when ``num_returns > 1``)."""
        rt = _runtime()
        _check_cpus(rt, self._options["num_cpus"], self._body.name)
        refs = rt.submit_task(self._body, self._options, args, kwargs)
        return refs[0] if self._options["num_returns"] == 1 else refs

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        """A DAG node calling this function; args may be nodes, constants, or both nested.
        With ``num_returns=n > 1``: a tuple of n nodes, one per return value."""
        from ..dag.nodes import FunctionNode, check_signature
        check_signature(self._body.fn, args, kwargs, self._body.name)
        return FunctionNode(self._body, self._options, args, kwargs).returns()

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with some options changed (``num_returns``, ``num_cpus``, ``name``, ...)."""
        return RemoteFunction(self._body.fn, {**self._given(), **options}, self._body)

    def _given(self) -> dict[str, Any]:
        return {k: v for k, v in self._options.items() if v != _FUNCTION_OPTIONS[k]}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self._body.name!r} cannot be called directly; "
                        f"use {self._body.name}.remote(...) instead")

    def __repr__(self) -> str:
        return f"<RemoteFunction {self._body.name}>"


def _check_cpus(rt: Any, num_cpus: float, name: str) -> None:
    if num_cpus > rt.num_cpus:
        raise ValueError(f"{name} asks for num_cpus={num_cpus:g} but the runtime has "
                         f"{rt.num_cpus} CPUs, so it could never run.\n\nLower num_cpus or "
                         "hr.init(num_cpus=...) with more.")


class ActorBody:
    """An actor class shared by an ActorClass and its ``.options()`` copies; pickled once."""

    __slots__ = ("cls", "name", "methods", "_blob")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.methods = {name: getattr(fn, "__headrace_num_returns__", 1)
                        for name, fn in inspect.getmembers(cls, callable)
                        if not name.startswith("__") or name == "__call__"}
        self._blob: bytes | None = None

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            from ..channels.serialization import dumps_function
            self._blob = dumps_function(self.cls)
        return self._blob


class ActorClass:
    """A class made remote: ``Cls.remote(*args)`` starts an actor in its own process."""

    def __init__(self, cls: type, options: dict[str, Any] | None = None,
                 body: ActorBody | None = None) -> None:
        self._body = body or ActorBody(cls)
        self._options = _check_options("actor class", _ACTOR_OPTIONS, options or {})
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Start the actor; calls may be submitted at once (they wait for it to start)."""
        rt = _runtime()
        return ActorHandle(rt.create_actor(self._body, self._options, args, kwargs), rt)

    def get_or_create(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """The live actor named by ``.options(name=...)``, or a new one made with these
        arguments (Ray's; the same as ``.options(get_if_exists=True).remote(...)``). An existing
        actor keeps its own arguments."""
        return self.options(get_if_exists=True).remote(*args, **kwargs)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        """Ray's ``ClassNode``: an actor made when a DAG using it first runs or compiles;
        bind its methods with ``node.method.bind(...)``."""
        from ..dag.nodes import ClassNode

        def create() -> tuple[ActorHandle, Any]:
            handle = self.remote(*args, **kwargs)
            return handle, handle._record.aid
        return ClassNode(self._body.name, create, self._body.methods, self._body.cls)

    def options(self, **options: Any) -> ActorClass:
        given = {k: v for k, v in self._options.items() if v != _ACTOR_OPTIONS[k]}
        return ActorClass(self._body.cls, {**given, **options}, self._body)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._body.name!r} cannot be instantiated directly; "
                        f"use {self._body.name}.remote(...) instead")

    def __repr__(self) -> str:
        return f"<ActorClass {self._body.name}>"


class ActorHandle:
    """A handle to a live actor; ``handle.method.remote(...)`` calls it in submission order.

    When the last handle to an unnamed actor is collected, the actor finishes the calls already
    submitted and exits. Named actors live until ``hr.kill`` or ``hr.shutdown``.
    """

    def __init__(self, record: ActorRecord, runtime: Any) -> None:
        self._record = record
        record.handles += 1
        if record.handles == 1:
            runtime.hold_actor(record)
        self._finalizer = weakref.finalize(self, _drop_handle, weakref.ref(record),
                                           weakref.ref(runtime))

    def __getattr__(self, name: str) -> ActorMethod:
        body = self._record.body
        if name.startswith("_") and name != "__call__" or name not in body.methods:
            raise AttributeError(
                f"actor class {body.name!r} has no method {name!r}; it has "
                f"{', '.join(sorted(m for m in body.methods if not m.startswith('_'))) or 'none'}")
        return ActorMethod(self, name, body.methods[name])

    def __repr__(self) -> str:
        r = self._record
        return f"<ActorHandle {r.label}{f' name={r.name!r}' if r.name else ''} id={r.aid}>"

    def __reduce__(self) -> Any:
        """Handles travel (arguments, return values, actor state): the sender holds the actor
        until the receiver has counted its own handle (``note_handle``)."""
        note_handle(self)
        r = self._record
        return _handle_from_wire, (r.aid, r.name, r.label, r.body.name, dict(r.body.methods))


def _handle_from_wire(aid: str, name: str | None, label: str, cls_name: str,
                      methods: dict[str, int]) -> ActorHandle:
    rt = _runtime()
    return ActorHandle(rt.actor_record(aid, name, label, cls_name, methods), rt)


def _drop_handle(record_ref: weakref.ref, runtime_ref: weakref.ref) -> None:
    record, rt = record_ref(), runtime_ref()
    if record is None:
        return
    record.handles -= 1
    if record.handles == 0 and rt is not None:
        # NOTE: garbage collection runs this on any thread, at any point, also while that
        # thread holds the runtime's lock or another thread waits for it: hand it over, never
        # take the lock here
        rt.release_actor_soon(record)


class ActorMethod:
    """One method of one actor: ``.remote(...)`` and ``.options(num_returns=...)``."""

    __slots__ = ("_handle", "_name", "_num_returns")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        record = self._handle._record
        fn = getattr(record.body.cls, self._name, None)
        refs = _runtime().submit_call(record, self._name, self._num_returns, args, kwargs, fn)
        return refs[0] if self._num_returns == 1 else refs

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        """A DAG node calling this method of this actor (in submission order, like .remote).
        With ``num_returns=n > 1``: a tuple of n nodes, one per return value."""
        from ..dag.nodes import ClassMethodNode, check_method_signature
        record = self._handle._record
        check_method_signature(record.body.cls, self._name, args, kwargs,
                               f"{record.label}.{self._name}")
        return ClassMethodNode(self._handle, record.aid, record.label, self._name,
                               self._num_returns, args, kwargs).returns()

    def options(self, *, num_returns: int | None = None) -> ActorMethod:
        nret = self._num_returns if num_returns is None else num_returns
        _check_options("actor method", {"num_returns": 1, "name": None},
                       {"num_returns": nret})
        return ActorMethod(self._handle, self._name, nret)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor method {self._name!r} cannot be called directly; "
                        f"use .{self._name}.remote(...) instead")


def remote(*args: Any, **options: Any) -> Any:
    """Make a function or class remote: ``@hr.remote`` or ``@hr.remote(num_cpus=2)``."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@hr.remote takes a function or class, or only keyword options: "
                        "@hr.remote(num_cpus=1)")
    return lambda target: _make_remote(target, options)


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    if inspect.isclass(target):
        return ActorClass(target, options)
    if callable(target):
        return RemoteFunction(target, options)
    raise TypeError(f"@hr.remote expects a function or a class, got {type(target).__name__}")


def method(*, num_returns: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare an actor method's options: ``@hr.method(num_returns=2)``."""
    _check_options("actor method", {"num_returns": 1, "name": None}, {"num_returns": num_returns})

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__headrace_num_returns__ = num_returns     # type: ignore[attr-defined]
        return fn
    return mark
