"""MQTT transport for edgefed: topic layout, framing/chunking, flow control, deduplication,
a paho-mqtt 2.x client wrapper and an embedded broker. Torch-free."""

from edgefed.transport.chunking import ChunkError, Reassembler, split_message
from edgefed.transport.config import BrokerURL, TransportConfig, parse_broker_url
from edgefed.transport.dedupe import SeenSet
from edgefed.transport.flow import FlowWindow
from edgefed.transport.message import MessageError, pack, unpack
from edgefed.transport.topics import Topics, check_name

__all__ = [
    "BrokerURL",
    "ChunkError",
    "FlowWindow",
    "MessageError",
    "Reassembler",
    "SeenSet",
    "Topics",
    "TransportConfig",
    "check_name",
    "pack",
    "parse_broker_url",
    "split_message",
    "unpack",
]
