"""Update wire format v2, the compact binary form (normative spec: docs/wire-format.md).

Why a second format: v1 (safetensors) repeats per array a JSON entry with dtype, shape and
offsets, plus JSON metadata and a hex SHA-256: ~1.1 KB per message, more than the whole
content of a top-1% update of a 10 K-parameter model. The receiver always decodes against
the expected :class:`ModelSchema`, so shapes and dtypes need not travel: v2 carries per
tensor only its name (front-coded), an encoding id, varint counts and the arrays.

Layout (all integers little-endian, ``uv`` = unsigned LEB128, minimal length)::

    "EFU" 0x02 | flags u8 | round uv | num_samples uv | device_id (uv len + ASCII)
    | model_version (uv len + ASCII) | count uv | layout u32 | tensor* | crc32 u32

    tensor := prefix uv | suffix (uv len + ASCII) | enc u8 | fields | arrays

Every array is preceded by zero bytes up to a multiple of its item size (offsets are from
the payload start), so float views are aligned and zero-copy. ``layout`` is the first 4
bytes (little-endian) of SHA-256 over ``"name:d0,d1,...\n"`` per sent tensor in name
order: shapes do not travel, so this is how a sender whose model has the same element
counts but other shapes (e.g. a transposed weight) is still rejected, as v1's check did.

Decoder: the same obligations as v1, in this order: type, size limit, magic/version,
CRC-32 (corruption only: authenticity is the transport's / signature's job), then a cursor
parse where every varint is bounded and minimal, every string length is capped, and every
array length is computed from the *schema* (never from the peer) and compared with the
bytes that remain *before* a view is taken. Python ints cannot overflow. Any failure is
one :class:`CodecError` with a reason naming the check.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping

import numpy as np

from edgefed._core import sparse as _s
from edgefed.codec.errors import CodecError
from edgefed.codec.schema import DecodeLimits, ModelSchema, UpdateMeta
from edgefed.codec.tensors import (
    DenseF16,
    DenseF32,
    DenseInt4,
    DenseInt8,
    EncodedTensor,
    SparseTensor,
)

__all__ = ["MAGIC", "decode_compact", "encode_compact", "is_compact"]

MAGIC = b"EFU\x02"
ENC_F32, ENC_F16, ENC_INT8, ENC_INT4, ENC_SPARSE = range(5)
_KIND_WEIGHTS = 0x01
_VAL_F32, _VAL_F16, _VAL_I8 = 0, 1, 2
_SP_BITMAP, _SP_ABSENT = 0x04, 0x08
_MAX_TEXT = 128  # device_id / model_version (as UpdateMeta)
_MAX_NAME = 200  # tensor names (as ModelSchema)
_MAX_META_INT = 2**53 - 1
_VAL_DT = {_VAL_F32: np.dtype("<f4"), _VAL_F16: np.dtype("<f2"), _VAL_I8: np.dtype("i1")}


def layout_hash(shapes: Mapping[str, tuple[int, ...]]) -> int:
    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(f"{name}:{','.join(map(str, shapes[name]))}\n".encode())
    return int.from_bytes(h.digest()[:4], "little")


def is_compact(payload: object) -> bool:
    return isinstance(payload, bytes | bytearray | memoryview) and bytes(payload[:4]) == MAGIC


# ----------------------------------------------------------------------------- encode


def _uv(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _text(s: str) -> bytes:
    if not s.isascii() or not s.isprintable():
        raise CodecError(f"{s[:40]!r} is not printable ASCII")
    b = s.encode("ascii")
    return _uv(len(b)) + b


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.pos = 0

    def raw(self, b: bytes | memoryview) -> None:
        self.parts.append(b)
        self.pos += len(b)

    def array(self, a: np.ndarray, dt: np.dtype) -> None:
        pad = -self.pos % dt.itemsize
        if pad:
            self.raw(b"\0" * pad)
        self.raw(memoryview(np.ascontiguousarray(a, dtype=dt)).cast("B"))


def encode_compact(tensors: Mapping[str, EncodedTensor], meta: UpdateMeta) -> bytes:
    """Deterministic v2 bytes for already-encoded tensors (names in sorted order)."""
    w = _Writer()
    flags = _KIND_WEIGHTS if meta.kind == "weights" else 0
    w.raw(MAGIC + bytes([flags]) + _uv(meta.round) + _uv(meta.num_samples))
    w.raw(_text(meta.device_id) + _text(meta.model_version) + _uv(len(tensors)))
    w.raw(struct.pack("<I", layout_hash({k: tuple(t.shape) for k, t in tensors.items()})))
    prev = ""
    for name in sorted(tensors):
        t = tensors[name]
        common = len(_common_prefix(prev, name))
        w.raw(_uv(common) + _text(name[common:]))
        prev = name
        if isinstance(t, DenseF32 | DenseF16):
            f32 = isinstance(t, DenseF32)
            w.raw(bytes([ENC_F32 if f32 else ENC_F16]))
            w.array(t.values, _VAL_DT[_VAL_F32 if f32 else _VAL_F16])
        elif isinstance(t, DenseInt8 | DenseInt4):
            i8 = isinstance(t, DenseInt8)
            w.raw(bytes([ENC_INT8 if i8 else ENC_INT4]) + _uv(t.block))
            w.array(t.scales, _VAL_DT[_VAL_F32])
            w.array(t.q if i8 else t.packed, np.dtype("i1") if i8 else np.dtype("u1"))
        else:
            from edgefed import sparse  # deferred: keeps the import graph as in wire.py

            n = math.prod(t.shape)
            coding, data = sparse.encode_indices(t.indices, n)
            vk = {np.dtype("float32"): _VAL_F32, np.dtype("float16"): _VAL_F16}.get(
                t.values.dtype, _VAL_I8
            )
            sflags = vk | (_SP_BITMAP if coding == "bitmap" else 0)
            sflags |= _SP_ABSENT if t.fill == "absent" else 0
            w.raw(bytes([ENC_SPARSE, sflags]) + _uv(int(t.indices.size)))
            if coding == "varint":
                w.raw(_uv(len(data)))
            w.raw(memoryview(np.ascontiguousarray(data, np.uint8)).cast("B"))
            if vk == _VAL_I8:
                w.array(np.array([t.scale], np.float32), _VAL_DT[_VAL_F32])
            w.array(t.values, _VAL_DT[vk])
    body = b"".join(w.parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


# ----------------------------------------------------------------------------- decode


class _Reader:
    """Bounded cursor over ``p[:end]``: nothing is read or viewed past ``end``."""

    def __init__(self, p: bytes, pos: int, end: int) -> None:
        self.p, self.pos, self.end = p, pos, end

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise CodecError(f"payload truncated: {what} missing")
        v = self.p[self.pos]
        self.pos += 1
        return v

    def uv(self, what: str, hi: int) -> int:
        v, shift = 0, 0
        while True:
            if shift > 63:
                raise CodecError(f"{what}: varint longer than 10 bytes")
            b = self.u8(what)
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and shift > 7:
                    raise CodecError(f"{what}: varint not minimally encoded")
                break
        if v > hi:
            raise CodecError(f"{what} {v} exceeds the limit of {hi}")
        return v

    def take(self, nbytes: int, what: str) -> int:
        if nbytes > self.end - self.pos:
            raise CodecError(f"payload truncated: {what} needs {nbytes} bytes")
        start = self.pos
        self.pos += nbytes
        return start

    def text(self, what: str, cap: int) -> str:
        n = self.uv(f"{what} length", cap)
        start = self.take(n, what)
        raw = self.p[start : start + n]
        if not all(0x20 <= c <= 0x7E for c in raw):
            raise CodecError(f"{what} is not printable ASCII")
        return raw.decode("ascii")

    def array(self, dt: np.dtype, count: int, what: str) -> np.ndarray:
        pad = -self.pos % dt.itemsize
        start = self.take(pad, f"{what} padding")
        if any(self.p[start : start + pad]):
            raise CodecError(f"{what}: padding bytes must be zero")
        start = self.take(count * dt.itemsize, what)  # count comes from the schema
        a = np.frombuffer(self.p, dt, count, start)
        if a.__array_interface__["data"][0] % dt.alignment:  # bytes not 8-aligned in memory
            a = a.copy()
        return a


def _finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:
        return not np.any((a.view(np.uint16) & 0x7C00) == 0x7C00)
    return bool(_s.all_finite(a, 0))


# |q| <= 128 (int8; int4 <= 8), so q * s stays finite only for s <= FLT_MAX / 128. Found by
# benchmarks/fuzz_wire.py: a scale of 7.8e37 passed "finite" and decoded to Inf. Encoders
# write s = max|x| / 127, so only |x| > 0.99 * FLT_MAX (never a real update) is refused.
MAX_SCALE = float(np.finfo(np.float32).max) / 128


def _scales(a: np.ndarray, name: str) -> np.ndarray:
    if not _finite(a) or np.any(a < 0) or np.any(a > MAX_SCALE):
        raise CodecError(f"tensor {name!r}: scales must be finite, >= 0 and <= FLT_MAX/128")
    return a


def _tensor(r: _Reader, name: str, shape: tuple[int, ...]) -> EncodedTensor:
    n = math.prod(shape)
    enc = r.u8(f"tensor {name!r} encoding")
    if enc in (ENC_F32, ENC_F16):
        v = r.array(_VAL_DT[_VAL_F32 if enc == ENC_F32 else _VAL_F16], n, f"tensor {name!r}")
        if not _finite(v):
            raise CodecError(f"tensor {name!r}: values contain NaN or Inf")
        return (DenseF32 if enc == ENC_F32 else DenseF16)(shape, v)
    if enc in (ENC_INT8, ENC_INT4):
        block = r.uv(f"tensor {name!r} block", max(1, n))
        if block < 1:
            raise CodecError(f"tensor {name!r}: block must be >= 1")
        s = _scales(r.array(_VAL_DT[_VAL_F32], -(-n // block), f"tensor {name!r} scales"), name)
        if enc == ENC_INT8:
            return DenseInt8(shape, r.array(np.dtype("i1"), n, f"tensor {name!r}"), s, block)
        packed = r.array(np.dtype("u1"), (n + 1) // 2, f"tensor {name!r}")
        return DenseInt4(shape, packed, s, block)
    if enc != ENC_SPARSE:
        raise CodecError(f"tensor {name!r}: unknown encoding id {enc}")
    sflags = r.u8(f"tensor {name!r} sparse flags")
    vk = sflags & 0x03
    if sflags & ~0x0F or vk not in _VAL_DT:
        raise CodecError(f"tensor {name!r}: bad sparse flags 0x{sflags:02x}")
    nnz = r.uv(f"tensor {name!r} nnz", n)
    if sflags & _SP_BITMAP:
        ilen = (n + 7) // 8
    else:
        ilen = r.uv(f"tensor {name!r} index bytes", 5 * nnz)
        if ilen < nnz:
            raise CodecError(f"tensor {name!r}: {ilen} index bytes cannot hold {nnz} varints")
    start = r.take(ilen, f"tensor {name!r} indices")
    coding = "bitmap" if sflags & _SP_BITMAP else "varint"
    try:
        idx = _s.decode_indices(np.frombuffer(r.p, np.uint8, ilen, start), coding, nnz, n)
    except ValueError as e:
        raise CodecError(f"tensor {name!r}: {e}") from None
    scale = 1.0
    if vk == _VAL_I8:
        scale = float(_scales(r.array(_VAL_DT[_VAL_F32], 1, f"tensor {name!r} scale"), name)[0])
    v = r.array(_VAL_DT[vk], nnz, f"tensor {name!r} values")
    if vk != _VAL_I8 and not _finite(v):
        raise CodecError(f"tensor {name!r}: values contain NaN or Inf")
    fill = "absent" if sflags & _SP_ABSENT else "zero"
    return SparseTensor(shape, idx, v, scale, fill, validated=True)


def decode_compact(
    payload: bytes, schema: ModelSchema, lim: DecodeLimits
) -> tuple[UpdateMeta, dict[str, EncodedTensor]]:
    """Validate and decode a v2 payload (the caller checked type and size limit)."""
    p = bytes(payload) if not isinstance(payload, bytes) else payload
    if len(p) < len(MAGIC) + 4:
        raise CodecError("payload truncated: shorter than magic and checksum")
    if p[:4] != MAGIC:
        raise CodecError("not an edgefed.update v2 payload (bad magic)")
    end = len(p) - 4
    (crc,) = struct.unpack_from("<I", p, end)
    if zlib.crc32(memoryview(p)[:end]) != crc:
        raise CodecError("integrity check failed: crc32 mismatch")
    r = _Reader(p, 4, end)
    flags = r.u8("flags")
    if flags & ~_KIND_WEIGHTS:
        raise CodecError(f"reserved flag bits set: 0x{flags:02x}")
    rnd = r.uv("meta.round", _MAX_META_INT)
    samples = r.uv("meta.num_samples", _MAX_META_INT)
    dev = r.text("meta.device_id", _MAX_TEXT)
    ver = r.text("meta.model_version", _MAX_TEXT)
    kind = "weights" if flags & _KIND_WEIGHTS else "delta"
    meta = UpdateMeta(rnd, dev, samples, ver, kind)  # type: ignore[arg-type]
    count = r.uv("tensor count", min(lim.max_tensors, len(schema)))
    (layout,) = struct.unpack_from("<I", p, r.take(4, "layout hash"))
    out: dict[str, EncodedTensor] = {}
    prev = ""
    for _ in range(count):
        common = r.uv("name prefix length", len(prev))
        name = prev[:common] + r.text("tensor name suffix", _MAX_NAME - common)
        if name <= prev and out:
            raise CodecError(f"tensor {name!r}: names must be strictly increasing")
        if name not in schema:
            raise CodecError(f"tensor {name!r} is not in the model schema")
        out[name] = _tensor(r, name, schema[name])
        prev = name
    if r.pos != end:
        raise CodecError(f"{end - r.pos} trailing bytes after the last tensor")
    if layout != layout_hash({k: schema[k] for k in out}):
        raise CodecError("tensor shapes differ from the model schema (layout hash mismatch)")
    return meta, out
