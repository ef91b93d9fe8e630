"""Moved to :mod:`harness.processes` (tests/harness/); this name stays only so tests written
on other branches before the move keep importing. Delete once none imports it."""

from harness.processes import stop_processes

__all__ = ["stop_processes"]
