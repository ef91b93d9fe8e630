"""Kept for importers: the aggregator topics live in :mod:`edgefed.protocol.topics`."""

from edgefed.protocol.topics import ShardTopics

__all__ = ["ShardTopics"]
