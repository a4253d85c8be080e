"""Channel tests spawn children with multiprocessing, which starts its resource tracker."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing import resource_tracker

import pytest


@pytest.fixture(autouse=True, scope="module")
def stop_resource_tracker() -> Iterator[None]:
    """End multiprocessing's tracker process after the module, so no child is left behind."""
    yield
    resource_tracker._resource_tracker._stop()
