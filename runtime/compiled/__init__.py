"""Compiled DAGs on the driver: compile, execute, read outputs, tear down, explain stalls."""
