"""A Dask cluster whose workers are separate "hosts": network namespaces on one machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import headrace as hr

from .netns import NetnsCluster, NetnsUnavailable


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    """Two worker hosts (the first with Dask resource SLOT=1); the driver (this process) and
    the scheduler share the root namespace, on the bridge joining them."""
    pytest.importorskip("distributed", reason="scale-out tests need pip install 'headrace[dask]'")
    try:
        made = NetnsCluster(2, resources={0: "SLOT=1"}).start()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot simulate hosts with network namespaces here: {exc}")
    try:
        yield made
    finally:
        hr.shutdown()               # while the cluster still runs: it ends our processes there
        made.close()
