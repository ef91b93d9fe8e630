"""Compressed tensor forms, as carried on the wire and handed to the accumulator.

Each form can expand itself (``to_dense``) and add itself, weighted, into a float32
accumulator without expanding (``accumulate``). ``fill`` says what a sparse form's
missing coordinates mean: ``"zero"`` (top-k: the update is zero there, the weight still
counts) or ``"absent"`` (a partial update: no weight there, averages ignore it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgefed import sparse

__all__ = ["DenseF16", "DenseF32", "DenseInt4", "DenseInt8", "EncodedTensor", "SparseTensor"]


@dataclass(frozen=True)
class DenseF32:
    shape: tuple[int, ...]
    values: np.ndarray  # float32 [n]
    fill = "zero"

    def to_dense(self) -> np.ndarray:
        return self.values.astype(np.float32, copy=True).reshape(self.shape)

    def accumulate(self, sums: np.ndarray, wsums: np.ndarray | None, w: float, t: int) -> None:
        sparse.accumulate_dense(sums, self.values, w, t)


@dataclass(frozen=True)
class DenseF16:
    shape: tuple[int, ...]
    values: np.ndarray  # float16 [n]
    fill = "zero"

    def to_dense(self) -> np.ndarray:
        return self.values.astype(np.float32).reshape(self.shape)

    def accumulate(self, sums: np.ndarray, wsums: np.ndarray | None, w: float, t: int) -> None:
        sparse.accumulate_dense(sums, self.values, w, t)


@dataclass(frozen=True)
class DenseInt8:
    """Symmetric int8; one scale per ``block`` consecutive elements of the flat tensor."""

    shape: tuple[int, ...]
    q: np.ndarray  # int8 [n]
    scales: np.ndarray  # float32 [ceil(n / block)]
    block: int
    fill = "zero"

    def to_dense(self) -> np.ndarray:
        n = self.q.size
        s = np.repeat(self.scales, self.block)[:n] if n else self.scales[:0]
        return (self.q.astype(np.float32) * s).reshape(self.shape)

    def accumulate(self, sums: np.ndarray, wsums: np.ndarray | None, w: float, t: int) -> None:
        sparse.accumulate_int8(sums, self.q, self.scales, self.block, w, t)


@dataclass(frozen=True)
class DenseInt4:
    """Block-wise int4, ONNX packing (low nibble first), scale = max|x| / 7 per block."""

    shape: tuple[int, ...]
    packed: np.ndarray  # uint8 [ceil(n / 2)]
    scales: np.ndarray  # float32 [ceil(n / block)]
    block: int
    fill = "zero"

    def to_dense(self) -> np.ndarray:
        n = math.prod(self.shape)
        return sparse.dequantize_int4(self.packed, n, self.block, self.scales).reshape(self.shape)

    def accumulate(self, sums: np.ndarray, wsums: np.ndarray | None, w: float, t: int) -> None:
        sparse.accumulate_int4(sums, self.packed, self.scales, self.block, w, t)


@dataclass(frozen=True)
class SparseTensor:
    """Strictly increasing uint32 indices with float32 / float16 / int8 values."""

    shape: tuple[int, ...]
    indices: np.ndarray  # uint32 [nnz]
    values: np.ndarray  # float32 | float16 | int8 [nnz]
    scale: float = 1.0  # int8 only
    fill: Literal["zero", "absent"] = "zero"
    # Set by decode_update, whose C++ index decoder already proved the indices strictly
    # increasing and in range; the accumulator then skips its own O(nnz) re-check.
    validated: bool = field(default=False, compare=False, repr=False)

    def to_dense(self) -> np.ndarray:
        out = np.zeros(math.prod(self.shape), np.float32)
        v = self.values.astype(np.float32)
        out[self.indices] = v * np.float32(self.scale) if self.values.dtype == np.int8 else v
        return out.reshape(self.shape)

    def accumulate(self, sums: np.ndarray, wsums: np.ndarray | None, w: float, t: int) -> None:
        scale = self.scale if self.values.dtype == np.int8 else 1.0
        target = wsums if self.fill == "absent" else None
        sparse.accumulate_sparse(sums, target, self.indices, self.values, scale, w, t)


EncodedTensor = DenseF32 | DenseF16 | DenseInt8 | DenseInt4 | SparseTensor
