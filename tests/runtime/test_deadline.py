"""Deadline: one point in time per call, on an injectable clock (no sleeping)."""

from __future__ import annotations

import pytest

from headrace.runtime.refs.deadline import Deadline, check_timeout


def test_remaining_counts_down_on_the_fake_clock(fake_clock) -> None:
    d = Deadline(2.0, clock=fake_clock)
    assert d.remaining_s() == 2.0 and not d.expired()
    fake_clock.advance(1.5)
    assert d.remaining_s() == 0.5
    fake_clock.advance(1.0)
    assert d.remaining_s() == 0.0 and d.expired()


def test_none_never_expires(fake_clock) -> None:
    d = Deadline(None, clock=fake_clock)
    fake_clock.advance(1e9)
    assert d.remaining_s() is None and not d.expired() and d.is_forever


def test_zero_is_already_expired(fake_clock) -> None:
    assert Deadline(0, clock=fake_clock).expired()


@pytest.mark.parametrize("bad, error, message", [
    (-1, ValueError, r"^timeout must be None or >= 0, got -1$"),
    (float("nan"), ValueError, r"^timeout must be None or >= 0, got nan$"),
    ("1", TypeError, r"^timeout must be None or a number of seconds, got str$"),
    (True, TypeError, r"^timeout must be None or a number of seconds, got bool$"),
])
def test_bad_timeouts(bad, error, message) -> None:
    with pytest.raises(error, match=message):
        check_timeout(bad)
