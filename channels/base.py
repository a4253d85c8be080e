"""The channel contract shared by the in-process, shared-memory and socket channels.

In: one writer endpoint and ``n_readers`` reader endpoints of one channel. Out: every value the
writer writes reaches every reader, in order, exactly once.
Invariants:
- ``write`` blocks while any reader is a full ring (``capacity`` values) behind: backpressure,
  never a capacity error. ``read`` blocks until a value is there.
- ``timeout_s=None`` waits for ever, ``0`` does not wait; a timeout raises
  ``ChannelTimeoutError`` (also a builtin ``TimeoutError``); ``read_nowait`` raises ``WouldBlock``.
- ``close()`` on any endpoint, in any process, wakes every blocked reader and writer at once with
  ``ChannelClosedError``; values written before the close can still be read. ``mark_broken`` is
  the same with a reason (the runtime calls it when a peer process dies).
- A value that cannot be serialized raises ``TypeError`` at ``write`` and leaves the channel as it
  was.
"""

from __future__ import annotations

import abc
import numbers
from typing import Any

from .._config import FOREVER_S
from ..exceptions import ChannelClosedError, ChannelTimeoutError

WRITER = -1     # the role of a writer endpoint; readers have their index (0..n_readers-1)


def timeout_ns(timeout_s: float | None) -> int:
    """Nanoseconds to wait for ``timeout_s`` (``None``, inf or >= ``FOREVER_S``: -1, for ever);
    negative is an error."""
    if timeout_s is None:
        return -1
    kind = type(timeout_s)
    if (kind is not float and kind is not int and (
            kind is bool or not isinstance(timeout_s, numbers.Real))) or timeout_s != timeout_s:
        raise TypeError(f"timeout_s must be a number of seconds or None, not {timeout_s!r}")
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 (or None to wait for ever), not {timeout_s}")
    if kind is not float and kind is not int:   # numpy and other reals: a float, no overflow
        timeout_s = timeout_s if isinstance(timeout_s, numbers.Integral) else float(timeout_s)
    return -1 if timeout_s >= FOREVER_S else int(timeout_s * 1e9)


class Channel(abc.ABC):
    """One endpoint of a channel: the writer (``role == WRITER``) or reader number ``role``."""

    kind: str = "channel"
    role: int | None = None     # None: the creator's handle, neither writing nor reading

    @abc.abstractmethod
    def writer(self) -> Channel:
        """The writer endpoint (picklable where the channel crosses processes)."""

    @abc.abstractmethod
    def reader(self, index: int = 0) -> Channel:
        """Reader endpoint number ``index``."""

    @abc.abstractmethod
    def write(self, value: Any, timeout_s: float | None = None) -> None:
        """Send ``value`` to every reader; blocks while the slowest reader is a ring behind."""

    @abc.abstractmethod
    def read(self, timeout_s: float | None = None) -> Any:
        """The next value for this reader."""

    def has_value(self) -> bool:
        """Whether a read would not wait now; True when it cannot tell (a poller then tries)."""
        return True

    def read_nowait(self) -> Any:
        """The next value if there is one, else raise ``WouldBlock``."""
        from ..exceptions import WouldBlock
        try:
            return self.read(timeout_s=0)
        except ChannelTimeoutError:
            raise WouldBlock(f"no value is waiting in {self!r}") from None

    @abc.abstractmethod
    def close(self) -> None:
        """Close the channel for every endpoint, waking blocked peers (idempotent)."""

    def taken(self) -> int | None:
        """Reader: how many values this endpoint has taken off the channel so far (a read that
        raises may or may not have taken one: compare before and after); None if unknown."""
        return None

    def progress(self) -> tuple[int, tuple[int, ...]] | None:
        """``(values written, values each reader consumed)``, both counted modulo 2**32, where
        the channel can tell from any process; None where it cannot."""
        return None

    def abandon(self) -> None:
        """``close()`` for good: values no reader took yet are dropped and their memory freed
        now (a torn-down DAG will never read them). Values already read stay valid."""
        self.close()

    @abc.abstractmethod
    def mark_broken(self, reason: str) -> None:
        """Close the channel because of ``reason`` (a peer died); blocked peers wake with it."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether the channel was closed (by any endpoint) or marked broken."""

    @abc.abstractmethod
    def statistics(self) -> dict[str, Any]:
        """Counters of this endpoint: values and bytes moved, waits, spills, state."""

    def _check_role(self, want: str) -> None:
        if want == "writer" and self.role != WRITER:
            raise TypeError(f"{self!r} is not the writer endpoint; use channel.writer()")
        if want == "reader" and (self.role is None or self.role < 0):
            raise TypeError(f"{self!r} is not a reader endpoint; use channel.reader(i)")

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_error(channel: Channel, reason: str | None) -> ChannelClosedError:
    if reason:
        return ChannelClosedError(f"{channel!r} is broken: {reason}")
    return ChannelClosedError(f"{channel!r} was closed")


def timeout_error(channel: Channel, op: str, timeout_s: float | None) -> ChannelTimeoutError:
    what = "no value arrived" if op == "read" else "a reader is a full ring behind"
    return ChannelTimeoutError(f"{op} on {channel!r} timed out after {timeout_s} s: {what}")
