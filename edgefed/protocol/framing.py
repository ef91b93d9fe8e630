"""Multipart application messages: one JSON header plus named binary parts.

Layout: u32 little-endian header length, UTF-8 JSON header object, then the parts' bytes
back to back. The header's ``"parts"`` is a list of ``[name, size]`` pairs in body order.
The decoder checks sizes before slicing and caps the header, so a lying length can never
make it read out of bounds or allocate more than the message itself.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_HEADER = 1 << 20


class MessageError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PackedMessage:
    """A message whose bytes are joined only when asked for.

    The coordinator sends the same weights (and graphs) to every sampled device: holding
    the encoded header plus references to the shared parts, not one joined copy per device,
    keeps a round's tasks at about one model's size whatever the number of devices.
    """

    __slots__ = ("_head", "_parts")

    def __init__(self, header: dict[str, Any], parts: dict[str, bytes] | None = None) -> None:
        parts = parts or {}
        h = dict(header)
        h["parts"] = [[name, len(data)] for name, data in parts.items()]
        hb = json.dumps(h, separators=(",", ":"), allow_nan=False).encode()
        if len(hb) > MAX_HEADER:
            raise ValueError("message header too large")
        self._head = struct.pack("<I", len(hb)) + hb
        self._parts = list(parts.values())

    def __len__(self) -> int:
        return len(self._head) + sum(len(p) for p in self._parts)

    def to_bytes(self) -> bytes:
        return b"".join([self._head, *self._parts])


def pack(header: dict[str, Any], parts: dict[str, bytes] | None = None) -> bytes:
    return PackedMessage(header, parts).to_bytes()


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    if len(data) < 4:
        raise MessageError(f"message of {len(data)} bytes has no header length")
    (hlen,) = struct.unpack_from("<I", data)
    if hlen > MAX_HEADER or 4 + hlen > len(data):
        raise MessageError(f"header length {hlen} exceeds message ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[4 : 4 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageError(f"header is not UTF-8 JSON: {e}") from None
    except RecursionError:  # e.g. 15,000 nested "[": json recurses per level
        raise MessageError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    spec = header.pop("parts", [])
    if not isinstance(spec, list):
        raise MessageError("header 'parts' is not a list")
    parts: dict[str, bytes] = {}
    off = 4 + hlen
    for item in spec:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or type(item[1]) is not int
            or item[1] < 0
        ):
            raise MessageError(f"bad part entry {item!r}")
        name, size = item
        if name in parts:
            raise MessageError(f"duplicate part {name!r}")
        if off + size > len(data):
            raise MessageError(f"part {name!r} of {size} bytes runs past the message end")
        parts[name] = bytes(data[off : off + size])
        off += size
    if off != len(data):
        raise MessageError(f"{len(data) - off} trailing bytes after the parts")
    return header, parts


def require(header: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    """``header[key]`` checked for presence and type (bool is not accepted as int)."""
    if key not in header:
        raise MessageError(f"header lacks {key!r}")
    v = header[key]
    if isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise MessageError(f"header {key!r} has type bool")
    if not isinstance(v, typ):
        raise MessageError(f"header {key!r} has type {type(v).__name__}")
    return v
