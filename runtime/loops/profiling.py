"""Chrome traces of compiled DAGs (``profile=True``): a span per step, per execution, per process.

In: the steps of each process's loop (read, compute, write) and the driver's submits and output
reads, timed on the system-wide monotonic clock, so spans of different processes line up.
Out: one JSON file in the Chrome trace event format (open it in ui.perfetto.dev or
chrome://tracing): a track per process, a complete ("X") event per span with ``args.execution``.
Invariants:
- Only a profiled DAG records: its loops run wrapped steps; the plain loop is untouched.
- A process keeps at most ``MAX_SPANS`` spans, the newest; the trace counts the dropped ones.
- A loop's spans reach the driver as a part file, written when the loop ends (teardown closes
  its channels). Teardown merges the parts that arrive within ``MERGE_WAIT_S``; a process that
  died writes none, and the trace's ``otherData.missing`` names it.

  loop steps ─timed─▶ Recorder ─loop ends─▶ <dir>/<process>.json ─teardown─▶ merged trace JSON
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

#: Spans a process keeps (the newest): about 60 bytes each in memory, 120 in the JSON.
MAX_SPANS = 500_000
#: How long teardown waits for the loops' part files.
MERGE_WAIT_S = 5.0


class Recorder:
    """The spans of one process (or of the driver), bounded."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.kinds: list[tuple[str, str, int]] = []     # (name, category, track) per span kind
        self.tracks: list[str] = []
        self.spans: deque[tuple[int, int, int, int]] = deque(maxlen=MAX_SPANS)
        self.recorded = 0
        self.execution = -1

    def kind(self, name: str, category: str, track: str) -> int:
        """The number of a kind of span (``name`` on ``track``), for ``add``."""
        if track not in self.tracks:
            self.tracks.append(track)
        self.kinds.append((name, category, self.tracks.index(track)))
        return len(self.kinds) - 1

    def add(self, kind: int, execution: int, start_ns: int, end_ns: int) -> None:
        self.spans.append((kind, execution, start_ns, end_ns))
        self.recorded += 1

    def timed(self, fn: Callable[..., Any], name: str, category: str, *,
              first: bool = False) -> Callable[..., Any]:
        """``fn``, recording a span per call; ``first``: its call starts the next execution."""
        kind = self.kind(name, category, "loop")
        add, now = self.add, time.monotonic_ns

        def run(*args: Any) -> Any:
            if first:
                self.execution += 1
            start = now()
            value = fn(*args)
            add(kind, self.execution, start, now())
            return value
        return run

    def part(self) -> dict[str, Any]:
        """What this recorder has, as plain data (a part of the merged trace)."""
        return {"pid": os.getpid(), "label": self.label, "kinds": self.kinds,
                "tracks": self.tracks, "spans": list(self.spans),
                "dropped": self.recorded - len(self.spans)}

    def dump(self, directory: str, key: str) -> None:
        """Write ``part()`` into ``directory`` for the driver to merge (atomically)."""
        path = part_path(directory, key)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.part(), f, separators=(",", ":"))
        os.replace(tmp, path)


def part_path(directory: str, key: str) -> str:
    return os.path.join(directory, key.replace(":", "_").replace("/", "_") + ".json")


def new_trace_dir() -> str:
    return tempfile.mkdtemp(prefix="headrace-trace-")


def default_trace_path() -> str:
    """Where ``profile=True`` writes: the current directory, one file per compiled DAG."""
    return os.path.abspath(f"headrace-trace-{os.getpid()}-{next(_COUNTER)}.json")


def merge(path: str, directory: str, keys: Iterable[str], driver: Recorder,
          is_alive: Callable[[str], bool], info: dict[str, Any]) -> str:
    """Wait for the loops' parts, write the merged Chrome trace to ``path``; returns ``path``.

    ``keys`` are the processes expected; one that ``is_alive`` says is gone is not waited for.
    """
    waiting = list(keys)
    deadline = time.monotonic() + MERGE_WAIT_S
    while True:
        waiting = [k for k in waiting if not os.path.exists(part_path(directory, k))]
        if not waiting or time.monotonic() >= deadline or \
                not any(is_alive(k) for k in waiting):
            break
        time.sleep(0.005)
    parts = [driver.part()]
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                parts.append(json.load(f))
    shutil.rmtree(directory, ignore_errors=True)
    trace = {"traceEvents": [e for part in parts for e in _events(part)],
             "displayTimeUnit": "ns",
             "otherData": {**info, "missing": waiting,
                           "dropped_spans": sum(p["dropped"] for p in parts)}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(trace, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def _events(part: dict[str, Any]) -> list[dict[str, Any]]:
    pid = part["pid"]
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": part["label"]}}]
    events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": t, "args": {"name": name}}
               for t, name in enumerate(part["tracks"])]
    kinds = part["kinds"]
    for kind, execution, start, end in part["spans"]:
        name, category, track = kinds[kind]
        events.append({"ph": "X", "name": name, "cat": category, "pid": pid, "tid": track,
                       "ts": start / 1e3, "dur": (end - start) / 1e3,
                       "args": {"execution": execution}})
    return events


_COUNTER = itertools.count(1)    # next() on it is atomic under the GIL
