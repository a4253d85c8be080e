"""Refs and waiting: deadlines, the one waiter per blocking call, ObjectRef and CompiledDAGRef."""
