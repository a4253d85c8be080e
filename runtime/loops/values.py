"""What compiled-DAG processes exchange besides user values (kept free of heavy imports).

``OpFailure`` is an execution's value where an op raised: it travels through channels like any
value and becomes a ``TaskError`` on the driver. ``FunctionHost`` is the actor class of a
process that runs only remote-function ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class OpFailure:
    """Op ``name`` (bound at ``site``) raised; ``info`` is the protocol's ``ErrorInfo``."""

    name: str
    site: str
    info: Any


@dataclass(frozen=True, slots=True)
class PackedArgs:
    """The input channel's value when execute() got other than exactly one positional
    argument (one positional argument travels as itself)."""

    args: tuple
    kwargs: dict


class FunctionHost:
    """The actor class of a process that runs only remote-function ops of compiled DAGs."""

    def __repr__(self) -> str:
        return "<FunctionHost>"
