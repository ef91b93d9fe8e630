"""Framing of logical messages into MQTT publishes, and bounded reassembly.

Every logical message travels as one or more frames (even when it fits in one, so that
every message has an id the receiver can deduplicate on). Frame layout, little-endian:

| bytes | field |
|---|---|
| 4 | magic ``EFC1`` |
| 16 | message id (random, chosen by the sender; a resend reuses it) |
| 4 | chunk index |
| 4 | chunk count (>= 1) |
| 8 | total length of the message |
| 32 | SHA-256 of the whole message |
| rest | this chunk's bytes |

All chunks but the last carry exactly ``ceil(total / count)`` bytes. The receiver checks
every header field against the first chunk it saw for that id, bounds the bytes held by
incomplete messages (``memory_limit``; the oldest incomplete message is evicted first),
expires incomplete messages after ``timeout`` seconds, and verifies the hash at the end.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

MAGIC = b"EFC1"
_HEADER = struct.Struct("<4s16sIIQ32s")
HEADER_SIZE = _HEADER.size  # 68


class ChunkError(ValueError):
    """A frame was rejected; ``reason`` says why (logged by the receiver)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_message_id() -> bytes:
    return os.urandom(16)


def split_message(
    payload: bytes, chunk_size: int, message_id: bytes | None = None
) -> tuple[bytes, list[bytes]]:
    """Frames for ``payload`` with at most ``chunk_size`` data bytes each; returns (id, frames)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    mid = message_id if message_id is not None else new_message_id()
    if len(mid) != 16:
        raise ValueError("message id must be 16 bytes")
    total = len(payload)
    count = max(1, -(-total // chunk_size))
    digest = hashlib.sha256(payload).digest()
    stride = -(-total // count)  # <= chunk_size; the receiver derives it from (total, count)
    view = memoryview(payload)
    frames = [
        _HEADER.pack(MAGIC, mid, i, count, total, digest)
        + bytes(view[i * stride : (i + 1) * stride])
        for i in range(count)
    ]
    return mid, frames


@dataclass
class _Partial:
    count: int
    total: int
    digest: bytes
    stride: int
    started: float
    buf: bytearray
    have: set[int] = field(default_factory=set)


class Reassembler:
    """Collects frames into messages, within a memory and time budget. Not thread-safe:
    one receiver thread feeds it."""

    def __init__(
        self,
        max_message_bytes: int = 256 * 1024 * 1024,
        memory_limit: int = 512 * 1024 * 1024,
        timeout: float = 120.0,
        max_chunks: int = 1 << 20,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.max_chunks = max_chunks
        self._partials: OrderedDict[bytes, _Partial] = OrderedDict()
        self._held = 0
        self.evicted: list[tuple[bytes, str]] = []  # (id, reason) for the caller to log

    @property
    def held_bytes(self) -> int:
        return self._held

    def pending(self) -> int:
        return len(self._partials)

    def _drop(self, mid: bytes, reason: str) -> None:
        p = self._partials.pop(mid, None)
        if p is not None:
            self._held -= p.total
            self.evicted.append((mid, reason))

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for mid in [m for m, p in self._partials.items() if now - p.started > self.timeout]:
            self._drop(mid, f"incomplete after {self.timeout:.0f}s")

    def add(self, frame: bytes, now: float | None = None) -> tuple[bytes, bytes] | None:
        """Feed one frame; returns (message id, payload) when a message completes.

        Raises ChunkError(reason) for a malformed or inconsistent frame (the partial message
        it belonged to is discarded when the inconsistency proves the sender is broken).
        """
        now = time.monotonic() if now is None else now
        self.expire(now)
        if len(frame) < HEADER_SIZE:
            raise ChunkError(f"frame of {len(frame)} bytes is shorter than the header")
        magic, mid, index, count, total, digest = _HEADER.unpack_from(frame)
        if magic != MAGIC:
            raise ChunkError(f"bad magic {magic!r}")
        if count < 1 or count > self.max_chunks:
            raise ChunkError(f"chunk count {count} outside 1..{self.max_chunks}")
        if index >= count:
            raise ChunkError(f"chunk index {index} >= count {count}")
        if total > self.max_message_bytes:
            raise ChunkError(f"message of {total} bytes exceeds limit {self.max_message_bytes}")
        if count > max(1, total):
            raise ChunkError(f"{count} chunks for a message of {total} bytes")
        stride = -(-total // count) if total else 0
        expect = stride if index < count - 1 else total - stride * (count - 1)
        if expect < 0 or (count > 1 and total - stride * (count - 1) <= 0):
            raise ChunkError(f"chunk count {count} inconsistent with total {total}")
        data = memoryview(frame)[HEADER_SIZE:]
        if len(data) != expect:
            raise ChunkError(f"chunk {index}/{count} carries {len(data)} bytes, expected {expect}")
        if count == 1:
            payload = bytes(data)
            if hashlib.sha256(payload).digest() != digest:
                raise ChunkError("content hash mismatch")
            return mid, payload
        p = self._partials.get(mid)
        if p is None:
            if total > self.memory_limit:
                raise ChunkError(f"message of {total} bytes exceeds reassembly memory")
            while self._held + total > self.memory_limit and self._partials:
                oldest = next(iter(self._partials))
                self._drop(oldest, "evicted: reassembly memory limit")
            p = _Partial(count, total, digest, stride, now, bytearray(total))
            self._partials[mid] = p
            self._held += total
        elif (p.count, p.total, p.digest) != (count, total, digest):
            self._drop(mid, "inconsistent chunk headers")
            raise ChunkError("chunk header disagrees with earlier chunks of the same message")
        if index in p.have:
            return None  # a redelivered chunk: harmless
        p.buf[index * stride : index * stride + len(data)] = data
        p.have.add(index)
        if len(p.have) < p.count:
            return None
        del self._partials[mid]
        self._held -= p.total
        payload = bytes(p.buf)
        if hashlib.sha256(payload).digest() != p.digest:
            raise ChunkError("content hash mismatch after reassembly")
        return mid, payload


def iter_chunks(payload: bytes, chunk_size: int) -> Iterator[bytes]:
    """Frames of one message (convenience for tests and tools)."""
    yield from split_message(payload, chunk_size)[1]
