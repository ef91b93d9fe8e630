"""Waiting on conditions, never on sleeps: a test states what it waits for and how long."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something truthy; return that value.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds (the condition is checked
    once more at the deadline, so a slow machine never fails a test that just made it).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met after {timeout}s")
        time.sleep(interval)
