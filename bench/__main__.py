"""CLI: ``python -m bench [suite ...] [--quick]``; no suite named runs every suite."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import SUITES


def main(argv: list[str] | None = None) -> int:
    """Run the requested suites one after another.

    Args:
        argv: Command-line arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The process exit status (0 on success; an unknown suite exits 2 through argparse).
    """
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmarks of headrace and its peers (Ray, Dask, "
                    "multiprocessing). Results go to bench/results/<suite>.json and .md.")
    parser.add_argument("suites", nargs="*", metavar="suite",
                        help=f"suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations (about a minute per suite on 2 cores)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(map(repr, unknown))}; available: {', '.join(SUITES)}")
    for name in dict.fromkeys(args.suites or SUITES):
        module = importlib.import_module(SUITES[name])
        module.run(quick=args.quick)
    return 0


if __name__ == "__main__":      # the guard matters: spawned children re-import this module
    sys.exit(main())
