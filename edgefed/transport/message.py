"""Kept for importers: the message framing now lives in :mod:`edgefed.protocol.framing`."""

from edgefed.protocol.framing import MAX_HEADER, MessageError, PackedMessage, pack, require, unpack

__all__ = ["MAX_HEADER", "MessageError", "PackedMessage", "pack", "require", "unpack"]
