"""edgefed's wire protocol in one place: topics, message framing, typed headers and the
reasons an update is dropped. Torch-free; depends on nothing above the codec.

- :mod:`.topics`: every MQTT topic (device, aggregator and bundle topics);
- :mod:`.framing`: the multipart message (JSON header + named binary parts);
- :mod:`.headers`: :class:`TaskHeader`, :class:`UpdateHeader`, :class:`RoundAnnouncement`;
- :mod:`.drops`: :class:`DropReason` (the metric categories) and :class:`Drop`.
"""

from edgefed.protocol.drops import Drop, DropReason
from edgefed.protocol.framing import MessageError, PackedMessage, pack, require, unpack
from edgefed.protocol.headers import (
    ModelHeader,
    RoundAnnouncement,
    TaskHeader,
    UpdateHeader,
    is_id,
)
from edgefed.protocol.topics import ShardTopics, Topics, check_name

__all__ = [
    "Drop",
    "DropReason",
    "MessageError",
    "ModelHeader",
    "PackedMessage",
    "RoundAnnouncement",
    "ShardTopics",
    "TaskHeader",
    "Topics",
    "UpdateHeader",
    "check_name",
    "is_id",
    "pack",
    "require",
    "unpack",
]
