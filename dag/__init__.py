"""DAG nodes and tracing (``bind()``, ``InputNode``, ``MultiOutputNode``): see issue 6."""
