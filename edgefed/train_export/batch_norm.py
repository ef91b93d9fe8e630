"""Train-mode BatchNorm forward and backward with fewer passes over the activation map.

Why: onnxruntime runs each elementwise node as one pass over the whole map (no fusion of
arbitrary chains), so on MobileNet-style nets BatchNorm's pass count is a large share of
the step. torch's reference decompositions compute ``x - mean`` three times (inside
var_mean, for the output, again in the backward), scale by rstd and by the weight in two
passes, and build the input gradient in five. Here: forward = mean, centre, square-mean,
one per-channel scale (rstd * weight), bias (6 passes, was 9); backward = centre, the two
channel sums, ``g * a + xc * b + c`` with per-channel a, b, c (8 passes, was 9-10).
Same formulas (no ``E[x^2] - E[x]^2`` shortcut: it cancels badly when |mean| >> std).
The per-channel affine maps of the centred input (``xc * scale + bias`` forward,
``xc * b + c`` backward) are one inference-mode BatchNormalization node each (``_affine``:
one pass instead of Mul + Add; 2-2.6x faster on the MobileNet maps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch._decomp import decompositions as ref

aten = torch.ops.aten


def _shape(x: Tensor) -> tuple[list[int], list[int]]:
    """(reduction dims, broadcast shape of a per-channel vector)."""
    dims = [0, *range(2, x.dim())]
    return dims, [1, int(x.shape[1])] + [1] * (x.dim() - 2)


def _centred(x: Tensor, mean: Tensor, bshape: list[int]) -> Tensor:
    """``x - mean`` built the SAME way in the forward and the backward, so onnxruntime's
    common-subexpression pass computes it once per layer (the forward's keepdim mean and
    the backward's reshaped saved mean were two Subs: one full pass per BN layer)."""
    return x - mean.reshape(bshape)


# momentum value that marks the per-channel affine BatchNormalization nodes built here (no
# layer has a negative momentum); with eps 0, mean 0 and var 1 the node is y = x*scale + shift
_AFFINE_MARK = -1.0


def _affine(xc: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``xc * scale + shift`` per channel as ONE inference-mode BatchNormalization node.

    Why: onnxruntime runs Mul and Add as two passes over the map; its BatchNormalization
    kernel is one. It folds the node into ``x * (scale / sqrt(var + eps)) + (shift - mean *
    ...)``, which with mean 0, var 1, eps 0 is exactly ``x * scale + shift``: no
    cancellation, because ``xc`` is already centred (feeding the raw input and the batch
    mean instead failed the gate at bench scale, see RESULTS.md dw13).
    """
    c = int(xc.shape[1])
    zeros = torch.zeros(c, dtype=xc.dtype)
    ones = torch.ones(c, dtype=xc.dtype)
    return aten._native_batch_norm_legit_no_training.default(
        xc, scale, shift, zeros, ones, _AFFINE_MARK, 0.0
    )[0]


def native_batch_norm_legit_no_training(*args: Any) -> Any:
    """Frozen statistics: torch's reference formulas; the affine nodes above stay one op."""
    momentum, eps = args[5], args[6]
    if momentum == _AFFINE_MARK and eps == 0.0:
        return NotImplemented  # stays aten -> ONNX BatchNormalization
    return ref._native_batch_norm_legit_no_training(*args)


def _train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dims, bshape = _shape(x)
    c = int(x.shape[1])
    save_mean = x.mean(dims)
    xc = _centred(x, save_mean, bshape)
    var = (xc * xc).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.reshape(bshape)
    if bias is not None and x.dtype == torch.float32:
        out = _affine(xc, scale.reshape(c), bias)
    else:
        out = xc * scale if bias is None else xc * scale + bias.reshape(bshape)
    save_rstd = rstd.reshape(c)
    n = x.numel() / c
    new_rm = momentum * save_mean + (1 - momentum) * running_mean
    new_rv = momentum * (var.reshape(c) * (n / (n - 1))) + (1 - momentum) * running_var
    return out, save_mean, save_rstd, new_rm, new_rv


def batch_norm_with_update_functional(*args: Any) -> Any:
    """``(x, weight, bias, running_mean, running_var, momentum, eps)``; train mode always."""
    out, save_mean, save_rstd, new_rm, new_rv = _train_forward(*args)
    reserve = ref._get_batch_norm_reserve_tensor(*args[:5], args[6], training=True)
    return out, save_mean, save_rstd, reserve, new_rm, new_rv


def native_batch_norm_legit_functional(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> Any:
    if not training:
        return ref._native_batch_norm_legit_functional(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
    return _train_forward(x, weight, bias, running_mean, running_var, momentum, eps)


def batch_norm_with_update(*args: Any) -> Any:
    """In-place running statistics: the functional variant, then the writes."""
    out, save_mean, save_rstd, reserve, new_rm, new_rv = batch_norm_with_update_functional(*args)
    args[3].copy_(new_rm)
    args[4].copy_(new_rv)
    return out, save_mean, save_rstd, reserve


def native_batch_norm_legit(*args: Any) -> Any:
    """``_native_batch_norm_legit`` / ``native_batch_norm`` (what ``F.batch_norm`` reaches)."""
    running_mean, running_var, training = args[3], args[4], args[5]
    if not training or running_mean is None or running_var is None:
        return ref.native_batch_norm(*args)
    out, save_mean, save_rstd, new_rm, new_rv = native_batch_norm_legit_functional(*args)
    running_mean.copy_(new_rm)
    running_var.copy_(new_rv)
    return out, save_mean, save_rstd


def native_batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    save_mean: Tensor | None,
    save_invstd: Tensor | None,
    train: bool,
    eps: float,
    output_mask: list[bool],
) -> Any:
    if not train or save_mean is None or save_invstd is None or x.dtype != torch.float32:
        return ref.native_batch_norm_backward(
            grad_out, x, weight, running_mean, running_var, save_mean, save_invstd,
            train, eps, output_mask,
        )  # fmt: skip
    dims, bshape = _shape(x)
    n = x.numel() / int(x.shape[1])
    xc = _centred(x, save_mean, bshape)
    sum_g = grad_out.sum(dims)
    dot = (grad_out * xc).sum(dims)
    w = save_invstd if weight is None else save_invstd * weight
    # grad_input = w * (g - sum_g / n - xc * dot * invstd^2 / n)
    a = w.reshape(bshape)
    b = -(dot / n) * save_invstd * save_invstd * w
    c = -(sum_g / n) * w
    grad_input = grad_out * a + _affine(xc, b, c) if output_mask[0] else None
    grad_weight = dot * save_invstd if output_mask[1] else None
    grad_bias = sum_g if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


def batch_norm_backward(*args: Any) -> Any:
    """``native_batch_norm_backward`` plus a trailing reserve tensor (unused on CPU)."""
    return native_batch_norm_backward(*args[:10])


def table() -> dict[Any, Any]:
    return {
        aten._batch_norm_with_update.default: batch_norm_with_update,
        aten._batch_norm_with_update_functional.default: batch_norm_with_update_functional,
        aten._native_batch_norm_legit.default: native_batch_norm_legit,
        aten.native_batch_norm.default: native_batch_norm_legit,
        aten._native_batch_norm_legit_functional.default: native_batch_norm_legit_functional,
        aten.native_batch_norm_backward.default: native_batch_norm_backward,
        aten.batch_norm_backward.default: batch_norm_backward,
        aten._native_batch_norm_legit_no_training.default: native_batch_norm_legit_no_training,
    }


__all__ = ["table"]
