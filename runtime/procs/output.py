"""Worker output reaching the driver's stderr, one line at a time, prefixed ``(name pid=N)``.

In (child): ``print()``/``logging`` writes to sys.stdout/sys.stderr, which we replace with streams
that prefix each complete line with the current task or actor name. Out (driver): a forwarder
thread reads every child's pipe and writes whole lines to the driver's *current* ``sys.stderr``.
Invariants: lines are never split or interleaved mid-line; a line that reached the pipe without
our prefix (C code writing to fd 1/2) gets the process's default prefix from the driver.

  child: print("hi") ─▶ "(Stage pid=7) hi\\n" ─▶ pipe ─▶ forwarder thread ─▶ driver sys.stderr
"""

from __future__ import annotations

import io
import os
import selectors
import sys
import threading
from collections.abc import Callable


class _PrefixedStream(io.TextIOBase):
    """A text stream writing complete lines, prefixed, to a file descriptor."""

    def __init__(self, fd: int, label: Callable[[], str], pid: int | str) -> None:
        self._fd = fd
        self._label = label
        self._pid = pid
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            if lines:
                prefix = f"({self._label()} pid={self._pid}) "
                self._emit("".join(f"{prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._emit(f"({self._label()} pid={self._pid}) {self._partial}\n")
                self._partial = ""

    def _emit(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except (BrokenPipeError, OSError):
                return

    def fileno(self) -> int:
        return self._fd

    @property
    def encoding(self) -> str:       # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False


def install_prefixed_output(label: Callable[[], str], pid: int | str) -> None:
    """In a child: route sys.stdout and sys.stderr through line-prefixing streams."""
    sys.stdout = _PrefixedStream(1, label, pid)
    sys.stderr = _PrefixedStream(2, label, pid)


class LogForwarder:
    """Driver side: one thread that copies children's output lines to ``sys.stderr``."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._partial: dict[int, bytes] = {}
        self._prefix: dict[int, str] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="headrace-logs", daemon=True)
        self._thread.start()

    def add(self, fd: int, prefix: str) -> None:
        """Forward lines read from ``fd`` (closed here at EOF); ``prefix`` for unprefixed lines."""
        with self._lock:
            self._pending.append((fd, prefix))
        os.write(self._wake_w, b"x")

    def close(self, timeout_s: float = 0.5) -> None:
        """Copy what is left (children are gone, so pipes end), then stop."""
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            for key, _ in self._selector.select(0.05 if self._closed else None):
                if key.fileobj == self._wake_r:
                    os.read(self._wake_r, 4096)
                    self._register_pending()
                else:
                    self._read(key.fileobj)
            if self._closed and len(self._selector.get_map()) <= 1:
                break
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _register_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fd, prefix in pending:
            self._prefix[fd] = prefix
            self._partial[fd] = b""
            self._selector.register(fd, selectors.EVENT_READ, None)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        data = self._partial[fd] + chunk
        if not chunk:                    # EOF: the child is gone
            self._selector.unregister(fd)
            os.close(fd)
            self._write(fd, [data] if data else [])
            del self._partial[fd], self._prefix[fd]
            return
        *lines, self._partial[fd] = data.split(b"\n")
        self._write(fd, lines)

    def _write(self, fd: int, lines: list[bytes]) -> None:
        if not lines:
            return
        prefix = self._prefix[fd]
        text = "".join(
            (line if line.startswith("(") else prefix + line) + "\n"
            for line in (raw.decode("utf-8", "replace") for raw in lines))
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):    # the driver's stderr is closed: drop the output
            pass
