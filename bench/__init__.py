"""Side-by-side benchmarks of headrace and its peers (DESIGN 6, STYLE 8).

``python -m bench [suite ...] [--quick]`` runs the named suites (default: all of them). Each suite
measures headrace and every installed peer in the same run, alternating rounds so that drift hits
both, and writes ``bench/results/<suite>.json`` and ``.md``. Nothing here is collected by pytest.
"""

from __future__ import annotations

#: Suite name -> module (imported lazily) exposing ``run(quick: bool) -> list[Record]``.
SUITES: dict[str, str] = {
    "runtime": "bench.runtime",
    "channels": "bench.channels",
    "compiled": "bench.compiled",
    "soak": "bench.soak",
    "scaleout": "bench.scaleout",
}

__all__ = ["SUITES"]
