"""DAG nodes: what ``bind()`` returns in user code, before anything is traced or compiled.

In: ``f.bind(...)``, ``actor.method.bind(...)``, ``InputNode()``, ``MultiOutputNode([...])``.
Out: ``DAGNode`` objects that remember their arguments (other nodes, constants, nested in lists,
tuples and dicts) and their bind site (``file:line``); ``trace()`` turns them into a ``DagIR``.
Invariants: nodes are never changed after they are made; ``dag`` imports nothing above it. The
runtime registers the entry points that need processes (``experimental_compile``, ``execute``)
through ``register``, so ``dag`` stays at the bottom of the layers.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..exceptions import DAGCompileError
from .walk import leaves

_ids = itertools.count()
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Frames in these files are headrace's own: a bind site (and a remote traceback) starts at the
#: first frame outside them.
INTERNAL_DIRS = tuple(os.path.join(_PACKAGE_DIR, d) + os.sep
                      for d in ("dag", "compiler", "runtime", "channels", "experimental"))
#: Entry points the runtime provides: "compile" (node, options) and "execute" (node, args).
_ENTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, fn: Callable[..., Any]) -> None:
    """For the runtime: provide ``compile`` or ``execute`` for every node."""
    _ENTRY[name] = fn


def _entry(name: str) -> Callable[..., Any]:
    fn = _ENTRY.get(name)
    if fn is None:      # NOTE: importing any headrace module runs headrace/__init__, which does
        from ..exceptions import InternalError
        raise InternalError(f"headrace.runtime did not register {name!r}; this is a bug in "
                            "headrace; please report it")
    return fn


def bind_site() -> str:
    """``file:line`` of the innermost caller outside headrace itself (where the user bound)."""
    frame = sys._getframe(1)
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(INTERNAL_DIRS):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def check_signature(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str,
                    method: bool = False) -> None:
    """TypeError at ``bind()`` (as Ray) if ``fn`` cannot take these arguments (nodes stand for
    values); ``method``: ``fn`` is a class's function, called with the instance first."""
    import inspect
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):         # a builtin or C function: nothing to check
        return
    try:
        signature.bind(*((None,) if method else ()), *args, **kwargs)
    except TypeError as exc:
        shown = signature.replace(parameters=list(signature.parameters.values())[1:]) \
            if method and signature.parameters else signature
        raise TypeError(f"{name}.bind() at {bind_site()}: {exc}. The function {name!r} has "
                        f"the signature {shown}.\n\nBind it with the arguments it takes (nodes "
                        "stand for the values they will have).") from None


def check_method_signature(cls: type | None, method: str, args: tuple[Any, ...],
                           kwargs: dict[str, Any], name: str) -> None:
    """``check_signature`` for method ``method`` of actor class ``cls`` (if it has one)."""
    import inspect
    fn = getattr(cls, method, None) if cls is not None else None
    if fn is not None:
        static = isinstance(inspect.getattr_static(cls, method), (staticmethod, classmethod))
        check_signature(fn, args, kwargs, name, method=not static)


