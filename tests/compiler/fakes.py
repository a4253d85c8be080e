"""Test doubles for compiler tests: actor handles with no process behind them."""

from __future__ import annotations

import sys
from typing import Any

from headrace.dag import ClassMethodNode


class _Counter:
    """The local instance behind a FakeActor: small arithmetic methods."""

    def __init__(self, label: str) -> None:
        self.label = label

    def inc(self, x: Any, by: int = 1) -> Any:
        return x + by

    def double(self, x: Any) -> Any:
        return x * 2

    def add(self, x: Any, y: Any) -> Any:
        return x + y

    def pair(self, x: Any, y: Any) -> tuple[Any, Any]:
        return (x, y)


class FakeActor:
    """An actor handle with no process behind it: ``a.inc.bind(x)`` makes a real node."""

    def __init__(self, label: str, alive: bool = True) -> None:
        self.label = label
        self.alive = alive
        self.instance = _Counter(label)

    def __getattr__(self, method: str) -> _FakeMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _FakeMethod(self, method)


class _FakeMethod:
    def __init__(self, actor: FakeActor, method: str, num_returns: int = 1) -> None:
        self.actor, self.method, self.num_returns = actor, method, num_returns

    def options(self, *, num_returns: int) -> _FakeMethod:
        return _FakeMethod(self.actor, self.method, num_returns)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1)           # the test's line, as bind() records for real actors
        return ClassMethodNode(self.actor, self.actor.label, self.actor.label, self.method,
                               self.num_returns, args, kwargs,
                               site=f"{caller.f_code.co_filename}:{caller.f_lineno}").returns()
