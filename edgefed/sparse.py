"""Typed wrapper over ``edgefed._core.sparse``: top-k, error feedback, index coding, int4.

The C++ binding validates every argument (dtype, contiguity, lengths, index order and
range, finiteness) and raises ``ValueError``; this module only shapes inputs and outputs.
Indices are always strictly increasing ``uint32`` (delta coding relies on it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

from edgefed._core import sparse as _s

__all__ = [
    "accumulate_dense",
    "accumulate_int4",
    "accumulate_int8",
    "accumulate_sparse",
    "decode_indices",
    "dequantize_int4",
    "ef_topk",
    "encode_indices",
    "pack_int4",
    "quantize_int4",
    "quantize_int8_blocks",
    "topk",
    "unpack_int4",
]

F32 = NDArray[np.float32]
U32 = NDArray[np.uint32]
IndexCoding = Literal["varint", "bitmap"]


def _flat_f32(x: NDArray, name: str) -> F32:
    a = np.ascontiguousarray(x)
    if a.dtype != np.float32:
        raise ValueError(f"{name}: expected float32, got {a.dtype}")
    return a.reshape(-1)


def _inplace(a: NDArray, name: str) -> F32:
    """Flat view of an array updated in place (a reshape copy would silently lose writes)."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous or a.dtype != np.float32:
        raise ValueError(f"{name}: must be a C-contiguous float32 array (updated in place)")
    return a.reshape(-1)


def topk(
    x: NDArray[np.float32],
    k: int,
    *,
    approximate: bool = False,
    tolerance: float = 0.1,
    seed: int = 0,
    threads: int = 0,
    index_dtype: type[np.unsignedinteger] | type[np.signedinteger] = np.uint32,
) -> tuple[NDArray, F32]:
    """Largest-|x| entries -> (ascending indices, values).

    Exact mode returns exactly ``min(k, x.size)`` entries (ties: lowest indices first).
    Approximate mode returns the exact top-m for some m with
    ``|m - k| <= ceil(tolerance * k)`` (guaranteed by an exact fallback).
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    idx, vals = _s.topk(_flat_f32(x, "x"), int(k), approximate, float(tolerance), seed, threads)
    if index_dtype is not np.uint32:
        idx = idx.astype(index_dtype)
    return idx, vals


def ef_topk(
    residual: F32,
    update: F32,
    k: int,
    *,
    quantize: bool = True,
    approximate: bool = False,
    tolerance: float = 0.1,
    seed: int = 0,
    threads: int = 0,
) -> tuple[U32, NDArray, float]:
    """Error feedback in place: residual += update; send top-k; residual -= what was sent.

    Returns (indices, int8 codes or float32 values, scale). ``residual`` must be a
    writeable contiguous float32 array; it is modified in place.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    r = _inplace(residual, "residual")
    idx, vals, scale = _s.ef_topk(
        r, _flat_f32(update, "update"), int(k), quantize, approximate, tolerance, seed, threads
    )
    return idx, vals, float(scale)


def encode_indices(
    indices: NDArray, n: int, coding: Literal["auto", "varint", "bitmap"] = "auto"
) -> tuple[IndexCoding, NDArray[np.uint8]]:
    """Strictly increasing indices < n -> (coding, bytes); "auto" picks the smaller."""
    idx = np.asarray(indices)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"index out of range for size {n}")
    name, data = _s.encode_indices(np.ascontiguousarray(idx, dtype=np.uint32), int(n), coding)
    return name, data


def decode_indices(data: NDArray[np.uint8], coding: str, count: int, n: int) -> U32:
    """Inverse of encode_indices; validates count, order, range and trailing bytes."""
    if count < 0 or n < 0:
        raise ValueError("count and n must be >= 0")
    return _s.decode_indices(np.ascontiguousarray(data, dtype=np.uint8), coding, count, n)


def pack_int4(q: NDArray[np.int8]) -> NDArray[np.uint8]:
    """int8 codes (saturated to [-8, 7]) -> two per byte, low nibble first (ONNX int4)."""
    return _s.pack_int4(np.ascontiguousarray(q, dtype=np.int8).reshape(-1))


def unpack_int4(packed: NDArray[np.uint8], n: int) -> NDArray[np.int8]:
    return _s.unpack_int4(np.ascontiguousarray(packed, dtype=np.uint8), int(n))


def quantize_int4(x: F32, block: int, threads: int = 0) -> tuple[NDArray[np.uint8], F32]:
    """Block-wise symmetric int4: scale = max|x| / 7 per block -> (packed, scales)."""
    return _s.quantize_int4_blocks(_flat_f32(x, "x"), int(block), threads)


def dequantize_int4(
    packed: NDArray[np.uint8], n: int, block: int, scales: F32, threads: int = 0
) -> F32:
    return _s.dequantize_int4_blocks(packed, int(n), int(block), scales, threads)


def quantize_int8_blocks(x: F32, block: int, threads: int = 0) -> tuple[NDArray[np.int8], F32]:
    """Block-wise symmetric int8: scale = max|x| / 127 per block -> (codes, scales)."""
    return _s.quantize_int8_blocks(_flat_f32(x, "x"), int(block), threads)


def accumulate_dense(sums: F32, x: NDArray, weight: float, threads: int = 0) -> None:
    """sums += weight * x for float32 / float16 x (flattened)."""
    _s.acc_dense(_inplace(sums, "sums"), np.ascontiguousarray(x).reshape(-1), weight, threads)


def accumulate_int8(
    sums: F32, q: NDArray[np.int8], scales: F32, block: int, weight: float, threads: int = 0
) -> None:
    _s.acc_dense_int8(_inplace(sums, "sums"), q.reshape(-1), scales, int(block), weight, threads)


def accumulate_int4(
    sums: F32, packed: NDArray[np.uint8], scales: F32, block: int, weight: float, threads: int = 0
) -> None:
    _s.acc_dense_int4(_inplace(sums, "sums"), packed, scales, int(block), weight, threads)


def accumulate_sparse(
    sums: F32,
    weight_sums: F32 | None,
    indices: U32,
    values: NDArray,
    scale: float,
    weight: float,
    threads: int = 0,
) -> None:
    """sums[idx] += weight * scale * values; weight_sums[idx] += weight when given."""
    ws = None if weight_sums is None else _inplace(weight_sums, "weight_sums")
    _s.acc_sparse(_inplace(sums, "sums"), ws, indices, values, float(scale), weight, threads)
