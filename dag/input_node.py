"""Ray's import path ``ray.dag.input_node`` for nodes defined in nodes.py."""

from .nodes import InputNode, InputAttributeNode

__all__ = ["InputAttributeNode", "InputNode"]
