"""headrace's build backend: setuptools, plus the channels' hot ops compiled ahead of time.

pyproject.toml names this module as the backend (in-tree, ``backend-path``) and its
``BuildNative`` as setuptools' ``build_ext``: the extension module
``headrace.channels._native_ops`` is built by ``channels/aot.py`` (numba.pycc), so that no
process of the user's compiles the ops. Where that fails (no C compiler, a numba without pycc),
the install goes on without it and numba's JIT compiles the ops on first use instead
(``channels/native.py``). This folder is not part of the installed package.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from setuptools.build_meta import *  # noqa: F403 - the PEP 517 hooks, unchanged
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent.parent
NAME = "headrace.channels._native_ops"


def _aot() -> types.ModuleType:
    """``headrace.channels.aot`` from this source tree, without running the package's
    ``__init__`` (its dependencies need not be in the build environment)."""
    for name, path in (("headrace", ROOT), ("headrace.channels", ROOT / "channels")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    from headrace.channels import aot
    return aot


class BuildNative(build_ext):
    def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools' Extension
        if ext.name != NAME:
            super().build_extension(ext)
            return
        path = Path(self.get_ext_fullpath(ext.name))
        try:
            _aot().build(path)
        except Exception as exc:  # noqa: BLE001 - the JIT fallback covers any failure
            self.warn(f"headrace: could not compile the channel ops ahead of time "
                      f"({type(exc).__name__}: {exc}); numba will compile them on first use")
