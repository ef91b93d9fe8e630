"""The one exception type of the codec."""

from __future__ import annotations


class CodecError(ValueError):
    """A payload, spec or state file was rejected; ``reason`` says which check failed.

    Subclasses ValueError so callers that already catch ValueError keep working; the
    runtime logs ``reason`` and drops the message (nothing else is affected).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
