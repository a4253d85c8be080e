"""Scale-out: headrace processes on the hosts of a Dask distributed cluster (DESIGN 5)."""
