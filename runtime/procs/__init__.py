"""Processes and workers: the driver's Runtime (spawn, I/O thread, inbox, lanes), the worker."""