class DAGNode:
    """A node of a DAG being bound. ``experimental_compile()`` and ``execute()`` start from here.

    Subclasses set ``_name`` (for messages and ``as_text()``) and keep their arguments in
    ``_args``/``_kwargs``; ``_upstream()`` lists the nodes they depend on. Its own attributes
    are private: ``inp.name``, ``inp.args`` and the like are parts of the input, not of the node.
    """

    __slots__ = ("_args", "_kwargs", "_site", "_uid")

    def __init__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                 site: str | None = None) -> None:
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._site = site or bind_site()
        self._uid = next(_ids)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _upstream(self) -> list[DAGNode]:
        """The nodes among this node's arguments, nested ones included, in argument order."""
        return list(leaves((self._args, self._kwargs), _is_node))

    def experimental_compile(self, **options: Any) -> Any:
        """Compile this DAG to actor pipelines over channels; returns a ``CompiledDAG``.

        Options (DESIGN 2): ``max_inflight_executions``, ``buffer_size_bytes``,
        ``submit_timeout_s``, ``max_buffered_results``, ``channel``, ``sync``, ``profile``
        (True, or a path: teardown writes a Chrome trace of every step there; True picks
        ``headrace-trace-<pid>-<n>.json`` in the current directory, see ``profile_path``).
        """
        return _entry("compile")(self, options)

    def compile(self, **options: Any) -> Any:
        """Same as ``experimental_compile``."""
        return _entry("compile")(self, options)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Run this DAG once through ordinary tasks and actor calls, without compiling.

        Returns an ``ObjectRef`` (a list of them for a ``MultiOutputNode``).
        """
        return _entry("execute")(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} bound at {self._site}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"DAG node {self._name!r} (bound at {self._site}) cannot be pickled or passed to "
            ".remote(); nodes only make sense as arguments of other bind() calls.\n\n"
            "Compile the DAG with dag.experimental_compile() and pass values to execute().")


def _is_node(obj: Any) -> bool:
    return isinstance(obj, DAGNode)


class InputNode(DAGNode):
    """The DAG's input: the arguments of ``execute(*args, **kwargs)``.

    ``inp`` itself is the single positional argument; ``inp[0]`` is the first positional one;
    ``inp.key`` and ``inp["key"]`` are the keyword argument ``key`` (or, with one positional
    argument and no such keyword, its attribute or item ``key``). Use it as a context manager::

        with InputNode() as inp:
            dag = model.forward.bind(prep.bind(inp[0]), inp.temperature)
    """

    __slots__ = ("_bound",)

    def __init__(self) -> None:
        super().__init__()
        self._bound: list[DAGNode] = []     # calls bound inside its `with` (dead-end check)

    @property
    def _name(self) -> str:
        return "input"

    def __enter__(self) -> InputNode:
        _binding.__dict__.setdefault("stack", []).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _binding.__dict__.get("stack")
        if stack and stack[-1] is self:
            stack.pop()

    def __getitem__(self, key: int | str) -> InputAttributeNode:
        return InputAttributeNode(self, key, "item")

    def __getattr__(self, key: str) -> InputAttributeNode:
        if key.startswith("_"):     # copy, pickle and friends probe dunders: no node for them
            raise AttributeError(key)
        return InputAttributeNode(self, key, "attr")


class InputAttributeNode(DAGNode):
    """One part of the input: ``inp[0]``, ``inp.key`` or ``inp["key"]`` (also nested)."""

    __slots__ = ("_key", "_access")

    def __init__(self, parent: DAGNode, key: int | str, access: str) -> None:
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(f"an input can be indexed by an int (positional argument) or a str "
                            f"(keyword argument), not {type(key).__name__}: {key!r}")
        super().__init__((parent,))
        self._key = key
        self._access = access

    @property
    def _name(self) -> str:
        parent = self._args[0]
        return f"{parent._name}.{self._key}" if self._access == "attr" else \
            f"{parent._name}[{self._key!r}]"

    def __getitem__(self, key: int | str) -> InputAttributeNode:
        return InputAttributeNode(self, key, "item")

    def __getattr__(self, key: str) -> InputAttributeNode:
        if key.startswith("_"):
            raise AttributeError(key)
        return InputAttributeNode(self, key, "attr")


class FunctionNode(DAGNode):
    """``f.bind(*args, **kwargs)`` of a remote function.

    ``body`` is opaque to the compiler apart from ``name`` and ``blob`` (the pickled function).
    """

    __slots__ = ("body", "num_returns", "options")

    def __init__(self, body: Any, options: dict[str, Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], site: str | None = None) -> None:
        super().__init__(args, kwargs, site)
        self.num_returns = _num_returns(options.get("num_returns", 1), body.name, self._site)
        _record_binding(self)
        self.body = body
        self.options = dict(options)

    @property
    def _name(self) -> str:
        return self.body.name

    def returns(self) -> DAGNode | tuple[ItemNode, ...]:
        """What ``bind()`` gives: this node, or one ``ItemNode`` per return value."""
        return _returns(self)


class ClassMethodNode(DAGNode):
    """``actor.method.bind(*args, **kwargs)``: a call of a method of a live actor.

    ``actor`` is the handle (opaque to the compiler), ``actor_key`` identifies its process and
    ``actor_label`` names it in messages. Bound on a ``ClassNode``, both are None until the DAG
    is traced to run or compile (``resolve_actor`` creates the actor then).
    """

    __slots__ = ("actor", "actor_key", "actor_label", "class_node", "method", "num_returns")

    def __init__(self, actor: Any, actor_key: Any, actor_label: str, method: str,
                 num_returns: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                 site: str | None = None, class_node: ClassNode | None = None) -> None:
        super().__init__(args, kwargs, site)
        self.num_returns = _num_returns(num_returns, f"{actor_label}.{method}", self._site)
        _record_binding(self)
        self.actor = actor
        self.actor_key = actor_key
        self.actor_label = actor_label
        self.method = method
        self.class_node = class_node

    @property
    def _name(self) -> str:
        return f"{self.actor_label}.{self.method}"

    def returns(self) -> DAGNode | tuple[ItemNode, ...]:
        """What ``bind()`` gives: this node, or one ``ItemNode`` per return value."""
        return _returns(self)

    def resolve_actor(self) -> None:
        """Bound on a ClassNode: create its actor now (once) and point at it."""
        if self.actor is None and self.class_node is not None:
            self.actor, self.actor_key = self.class_node.actor()


class ItemNode(DAGNode):
    """Return value ``index`` of a call bound with ``num_returns > 1``: what ``bind()`` gives
    for it, one node per value (``a, b = actor.split.options(num_returns=2).bind(x)``).

    Each can be used on its own (an output, an argument of other calls; one may be unused). An
    exception of the call is the value of every one of them.
    """

    __slots__ = ("_index",)

    def __init__(self, call: DAGNode, index: int) -> None:
        super().__init__((call,), site=call._site)
        self._index = index

    @property
    def _name(self) -> str:
        return f"{self._args[0]._name}[{self._index}]"


def _returns(call: Any) -> DAGNode | tuple[ItemNode, ...]:
    if call.num_returns == 1:
        return call
    return tuple(ItemNode(call, i) for i in range(call.num_returns))


class ClassNode:
    """``ActorClass.bind(*args, **kwargs)`` (Ray's ClassNode): an actor made when a DAG that
    uses it first runs or compiles. ``node.method.bind(...)`` binds its methods.

    ``create()`` (the runtime's) makes the actor and returns ``(handle, actor_key)``;
    ``methods`` maps each method to its declared ``num_returns``.
    """

    __slots__ = ("_actor", "_cls", "_create", "_label", "_lock", "_methods", "_site")

    def __init__(self, label: str, create: Callable[[], tuple[Any, Any]],
                 methods: dict[str, int] | None = None, cls: type | None = None) -> None:
        self._label = label
        self._create = create
        self._methods = dict(methods or {})
        self._cls = cls
        self._actor: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._site = bind_site()

    def actor(self) -> tuple[Any, Any]:
        with self._lock:
            if self._actor is None:
                self._actor = self._create()
            return self._actor

    def __getattr__(self, method: str) -> _ClassNodeMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _ClassNodeMethod(self, method, self._methods.get(method, 1))

    def __repr__(self) -> str:
        state = "created" if self._actor is not None else "not created yet"
        return f"<ClassNode {self._label} bound at {self._site}, {state}>"


class _ClassNodeMethod:
    __slots__ = ("_method", "_node", "_num_returns")

    def __init__(self, node: ClassNode, method: str, num_returns: int) -> None:
        self._node, self._method, self._num_returns = node, method, num_returns

    def bind(self, *args: Any, **kwargs: Any) -> DAGNode | tuple[ItemNode, ...]:
        check_method_signature(self._node._cls, self._method, args, kwargs,
                               f"{self._node._label}.{self._method}")
        return ClassMethodNode(None, None, self._node._label, self._method, self._num_returns,
                               args, kwargs, class_node=self._node).returns()

    def options(self, *, num_returns: int | None = None) -> _ClassNodeMethod:
        """``node.method.options(num_returns=2).bind(x)``, as on an actor handle."""
        return _ClassNodeMethod(self._node, self._method,
                                self._num_returns if num_returns is None else num_returns)


class MultiOutputNode(DAGNode):
    """Several outputs: ``execute()`` returns one ref per node, in this order."""

    __slots__ = ()

    def __init__(self, outputs: list[DAGNode] | tuple[DAGNode, ...]) -> None:
        site = bind_site()
        if not isinstance(outputs, (list, tuple)) or not outputs:   # also a ValueError, as Ray
            raise DAGCompileError(f"MultiOutputNode (at {site}) takes a non-empty list of "
                                  f"nodes, got {outputs!r:.80}\n\nWrap one node in a list: "
                                  "MultiOutputNode([node]).")
        for i, node in enumerate(outputs):
            if not isinstance(node, DAGNode) or isinstance(node, MultiOutputNode):
                raise DAGCompileError(
                    f"MultiOutputNode (at {site}): output {i} is {type(node).__name__}, not a "
                    "node made by bind() or an InputNode.\n\nPass the nodes whose values "
                    "execute() should return.")
        super().__init__(tuple(outputs), site=site)

    @property
    def _name(self) -> str:
        return "output"


_binding = threading.local()     # .stack: the InputNodes whose `with` blocks are open


def _record_binding(node: DAGNode) -> None:
    stack = getattr(_binding, "stack", None)
    if stack:
        stack[-1]._bound.append(node)


def _num_returns(num_returns: Any, name: str, site: str) -> int:
    if type(num_returns) is not int or num_returns < 1:
        raise DAGCompileError(
            f"{name} (bound at {site}) has num_returns={num_returns!r}; it must be an int >= 1"
            ".\n\nBind with num_returns=1 (one value) or the number of values the call "
            "returns (a tuple or list of that length).")
    return num_returns
