"""Deadline: one point in time shared by every wait of one call.

In: a user's ``timeout`` (None, 0 or a positive number of seconds). Out: ``Deadline``.
Invariants: ``get(timeout=...)`` turns its timeout into a Deadline on its first line and passes only
the Deadline inward, so a call that waits on many refs has one deadline, not one per ref. The clock
is an argument, so tests drive it by hand (``FakeClock``).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable

from ..._config import FOREVER_S

Clock = Callable[[], float]


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """Validate a user's timeout: None or a real number >= 0; inf (or >= ``FOREVER_S``, about
    31 years) means no deadline and becomes None, so no wait overflows."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} must be None or a number of seconds, "
                        f"got {type(timeout).__name__}")
    # ints compare exactly (float() of a huge int overflows); other reals become a float first
    # (comparing a numpy float16 with FOREVER_S would overflow in its own type)
    value = timeout if isinstance(timeout, numbers.Integral) else float(timeout)
    if (type(value) is float and math.isnan(value)) or value < 0:
        raise ValueError(f"{name} must be None or >= 0, got {timeout}")
    return None if value >= FOREVER_S else float(value)


class Deadline:
    """A point in time after which waits give up. ``Deadline(None)`` never expires."""

    __slots__ = ("timeout_s", "_at", "_clock")

    def __init__(self, timeout_s: float | None, clock: Clock = time.monotonic) -> None:
        self.timeout_s = check_timeout(timeout_s)
        self._clock = clock
        self._at = None if self.timeout_s is None else clock() + self.timeout_s

    @property
    def is_forever(self) -> bool:
        return self._at is None

    def remaining_s(self) -> float | None:
        """Seconds left (>= 0), or None for no deadline."""
        if self._at is None:
            return None
        return max(0.0, self._at - self._clock())

    def expired(self) -> bool:
        return self._at is not None and self._clock() >= self._at

    def __repr__(self) -> str:
        return f"Deadline(timeout_s={self.timeout_s}, remaining_s={self.remaining_s()})"


class FakeClock:
    """A clock that moves only when told: ``clock.advance(1.5)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
