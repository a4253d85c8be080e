"""Ray's import path ``ray.dag.class_node`` for nodes defined in nodes.py."""

from .nodes import ClassMethodNode, ClassNode

__all__ = ["ClassMethodNode", "ClassNode"]
