"""Errors about call arguments that cannot be serialized, naming the argument and the call.

In: a call's arguments, its description and function, and the encoder's TypeError. Out: a
message for the ``TypeError`` that ``.remote()`` raises, on the driver and in workers alike.
"""

from __future__ import annotations

from typing import Any

import cloudpickle

from ..refs.ref import Ref, capturing_refs


def bad_argument(args: tuple, kwargs: dict, call: str, fn: Any, exc: Exception) -> str:
    """Name the first argument of a call that cannot be serialized."""
    import inspect
    names: list[str] = []
    try:
        params = list(inspect.signature(fn).parameters) if fn is not None else []
    except (TypeError, ValueError):
        params = []
    if params and params[0] in ("self", "cls"):
        params = params[1:]
    for i in range(len(args)):
        names.append(f"argument {params[i]!r} (position {i})" if i < len(params)
                     else f"positional argument {i}")
    labelled = list(zip(names, args, strict=True)) + [
        (f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    deps: dict[str, Ref] = {}
    for label, value in labelled:
        try:
            with capturing_refs(deps):
                cloudpickle.dumps(value, protocol=5)
        except Exception as inner:      # noqa: BLE001
            return (f"{label} of {call} cannot be serialized: {type(value).__name__} "
                    f"({type(inner).__name__}: {inner}).\n\nPass something picklable, e.g. "
                    "create the object inside the task instead of passing it in.")
    return f"the arguments of {call} cannot be serialized: {exc}"
