"""Remote functions shared by the runtime tests."""

from __future__ import annotations

import time

import headrace as hr


@hr.remote
def slow(x, delay_s=0.0):
    time.sleep(delay_s)
    return x
