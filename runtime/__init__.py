"""Processes, actors, tasks, the object store, refs and get/wait/gather (DESIGN section 5)."""
