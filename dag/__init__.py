"""DAG nodes and tracing: ``bind()``, ``InputNode``, ``MultiOutputNode``, ``trace`` -> ``DagIR``."""

from .context import DAGContext
from .ir import DagIR, NodeArg, Op, OpKind, run_local, trace
from .nodes import (ClassMethodNode, ClassNode, DAGNode, FunctionNode, InputAttributeNode,
                    InputNode, MultiOutputNode)

__all__ = ["ClassMethodNode", "ClassNode", "DAGContext", "DAGNode", "DagIR", "FunctionNode",
           "InputAttributeNode", "InputNode", "MultiOutputNode", "NodeArg", "Op", "OpKind",
           "run_local", "trace"]
