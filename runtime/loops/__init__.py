"""Compiled execution inside a process: the loops of a compiled DAG, their values, their traces."""
