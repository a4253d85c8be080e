"""Helpers of the channel tests, and functions run in child processes (importable for 'spawn')."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; the dict gets 'value' or 'error' and 'at' (monotonic end time)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def error_when_killed(pid: int, blocked: Callable[[], Any], within_s: float = 2.0) -> Any:
    """Run ``blocked`` on a thread, SIGKILL ``pid``: the error it woke with, soon enough."""
    thread, out = in_thread(blocked)
    time.sleep(0.2)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(10)
    assert "error" in out, out
    assert out["at"] - killed_at < within_s
    return out["error"]


def echo(reader: Any, writer: Any, count: int) -> None:
    """Read ``count`` values and write each back."""
    for _ in range(count):
        writer.write(reader.read(timeout_s=10), timeout_s=10)


def write_all(writer: Any, values: list[Any]) -> None:
    for value in values:
        writer.write(value, timeout_s=10)


def attach_and_sleep(reader: Any, ready: Any) -> None:
    """Attach as a reader (without reading anything), then sleep: the test kills us."""
    from headrace.exceptions import WouldBlock
    try:
        reader.read_nowait()
    except WouldBlock:
        pass
    ready.send("ready")
    time.sleep(60)


def write_then_sleep(writer: Any, value: Any, ready: Any) -> None:
    writer.write(value, timeout_s=10)
    ready.send("ready")
    time.sleep(60)


def write_later(writer: Any, value: Any, delay_s: float) -> None:
    """Sleep ``delay_s``, write ``value``, close the writer (its values stay readable)."""
    time.sleep(delay_s)
    writer.write(value, timeout_s=10)
    writer.close()
