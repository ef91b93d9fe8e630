"""safetensors framing: a deterministic writer and a validating, zero-copy reader.

Why safetensors: a small, widely implemented, pickle-free container (u64 header length,
JSON header with dtype / shape / byte range per tensor plus a string->string
``__metadata__`` map, then one contiguous body) that any safetensors tool can open.
Why our own reader on top of the format: the receiver must check every length against
*its* limits and the expected model before allocating anything, and wants zero-copy views
of the body; ``safetensors.deserialize`` copies every tensor first. The tests check both
directions against the ``safetensors`` package (it is a base dependency for that reason
and for reading our files with standard tools).

Reader checks, each with its own reason: minimum length, header-size cap, header inside
the payload, UTF-8, JSON object without duplicate keys, string->string metadata, known
dtypes, shapes of non-negative ints, byte size == prod(shape) * itemsize, offsets
contiguous from 0 with no holes or overlaps, and body length exact.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefed.codec.errors import CodecError

__all__ = ["Entry", "read_container", "write_container"]

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the payload
    end: int

    def view(self, payload: bytes | memoryview) -> np.ndarray:
        dt = DTYPES[self.dtype]
        a = np.frombuffer(payload, dt, math.prod(self.shape), self.start)
        if a.__array_interface__["data"][0] % dt.alignment:  # keep kernels on aligned memory
            a = a.copy()
        return a


def write_container(
    arrays: list[tuple[str, np.ndarray]],
    metadata: dict[str, str],
    finalize: Callable[[list[memoryview]], dict[str, str]] | None = None,
) -> bytes:
    """Deterministic bytes: entries ordered by (-itemsize, key) so every offset is aligned.

    ``finalize(body_parts)``, if given, returns the metadata to write once the body bytes
    are known (used to put a digest of the body into the header without a second pass).
    """
    ordered = sorted(arrays, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))
    body: list[memoryview] = []
    for _, a in ordered:  # one copy per tensor, straight into the joined payload
        le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        body.append(memoryview(le).cast("B"))
    if finalize is not None:
        metadata = finalize(body)
    header: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for key, a in ordered:
        dt = _NAMES[np.dtype(f"<{a.dtype.kind}{a.dtype.itemsize}")]
        header[key] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return b"".join([struct.pack("<Q", len(h)), h, *body])


def _no_dupes(pairs: list[tuple[str, object]]) -> dict[str, object]:
    d: dict[str, object] = {}
    for k, v in pairs:
        if k in d:
            raise CodecError(f"duplicate key {k!r} in header")
        d[k] = v
    return d


def read_container(
    payload: bytes, max_bytes: int, max_header: int, max_entries: int
) -> tuple[dict[str, str], dict[str, Entry], int]:
    """Validate the framing -> (metadata, entries, body offset). Allocates nothing big."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    n = len(payload)
    if n > max_bytes:
        raise CodecError(f"payload of {n} bytes exceeds the limit of {max_bytes}")
    if n < 8:
        raise CodecError("payload truncated: shorter than the 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    if hlen > max_header:
        raise CodecError(f"header length {hlen} exceeds the limit of {max_header}")
    if 8 + hlen > n:
        raise CodecError("payload truncated: header extends past the end")
    try:
        text = bytes(payload[8 : 8 + hlen]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_dupes)
    except UnicodeDecodeError:
        raise CodecError("header is not valid UTF-8") from None
    except CodecError:
        raise
    except (ValueError, RecursionError) as e:
        raise CodecError(f"header is not valid JSON: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise CodecError("header must be a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CodecError("__metadata__ must map strings to strings")
    if len(header) > max_entries:
        raise CodecError(f"{len(header)} tensors exceed the limit of {max_entries}")
    body0, body_len = 8 + hlen, n - 8 - hlen
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, Entry] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CodecError(f"entry {key!r}: needs exactly dtype, shape, data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in DTYPES:
            raise CodecError(f"entry {key!r}: dtype {dt!r} not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
        ):
            raise CodecError(f"entry {key!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int and 0 <= o <= body_len for o in offs)
        ):
            raise CodecError(f"entry {key!r}: data_offsets outside the body")
        if offs[1] - offs[0] != math.prod(shape) * DTYPES[dt].itemsize:
            raise CodecError(f"entry {key!r}: byte range does not match shape and dtype")
        spans.append((offs[0], offs[1], key))
        entries[key] = Entry(dt, tuple(shape), body0 + offs[0], body0 + offs[1])
    pos = 0
    for b, e, key in sorted(spans):
        if b != pos:
            raise CodecError(f"entry {key!r}: data not contiguous (hole or overlap)")
        pos = e
    if pos != body_len:
        raise CodecError(f"body has {body_len} bytes but tensors cover {pos}")
    return meta, entries, body0
