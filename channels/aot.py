"""The channels' hot ops compiled ahead of time, at ``pip install``, into an extension module.

In: ``channels/_jit.py`` (the ops, as numba source) and ``abi.SIGNATURES``. Out: ``build(path)``,
which ``setup.py`` runs: ``numba.pycc`` compiles every op for its signature into the extension
module ``channels/_native_ops`` (a plain CPython extension: loading it takes under a millisecond
and does not import numba), and ``source_key()``, the hash its build is stamped with.
Invariants: a build is used only while its stamp matches the source it was built from
(``channels.native`` checks): an edited checkout or a build from other sources falls back to
numba's JIT instead of running stale code. Nothing here imports numba until ``build`` runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

#: The extension module's name inside the package.
MODULE = "_native_ops"
#: The files the ops are compiled from (this one too: it decides how).
SOURCES = ("_jit.py", "abi.py", "aot.py")

_HERE = Path(__file__).resolve().parent


def source_key() -> int:
    """A hash of the ops' source files, as a signed 64-bit int (what a build is stamped with)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_HERE / name).read_bytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def _constant(value: int):
    def source_key() -> int:
        return value
    return source_key


def build(path: str | os.PathLike[str]) -> Path:
    """Compile every op of ``abi.SIGNATURES`` into the extension module file ``path`` (its name
    must be the one the interpreter expects, e.g. ``_native_ops.cpython-311-x86_64-linux-gnu.so``).

    Generic code for the machine's CPU family (no host-specific instructions): a wheel built
    here also runs on another machine of the family. Takes 5-15 s.
    """
    from numba.core.errors import NumbaPendingDeprecationWarning
    with warnings.catch_warnings():
        # NOTE: pycc is "pending deprecation" with no replacement released yet (numba 0.68);
        # the fallback (numba's JIT at run time) stays, so a numba without pycc still works.
        warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
        from numba.pycc import CC

    from . import _jit
    from .abi import SIGNATURES
    path = Path(path)
    cc = CC(MODULE)
    cc.output_dir = str(path.parent)
    cc.output_file = path.name
    for name, sig in SIGNATURES.items():
        cc.export(name, sig)(getattr(_jit, name).py_func)
    cc.export("source_key", "int64()")(_constant(source_key()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nogil = {getattr(_jit, name).py_func for name in SIGNATURES
             if getattr(_jit, name).targetoptions.get("nogil")}
    with _releasing_the_gil(nogil):
        cc.compile()
    return path


@contextlib.contextmanager
def _releasing_the_gil(functions: set) -> Iterator[None]:
    """While pycc compiles, the ops that are ``nogil`` in ``_jit`` release the GIL as they do
    under the JIT. pycc compiles every export with one set of flags, which has no ``nogil``:
    an op waiting in the kernel would then hold every other thread of its process."""
    import numba.pycc.compiler as pycc_compiler
    original = pycc_compiler.compile_extra

    def compile_extra(typingctx, targetctx, func, args, return_type, flags, *rest, **kw):
        if func in functions:
            flags = flags.copy()
            flags.release_gil = True
        return original(typingctx, targetctx, func, args, return_type, flags, *rest, **kw)

    # NOTE: numba.pycc has no per-export flags; it calls compile_extra through its module's
    # global, which is the one hook there is (checked by tests/channels/test_native.py).
    pycc_compiler.compile_extra = compile_extra
    try:
        yield
    finally:
        pycc_compiler.compile_extra = original
