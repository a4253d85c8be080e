"""Pure compiler passes from DagIR to Plan (no processes, shm or sockets): see issue 6."""
