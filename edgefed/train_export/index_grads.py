"""Backward decompositions for index-based layers that torchlib cannot translate.

Both are scatter-adds of the output gradient (ONNX ScatterElements / ScatterND with an add
reduction), written with plain aten ops so the exporter's own translations apply:

* ``_adaptive_avg_pool2d_backward``: two constant averaging matrices (MatMul).
* ``adaptive_max_pool2d_backward`` (AdaptiveMaxPool1d/2d; 1-D runs the 2-D op on a height-1
  map): each output gradient goes to the flat input position its index names.
* ``_embedding_bag_backward`` for ``mode='sum'`` and ``'mean'`` (optionally per-sample
  weights and ``padding_idx``): the bag of every index is recomputed from ``offsets`` instead of
  trusting the forward's ``offset2bag`` / ``bag_size`` outputs, whose ONNX translation is not
  meant for gradients. ``mode='max'`` and ``scale_grad_by_freq`` stay unsupported (the
  diagnosis then names the op and suggests the alternative).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten


def adaptive_max_pool2d_backward(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    if x.dim() != 4:
        return NotImplemented
    n, c, h, w = (x.shape[0], int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    flat = grad_out.new_zeros((n, c, h * w))
    out = flat.scatter_add(2, indices.reshape(n, c, -1), grad_out.reshape(n, c, -1))
    return out.reshape(n, c, h, w)


def embedding_bag_backward(
    grad: Tensor,
    indices: Tensor,
    offsets: Tensor,
    offset2bag: Tensor,
    bag_size: Tensor,
    maximum_indices: Tensor,
    num_weights: int,
    scale_grad_by_freq: bool,
    mode: int,
    sparse: bool,
    per_sample_weights: Tensor | None,
    padding_idx: int = -1,
) -> Any:
    if mode not in (0, 1) or scale_grad_by_freq:
        return NotImplemented
    idx = indices.reshape(-1)
    pos = torch.arange(idx.shape[0], dtype=offsets.dtype, device=idx.device)
    # bag of index i = number of bag starts <= i, minus one (a trailing include_last_offset
    # entry equals len(indices) and never counts)
    bag = (offsets.reshape(1, -1) <= pos.reshape(-1, 1)).to(torch.int64).sum(1) - 1
    rows = grad.index_select(0, bag)
    keep = None
    if padding_idx >= 0:
        keep = (idx != padding_idx).to(grad.dtype)
    if mode == 1:
        counts = grad.new_zeros((grad.shape[0],)).index_add(
            0, bag, keep if keep is not None else torch.ones_like(idx, dtype=grad.dtype)
        )
        rows = rows / counts.clamp(min=1.0).index_select(0, bag).unsqueeze(1)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.reshape(-1, 1)
    if keep is not None:
        rows = rows * keep.unsqueeze(1)
    return grad.new_zeros((int(num_weights), int(grad.shape[1]))).index_add(0, idx, rows)


def embedding_bag_forward(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int = -1,
) -> Any:
    """sum / mean bags as a gather + index_add (torchlib's _embedding_bag translation made a
    graph onnxruntime crashed on). Returns aten's 4 outputs; only the first is meaningful."""
    if mode not in (0, 1):
        return NotImplemented
    idx = indices.reshape(-1)
    n_bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    starts = offsets[:n_bags] if include_last_offset else offsets
    pos = torch.arange(idx.shape[0], dtype=offsets.dtype, device=idx.device)
    bag = (starts.reshape(1, -1) <= pos.reshape(-1, 1)).to(torch.int64).sum(1) - 1
    rows = weight.index_select(0, idx)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.reshape(-1, 1)
    keep = (idx != padding_idx).to(weight.dtype) if padding_idx >= 0 else None
    if keep is not None:
        rows = rows * keep.unsqueeze(1)
    out = weight.new_zeros((n_bags, int(weight.shape[1]))).index_add(0, bag, rows)
    counts = weight.new_zeros((n_bags,)).index_add(
        0, bag, keep if keep is not None else torch.ones_like(idx, dtype=weight.dtype)
    )
    if mode == 1:
        out = out / counts.clamp(min=1.0).unsqueeze(1)
    return out, bag, counts.to(torch.int64), counts.to(torch.int64)


def _adaptive_matrix(size: int, out: int) -> list[list[float]]:
    """(out, size) averaging matrix of adaptive pooling (torch's floor/ceil windows)."""
    rows = []
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(size)])
    return rows


def adaptive_avg_pool2d_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """Two small constant MatMuls: A_h^T @ grad @ A_w (windows may overlap)."""
    if x.dim() != 4:
        return NotImplemented
    h, w = int(x.shape[2]), int(x.shape[3])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    ah = torch.tensor(_adaptive_matrix(h, ho), dtype=grad_out.dtype)
    aw = torch.tensor(_adaptive_matrix(w, wo), dtype=grad_out.dtype)
    return torch.matmul(torch.matmul(ah.t(), grad_out), aw)


def adaptive_max_pool2d(x: Tensor, output_size: Any) -> Any:
    """Divisible sizes: a max pool with kernel = stride = in / out (same flat indices)."""
    if x.dim() != 4:
        return NotImplemented
    h, w = int(x.shape[2]), int(x.shape[3])
    oh, ow = (int(v) if v is not None else d for v, d in zip(output_size, (h, w), strict=True))
    if h % oh or w % ow:
        return NotImplemented
    k = [h // oh, w // ow]
    return aten.max_pool2d_with_indices.default(x, k, k)


def table() -> dict[Any, Any]:
    return {
        aten.adaptive_max_pool2d.default: adaptive_max_pool2d,
        aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward,
        aten._embedding_bag.default: embedding_bag_forward,
        aten._embedding_bag_forward_only.default: embedding_bag_forward,
        aten.adaptive_max_pool2d_backward.default: adaptive_max_pool2d_backward,
        aten._embedding_bag_backward.default: embedding_bag_backward,
    }


__all__ = ["adaptive_max_pool2d_backward", "embedding_bag_backward", "table"]
