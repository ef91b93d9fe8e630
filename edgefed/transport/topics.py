"""Kept for importers: every topic is built in :mod:`edgefed.protocol.topics`."""

from edgefed.protocol.topics import Topics, check_name

__all__ = ["Topics", "check_name"]
