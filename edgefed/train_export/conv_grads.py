"""Backward of transposed convolutions (``nn.ConvTranspose1d/2d``) for step graphs.

Why no new kernels: a transposed convolution is the adjoint of the ordinary convolution
with the same weight, stride, padding, dilation and groups, so

* its input gradient is that ordinary convolution applied to ``grad_out`` (one ONNX Conv;
  the ``output_padding`` rows are read through the convolution's own padding), and
* its weight gradient is the ordinary convolution's weight gradient with the roles of
  input and output swapped: ``grad_out`` plays the input, the layer input plays the output
  gradient. The weight layout already matches (``in, out / groups, kh, kw``), so the same
  im2col / pointwise / depthwise forms the exporter uses for Conv apply unchanged.

Depthwise Conv1d on short sequences (keyword spotting, sensor windows) gets a dense form
instead: onnxruntime's grouped Conv / ConvTranspose with weights as graph inputs runs one
tiny im2col + GEMV per (sample, channel) (the strided depthwise ConvTranspose was the
largest node of the keyword-spotting step). With a constant 0/1 "spread" matrix S of shape
(k * L_out, L_in), the k shifted/strided views of every row are ONE MatMul ``x @ S^T``;
forward, input gradient and weight gradient are then a broadcast Mul and a ReduceSum or a
second MatMul each, all MLAS GEMMs or contiguous elementwise passes. S costs k * L_out * L_in
multiply-adds per row where the direct form needs k * L_out, so it is used for short rows
only (``DENSE_MAX_LEN``); onnxruntime's common-subexpression pass shares ``x @ S^T`` between
the forward and the weight gradient.

The verification gate checks the result against torch autograd like every other layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

aten = torch.ops.aten


def transposed_convolution_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
    conv_weight_grad: Callable[..., Tensor],
) -> tuple[Any, Any, Any]:
    """(grad_input, grad_weight, grad_bias) of a 2-D transposed convolution (4-D tensors)."""
    gi = gw = gb = None
    if output_mask[0]:
        gi = aten.convolution.default(
            grad_out, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
            groups,
        )  # fmt: skip
    if output_mask[1]:
        gw = conv_weight_grad(x, grad_out, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_out.sum(dim=(0, 2, 3))
    return gi, gw, gb


DENSE_MAX_LEN = 128  # rows longer than this keep onnxruntime's Conv (dense cost grows with L)


def dense_depthwise_1d(x: Tensor, weight: Tensor, groups: int, transposed: bool = False) -> bool:
    """True when a Conv1d is depthwise (one filter per channel) on rows short enough for S."""
    return (
        not transposed
        and x.dim() == 3
        and weight.dim() == 3
        and groups > 1
        and groups == int(x.shape[1]) == int(weight.shape[0])
        and int(weight.shape[1]) == 1
        and int(x.shape[2]) <= DENSE_MAX_LEN
    )


def _spread(l_in: int, l_out: int, k: int, stride: int, pad: int, dil: int, like: Tensor) -> Tensor:
    """S (k * l_out, l_in): S[j * l_out + o, o * stride + j * dil - pad] = 1 (inside the row)."""
    s = np.zeros((k * l_out, l_in), np.float32)
    for j in range(k):
        for o in range(l_out):
            i = o * stride + j * dil - pad
            if 0 <= i < l_in:
                s[j * l_out + o, i] = 1.0
    # built outside the trace (a constant in the graph, not 100+ traced index writes)
    return torch.tensor(s.tolist(), dtype=like.dtype)


def _geometry(x: Tensor, weight: Tensor, stride: Any, padding: Any, dilation: Any) -> Any:
    n_in, k = int(x.shape[2]), int(weight.shape[2])
    s, p, d = int(stride[0]), int(padding[0]), int(dilation[0])
    l_out = (n_in + 2 * p - d * (k - 1) - 1) // s + 1
    return k, l_out, _spread(n_in, l_out, k, s, p, d, x)


def _patches(x: Tensor, spread: Tensor, k: int, l_out: int) -> Tensor:
    """(N, C, k, L_out): for each tap j the row values it multiplies."""
    n, c = x.shape[0], int(x.shape[1])
    return torch.matmul(x, spread.t()).reshape(n, c, k, l_out)


def depthwise_1d_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
) -> Tensor:
    k, l_out, spread = _geometry(x, weight, stride, padding, dilation)
    c = int(x.shape[1])
    y = (_patches(x, spread, k, l_out) * weight.reshape(1, c, k, 1)).sum(2)
    return y if bias is None else y + bias.reshape(1, c, 1)


def depthwise_1d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Any,
    padding: Any,
    dilation: Any,
    output_mask: Sequence[bool],
) -> tuple[Any, Any, Any]:
    k, l_out, spread = _geometry(x, weight, stride, padding, dilation)
    n, c = x.shape[0], int(x.shape[1])
    g = grad_out.unsqueeze(2)  # N, C, 1, L_out
    gi = gw = gb = None
    if output_mask[0]:  # scatter every tap's contribution back through S
        gi = torch.matmul((g * weight.reshape(1, c, k, 1)).reshape(n, c, k * l_out), spread)
    if output_mask[1]:
        gw = (_patches(x, spread, k, l_out) * g).sum(dim=(0, 3)).reshape(c, 1, k)
    if output_mask[2]:
        gb = grad_out.sum(dim=(0, 2))
    return gi, gw, gb


def pointwise_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    """1x1 convolution input gradient as a 1x1 Conv of ``grad_out`` by ``W^T`` (``[C, O, 1, 1]``).

    onnxruntime's ConvTranspose runs a GEMM and then a col2im pass even for 1x1 kernels, and
    a per-sample ``bmm`` needs the weight expanded (copied) per sample; its plain Conv runs a
    1x1 stride-1 kernel as one GEMM per sample straight on the map: 0.41 -> 0.32 ms
    (32x16x16x16 -> 64 channels), 0.48 -> 0.29 (64 -> 16), 0.32 -> 0.17 (32x32x8x8 -> 128),
    1 thread, ``benchmarks/conv_backward_forms.py`` (bmm form before, ConvTranspose before that).
    """
    wt = weight.transpose(0, 1)  # C, O, 1, 1 (tiny)
    return aten.convolution.default(grad_out, wt, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)


def strided_patches(
    x: Tensor, out_hw: Sequence[int], k_hw: Sequence[int], *conv: Sequence[int]
) -> list[Tensor]:
    """The ``kh * kw`` input windows of a strided convolution, channel-major ``[C, N, Ho, Wo]``
    each (row-major over the kernel), read as CONTIGUOUS slices of a space-to-depth view.

    Why: onnxruntime copies a strided Slice element by element, and im2col of a stride-2
    layer is ``kh * kw`` of them. Padding the channel-major input to a multiple of the stride
    and splitting every spatial axis into (plane row, phase) turns the map into ``sh * sw``
    phase planes ``[C, sh, sw, N, Hq, Wq]`` (ONE Transpose); kernel offset ``d * i`` is phase
    ``(d * i) % s`` at plane offset ``(d * i) // s``, so every window is a unit-step slice.
    1.37 -> 0.93 ms (3->16 stem, 32x3x32x32), 1.76 -> 1.21 ms (16->32, 32x16x16x16), whole
    im2col weight gradient, 1 thread, ``benchmarks/conv_backward_forms.py``.
    ``conv``: stride, padding, dilation. Returns [] when the geometry does not fit (callers
    keep their strided slices then).
    """
    (ho, wo), (kh, kw) = out_hw, k_hw
    (sh, sw), (ph, pw), (dh, dw) = conv
    c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    hq, wq = ho + dh * (kh - 1) // sh, wo + dw * (kw - 1) // sw  # plane sizes
    need_h, need_w = sh * hq, sw * wq  # padded extent the planes cover
    if need_h < ph or need_w < pw:
        return []
    xt = x.transpose(0, 1)  # C, N, H, W
    if need_h < h + ph or need_w < w + pw:  # rows / columns no window reads
        xt = xt[:, :, : need_h - ph, : need_w - pw]
    ch, cw = min(h, need_h - ph), min(w, need_w - pw)
    xt = torch.nn.functional.pad(xt, [pw, need_w - pw - cw, ph, need_h - ph - ch])
    xq = xt.reshape(c, -1, hq, sh, wq, sw).permute(0, 3, 5, 1, 2, 4)  # C, sh, sw, N, Hq, Wq
    cols = []
    for i in range(kh):
        a, u = divmod(dh * i, sh)
        for j in range(kw):
            b, v = divmod(dw * j, sw)
            cols.append(xq[:, u, v, :, a : a + ho, b : b + wo])
    return cols


def depthwise_weight_grad_conv(
    grad_out: Tensor, x: Tensor, w_shape: Any, stride: Any, padding: Any, dilation: Any
) -> Tensor:
    """Depthwise 2-D weight gradient as ONE grouped Conv (standard ONNX).

    ``dW[c, i, j] = sum_{n,h,w} x_pad[n, c, d*i + s*h, d*j + s*w] * g[n, c, h, w]`` is a
    convolution of ``x`` seen as ONE sample with ``C*N`` channels (channel-major, group c =
    the batch of channel c) by the "kernel" ``g`` as ``[C, N, Ho, Wo]``, groups = C, with the
    roles of stride and dilation swapped (conv stride = layer dilation, conv dilation =
    layer stride), padding as the layer's. The result is at least ``kh x kw`` (more when
    the stride does not divide the padded size); the extra rows/columns are cut off.
    Used for strided layers only: see ``decompositions._depthwise_weight_grad``.
    """
    c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    kh, kw = int(w_shape[2]), int(w_shape[3])
    xt = x.transpose(0, 1).reshape(1, -1, h, w)
    gt = grad_out.transpose(0, 1)  # C, N, Ho, Wo
    out = aten.convolution.default(
        xt, gt, None, list(dilation), list(padding), list(stride), False, [0, 0], c
    )
    return out[:, :, :kh, :kw].reshape(c, 1, kh, kw)


def convolution(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
) -> Any:
    """``aten.convolution``: the dense form for short depthwise Conv1d, else left alone."""
    if not dense_depthwise_1d(x, weight, groups, transposed):
        return NotImplemented
    return depthwise_1d_forward(x, weight, bias, stride, padding, dilation)


__all__ = [
    "convolution",
    "dense_depthwise_1d",
    "depthwise_1d_backward",
    "depthwise_weight_grad_conv",
    "pointwise_input_grad",
    "strided_patches",
    "transposed_convolution_backward",
]
