"""Why an update was not counted: a category (what the round's metrics count) plus detail.

The categories are the metric names the coordinator has always reported (``dropped`` in the
metrics JSON is ``{category: count}``); a :class:`Drop` keeps the category as an enum, so no
caller recovers it by splitting the human-readable text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DropReason(StrEnum):
    INVALID = "invalid"  # malformed, disagreeing or not allowed content
    LATE = "late"  # for a round already closed
    DUPLICATE = "duplicate"  # counted already, or a second update from the device
    NOT_SAMPLED = "not sampled this round"
    DEADLINE = "deadline"  # no update before the round closed
    DEVICE_ERROR = "device error"  # the device reported it could not train
    WORKER_LOST = "worker lost"  # the aggregator worker holding the update died
    STALE = "stale"  # asynchronous mode: trained on a model more than max_staleness behind


@dataclass(frozen=True)
class Drop:
    """One update (or one missing update) not counted, with its reason.

    ``retry``: the update names a round not announced yet; a sharded worker holds it until
    the announcement arrives instead of dropping it. ``redelivery``: an exact copy of an
    update already counted here (a QoS 1 redelivery), which a worker ignores quietly.
    ``answered``: the device's refusal or error for the open round: it will send no update,
    so the round does not wait for it (and does not count it as "deadline" as well).
    """

    device: str
    reason: DropReason
    detail: str = ""
    retry: bool = False
    redelivery: bool = False
    answered: bool = False

    @property
    def text(self) -> str:
        """The line logged and kept in the round's ``drop_log``."""
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, str]:
        return {"device": self.device, "reason": self.text}


__all__ = ["Drop", "DropReason"]
