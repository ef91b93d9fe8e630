"""Update wire format (normative spec: docs/wire-format.md): encode and decode.

Two versions, told apart by the first bytes: v2 (default, compact binary, compact.py)
starts with ``b"EFU\x02"``; v1 is a safetensors file (its first 8 bytes are a header
length <= 1 MiB, so it can never start with that magic).

v1 is retired: nothing sends it, and ``decode_update`` reads v2 only (a device decodes
only what the coordinator sends now). The v1 reader stays for the one place a stored v1
payload can still exist: a device's ``outbox.bin`` (device_agent/state.py) written before
v2 became the default (2026-11-25) is resent unchanged after an upgrade, so the
coordinator's intake passes ``accept_v1=True``. The v1 writer stays for inspection with
standard safetensors tools. v1 below:

A v1 payload is one safetensors file. ``__metadata__`` holds ``format`` =
``"edgefed.update"``, ``version`` = ``"1"``, ``meta`` (UpdateMeta JSON), ``tensors`` (a
JSON list describing each tensor's encoding) and ``sha256`` over
``b"edgefed.update/1\\n" + meta + b"\\n" + tensors + b"\\n" + body``. Tensor data live
in entries ``<name>/v`` (values / codes), ``<name>/s`` (float32 scales) and ``<name>/i``
(coded indices, uint8).

The decoder trusts nothing: framing first (container.py), then every entry is checked
against sizes derived from the *expected schema* (never from the peer's numbers), then
the digest, and only then are values viewed (zero-copy) and indices decoded in C++.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefed import sparse
from edgefed._core import sparse as _s
from edgefed.codec.compact import MAX_SCALE, decode_compact, encode_compact, is_compact
from edgefed.codec.container import Entry, read_container, write_container
from edgefed.codec.errors import CodecError
from edgefed.codec.schema import DecodeLimits, ModelSchema, UpdateMeta
from edgefed.codec.spec import CompressionSpec, Pipeline
from edgefed.codec.tensors import (
    DenseF16,
    DenseF32,
    DenseInt4,
    DenseInt8,
    EncodedTensor,
    SparseTensor,
)

try:  # dense int8 goes through the foundation's ONNX-exact kernels when present
    from edgefed import quant as _quant
except ImportError:  # pragma: no cover - only while the quant module is being built
    _quant = None

__all__ = ["FORMAT", "VERSION", "DecodedUpdate", "decode_update", "encode_update"]

FORMAT, VERSION = "edgefed.update", "1"
_VALUE_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8}


@dataclass
class DecodedUpdate:
    """A validated update in compressed form; expand with ``to_dense`` only if needed."""

    meta: UpdateMeta
    tensors: dict[str, EncodedTensor] = field(default_factory=dict)
    nbytes: int = 0

    def to_dense(self) -> dict[str, np.ndarray]:
        return {name: t.to_dense() for name, t in self.tensors.items()}


def _digest(meta: str, tensors: str, body: list[memoryview]) -> str:
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n".encode())
    h.update(meta.encode())
    h.update(b"\n")
    h.update(tensors.encode())
    h.update(b"\n")
    for part in body:
        h.update(part)
    return h.hexdigest()


# ----------------------------------------------------------------------------- encode


def _int8_dense(flat: np.ndarray, shape: tuple[int, ...], pipe: Pipeline, t: int) -> DenseInt8:
    n = flat.size
    rows = shape[0] if shape and shape[0] else 1
    block = max(1, min(n // rows if pipe.channel else pipe.block or n, n))
    if _quant is not None:
        qt = _quant.quantize(flat, block_size=block, threads=t or None)
        q, scales = qt.q, np.ascontiguousarray(qt.scale, np.float32).reshape(-1)
    else:
        q, scales = sparse.quantize_int8_blocks(flat, block, t)
    return DenseInt8(shape, q, scales, block)


def _to_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if np.any((h.view(np.uint16) & 0x7C00) == 0x7C00):
        raise CodecError("value overflows float16 (|x| > 65504)")
    return h


def _encode_dense(flat: np.ndarray, shape: tuple[int, ...], pipe: Pipeline, t: int):
    if pipe.kind == "f32" or flat.size == 0:
        return DenseF32(shape, flat.copy())
    if pipe.kind == "f16":
        return DenseF16(shape, _to_f16(flat))
    if pipe.kind == "int8":
        return _int8_dense(flat, shape, pipe, t)
    packed, scales = sparse.quantize_int4(flat, max(1, min(pipe.block, flat.size)), t)
    return DenseInt4(shape, packed, scales, max(1, min(pipe.block, flat.size)))


def _sparse_from(
    shape: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, pipe: Pipeline
) -> tuple[SparseTensor, np.ndarray]:
    """Quantise top-k values per the pipeline -> (tensor, the values the receiver sees)."""
    if pipe.values == "int8":
        q, scale = _s.quantize_int8_one_scale(vals)
        return SparseTensor(shape, idx, q, float(scale)), q.astype(np.float32) * np.float32(scale)
    if pipe.values == "f16":
        h = _to_f16(vals)
        return SparseTensor(shape, idx, h), h.astype(np.float32)
    return SparseTensor(shape, idx, vals), vals


def encode_tensor(
    x: np.ndarray,
    pipe: Pipeline,
    residual: np.ndarray | None = None,
    *,
    approximate: bool = False,
    threads: int = 0,
) -> EncodedTensor:
    """One tensor through its pipeline; with ``residual`` (flat float32, updated in place)
    the error-feedback rule residual = x + residual - decode(encode(x + residual))."""
    shape = tuple(x.shape)
    flat = x.reshape(-1)
    n = flat.size
    if pipe.kind == "topk" and n:
        k = pipe.k_for(n)
        if residual is not None:
            idx, vals, scale = sparse.ef_topk(
                residual, flat, k, quantize=pipe.values == "int8", approximate=approximate,
                threads=threads,
            )  # fmt: skip
            if pipe.values == "int8":
                return SparseTensor(shape, idx, vals, scale)
            enc, seen = _sparse_from(shape, idx, vals, pipe)
            residual[idx] += vals - seen  # zero for float32 values, rounding for fp16
            return enc
        if not _s.all_finite(flat, threads):
            raise CodecError("tensor contains NaN or Inf")
        idx, vals = sparse.topk(flat, k, approximate=approximate, threads=threads)
        return _sparse_from(shape, idx, vals, pipe)[0]
    if residual is not None:
        _s.add_inplace(residual, flat, threads)  # residual := x + residual (checked)
        enc = _encode_dense(residual.copy(), shape, pipe, threads)
        residual -= enc.to_dense().reshape(-1)
        return enc
    if not _s.all_finite(flat, threads):
        raise CodecError("tensor contains NaN or Inf")
    return _encode_dense(flat, shape, pipe, threads)


def _entries(name: str, t: EncodedTensor) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    d: dict[str, Any] = {"name": name, "shape": list(t.shape)}
    if isinstance(t, DenseF32):
        d["enc"] = "f32"
        return d, [(f"{name}/v", t.values)]
    if isinstance(t, DenseF16):
        d["enc"] = "f16"
        return d, [(f"{name}/v", t.values)]
    if isinstance(t, DenseInt8 | DenseInt4):
        d["enc"], d["block"] = ("int8" if isinstance(t, DenseInt8) else "int4"), t.block
        v = t.q if isinstance(t, DenseInt8) else t.packed
        return d, [(f"{name}/v", v), (f"{name}/s", t.scales)]
    n = math.prod(t.shape)
    coding, data = sparse.encode_indices(t.indices, n)
    d.update(enc="sparse", nnz=int(t.indices.size), coding=coding, fill=t.fill)
    d["values"] = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(
        t.values.dtype, "I8"
    )
    out = [(f"{name}/i", data), (f"{name}/v", t.values)]
    if t.values.dtype == np.int8:
        out.append((f"{name}/s", np.array([t.scale], np.float32)))
    return d, out


def encode_encoded(
    tensors: Mapping[str, EncodedTensor], meta: UpdateMeta, *, version: int = 2
) -> bytes:
    """Serialise already-encoded tensors (e.g. a partial SparseTensor with fill="absent").

    ``version=2`` (default) writes the compact binary format, ``version=1`` the
    safetensors container. Decision: always v2, not "v2 when smaller": v2 is smaller for
    every update (it drops exactly the fields v1 repeats), and one default keeps byte
    counts predictable. v1 stays decodable and writable for standard-tool inspection.
    """
    if version == 2:
        return encode_compact(tensors, meta)
    if version != 1:
        raise CodecError(f"unknown wire format version {version!r}")
    descs, arrays = [], []
    for name in sorted(tensors):
        d, arrs = _entries(name, tensors[name])
        descs.append(d)
        arrays += arrs
    meta_json = meta.to_json()
    tensors_json = json.dumps(descs, separators=(",", ":"))
    md = {"format": FORMAT, "version": VERSION, "meta": meta_json, "tensors": tensors_json}

    def finalize(body: list[memoryview]) -> dict[str, str]:
        return {**md, "sha256": _digest(meta_json, tensors_json, body)}

    return write_container(arrays, md, finalize)


def encode_update(
    tensors: Mapping[str, np.ndarray],
    meta: UpdateMeta,
    spec: CompressionSpec | str,
    feedback: Any = None,
    *,
    threads: int = 0,
    version: int = 2,
) -> bytes:
    """Compress ``tensors`` (name -> float array) per ``spec`` into one payload.

    With ``feedback`` (an ErrorFeedback, uplink deltas only) each tensor's residual is
    added before compression and keeps what compression dropped.
    """
    if isinstance(spec, str):
        spec = CompressionSpec.parse(spec)
    if not isinstance(meta, UpdateMeta):
        raise CodecError("meta must be an UpdateMeta")
    if feedback is not None and meta.kind != "delta":
        raise CodecError("error feedback applies to kind='delta' updates only")
    encoded: dict[str, EncodedTensor] = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if not np.issubdtype(a.dtype, np.floating):
            raise CodecError(f"tensor {name!r}: expected a float array, got {a.dtype}")
        x = np.ascontiguousarray(a, dtype=np.float32)
        pipe = spec.for_tensor(name, x.size)
        residual = None
        if feedback is not None:
            residual = feedback.residual(name, x.shape)
        try:
            encoded[name] = encode_tensor(
                x, pipe, residual, approximate=spec.topk_mode == "approx", threads=threads
            )
        except CodecError as e:
            raise CodecError(f"tensor {name!r}: {e.reason}") from None
        except ValueError as e:
            raise CodecError(f"tensor {name!r}: {e}") from None
    return encode_encoded(encoded, meta, version=version)


# ----------------------------------------------------------------------------- decode


def _int(d: dict[str, Any], key: str, lo: int, hi: int, name: str) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise CodecError(f"tensor {name!r}: {key} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _expect(entries: dict[str, Entry], key: str, dtype: str, count: int) -> Entry:
    e = entries.get(key)
    if e is None:
        raise CodecError(f"missing entry {key!r}")
    if e.dtype != dtype or e.shape != (count,):
        raise CodecError(f"entry {key!r}: expected {dtype}[{count}], got {e.dtype}{list(e.shape)}")
    return e


def _finite_f(a: np.ndarray) -> bool:
    if a.dtype == np.float16:
        return not np.any((a.view(np.uint16) & 0x7C00) == 0x7C00)
    return bool(_s.all_finite(a, 0))


def _scales(p: bytes, e: Entry, name: str) -> np.ndarray:
    s = e.view(p)
    if not _finite_f(s) or np.any(s < 0) or np.any(s > MAX_SCALE):  # q * s must stay finite
        raise CodecError(f"tensor {name!r}: scales must be finite, >= 0 and <= FLT_MAX/128")
    return s


def _decode_tensor(
    p: bytes, d: Any, schema: ModelSchema, entries: dict[str, Entry], used: set[str]
) -> tuple[str, EncodedTensor]:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise CodecError("tensor description must be an object with a name")
    name = d["name"]
    if name not in schema:
        raise CodecError(f"tensor {name!r} is not in the model schema")
    shape = schema[name]
    if d.get("shape") != list(shape):
        raise CodecError(f"tensor {name!r}: shape {d.get('shape')!r} != expected {list(shape)}")
    n = math.prod(shape)
    enc = d.get("enc")
    allowed = {
        "f32": {"enc"},
        "f16": {"enc"},
        "int8": {"enc", "block"},
        "int4": {"enc", "block"},
        "sparse": {"enc", "nnz", "coding", "fill", "values"},
    }
    if enc not in allowed:
        raise CodecError(f"tensor {name!r}: unknown encoding {enc!r}")
    if set(d) != allowed[enc] | {"name", "shape"}:
        raise CodecError(f"tensor {name!r}: unexpected or missing fields for {enc!r}")

    def take(suffix: str, dtype: str, count: int) -> Entry:
        used.add(f"{name}/{suffix}")
        return _expect(entries, f"{name}/{suffix}", dtype, count)

    if enc in ("f32", "f16"):
        v = take("v", "F32" if enc == "f32" else "F16", n).view(p)
        if not _finite_f(v):
            raise CodecError(f"tensor {name!r}: values contain NaN or Inf")
        return name, (DenseF32 if enc == "f32" else DenseF16)(shape, v)
    if enc in ("int8", "int4"):
        block = _int(d, "block", 1, max(1, n), name)
        nb = -(-n // block)
        s = _scales(p, take("s", "F32", nb), name)
        if enc == "int8":
            return name, DenseInt8(shape, take("v", "I8", n).view(p), s, block)
        return name, DenseInt4(shape, take("v", "U8", (n + 1) // 2).view(p), s, block)
    nnz = _int(d, "nnz", 0, n, name)
    coding, fill, vd = d["coding"], d["fill"], d["values"]
    if coding not in ("varint", "bitmap") or fill not in ("zero", "absent"):
        raise CodecError(f"tensor {name!r}: bad coding or fill")
    if vd not in _VALUE_DTYPES:
        raise CodecError(f"tensor {name!r}: values dtype {vd!r} not allowed")
    ie = entries.get(f"{name}/i")
    if ie is None or ie.dtype != "U8" or len(ie.shape) != 1:
        raise CodecError(f"tensor {name!r}: missing or malformed index entry")
    ilen = ie.shape[0]
    if coding == "bitmap" and ilen != (n + 7) // 8:
        raise CodecError(f"tensor {name!r}: bitmap must be {(n + 7) // 8} bytes, got {ilen}")
    if coding == "varint" and not nnz <= ilen <= 5 * nnz:
        raise CodecError(f"tensor {name!r}: {ilen} index bytes cannot hold {nnz} varints")
    take("i", "U8", ilen)
    try:
        idx = _s.decode_indices(ie.view(p), coding, nnz, n)
    except ValueError as e:
        raise CodecError(f"tensor {name!r}: {e}") from None
    v = take("v", vd, nnz).view(p)
    scale = 1.0
    if vd == "I8":
        scale = float(_scales(p, take("s", "F32", 1), name)[0])
    elif not _finite_f(v):
        raise CodecError(f"tensor {name!r}: values contain NaN or Inf")
    return name, SparseTensor(shape, idx, v, scale, fill, validated=True)


def decode_update(
    payload: bytes,
    schema: ModelSchema,
    limits: DecodeLimits | None = None,
    *,
    accept_v1: bool = False,
) -> DecodedUpdate:
    """Validate and decode one payload against the expected model.

    Raises CodecError (with ``reason``) for anything malformed, truncated, oversized,
    non-finite, corrupted or not matching ``schema``. Tensors not present in the payload
    are simply absent (a partial update); the accumulator gives them no weight.
    ``accept_v1``: also read the retired v1 format; only the coordinator's intake needs it
    (a stored device outbox from before v2 can still arrive there; see the module doc).
    """
    lim = limits or DecodeLimits()
    if not isinstance(schema, ModelSchema):
        raise CodecError("schema must be a ModelSchema")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > lim.max_bytes:
        raise CodecError(f"payload of {len(payload)} bytes exceeds the limit of {lim.max_bytes}")
    if is_compact(payload):
        meta, tensors = decode_compact(payload, schema, lim)
        return DecodedUpdate(meta, tensors, len(payload))
    if not accept_v1:
        found = bytes(payload[:4]).hex(" ")
        raise CodecError(
            f"not a v2 update payload: expected magic 45 46 55 02, found {found or 'nothing'}"
            " (wire format v1 is retired here)"
        )
    max_entries = min(lim.max_tensors, len(schema)) * 3
    md, entries, body0 = read_container(payload, lim.max_bytes, lim.max_header_bytes, max_entries)
    if md.get("format") != FORMAT or md.get("version") != VERSION:
        raise CodecError(f"not an {FORMAT} v{VERSION} payload")
    if set(md) != {"format", "version", "meta", "tensors", "sha256"}:
        raise CodecError("metadata must hold exactly format, version, meta, tensors, sha256")
    meta = UpdateMeta.from_json(md["meta"])
    try:
        descs = json.loads(md["tensors"])
    except (ValueError, RecursionError):
        raise CodecError("tensor list is not valid JSON") from None
    if not isinstance(descs, list) or len(descs) > min(lim.max_tensors, len(schema)):
        raise CodecError("tensor list must be a list no longer than the model")
    p = bytes(payload) if not isinstance(payload, bytes) else payload
    if _digest(md["meta"], md["tensors"], [memoryview(p)[body0:]]) != md["sha256"]:
        raise CodecError("integrity check failed: sha256 mismatch")
    out: dict[str, EncodedTensor] = {}
    used: set[str] = set()
    for d in descs:
        name, t = _decode_tensor(p, d, schema, entries, used)
        if name in out:
            raise CodecError(f"tensor {name!r} appears twice")
        out[name] = t
    if used != set(entries):
        extra = sorted(set(entries) - used)[:3]
        raise CodecError(f"payload has entries not described by the tensor list: {extra}")
    return DecodedUpdate(meta, out, len(p))
