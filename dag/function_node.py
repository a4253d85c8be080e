"""Ray's import path ``ray.dag.function_node`` for nodes defined in nodes.py."""

from .nodes import FunctionNode

__all__ = ["FunctionNode"]
