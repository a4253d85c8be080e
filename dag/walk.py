"""The one walker of values nested in containers (torch.fx's ``map_aggregate``).

In: any value, a predicate saying which objects are leaves (DAG nodes, ``NodeArg``s, refs), and
for ``map_leaves`` the function that replaces each leaf. Out: the leaves in order, or the value
rebuilt around the replaced leaves.
Invariants: one list of containers, ``CONTAINERS``: lists, tuples (a namedtuple keeps its type),
dict values, sets and frozensets, subclasses keeping their type; anything else is opaque (a leaf
hidden inside another object is not found: the compiler says so). Every container holding a leaf
is rebuilt as a new object, so a callee that mutates its argument never changes a template.
Every pass that looks inside arguments uses these: bind's node search, the IR's templates and
their filling, fusion, renumbering, ``execute()``'s and ``gather``'s ref search.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

CONTAINERS = (list, tuple, dict, set, frozenset)
#: ``map_leaves``: a leaf replaced by this is left out of its container (``gather(errors="skip")``).
DROP = object()


def leaves(obj: Any, is_leaf: Callable[[Any], bool]) -> Iterator[Any]:
    """The leaves inside ``obj`` (itself, if it is one), depth first, in container order."""
    if is_leaf(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from leaves(value, is_leaf)
    elif isinstance(obj, CONTAINERS):
        for value in obj:
            yield from leaves(value, is_leaf)


def has_leaf(obj: Any, is_leaf: Callable[[Any], bool]) -> bool:
    """Whether ``obj`` is or holds a leaf."""
    return next(leaves(obj, is_leaf), DROP) is not DROP


def map_leaves(obj: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """``obj`` with each leaf ``x`` replaced by ``fn(x)`` (``DROP``: left out)."""
    if is_leaf(obj):
        return fn(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            new = map_leaves(value, fn, is_leaf)
            if new is not DROP:
                out[key] = new
        if type(obj) is dict:
            return out
        rebuilt = copy.copy(obj)        # keeps a subclass's state (defaultdict's factory)
        rebuilt.clear()
        rebuilt.update(out)
        return rebuilt
    if isinstance(obj, CONTAINERS):
        items = [new for new in (map_leaves(x, fn, is_leaf) for x in obj) if new is not DROP]
        kind = type(obj)
        if kind is list or kind is tuple or kind is set or kind is frozenset:
            return kind(items)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):     # a namedtuple
            return kind(*items)
        try:
            return kind(items)
        except TypeError:                   # a subclass with another constructor
            return next(base for base in CONTAINERS if isinstance(obj, base))(items)
    return obj
