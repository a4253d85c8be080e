"""Ray's old spelling: ``as_future(ref)`` is ``ref.as_future()``."""

from __future__ import annotations

import asyncio

from ..runtime.refs.ref import Ref


def as_future(ref: Ref) -> asyncio.Future:
    """An asyncio future on the running loop that completes with ``ref``."""
    if not isinstance(ref, Ref):
        raise TypeError(f"as_future() expects a ref, got {type(ref).__name__}")
    return ref.as_future()
