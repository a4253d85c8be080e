"""Functions run in child processes by the channel tests (importable, so 'spawn' can find them)."""

from __future__ import annotations

import time
from typing import Any


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
