"""Ray's import path ``ray.dag.output_node`` for nodes defined in nodes.py."""

from .nodes import MultiOutputNode

__all__ = ["MultiOutputNode"]
