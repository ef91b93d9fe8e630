"""The decomposition table used when tracing a training step.

Why own decompositions: onnxscript's torchlib has no ONNX function for several backward ops,
and some forward ops export to ONNX nodes with different semantics (BatchNormalization in
training mode normalises with the RUNNING statistics in the exporter's output: silently wrong).

* ``convolution_backward``: input gradient as a transposed convolution (1x1 layers: a 1x1
  Conv by the transposed weight); weight gradient as im2col (slices of the padded input,
  stacked; strided layers slice a space-to-depth view so every slice is unit-step) + one
  MatMul per group. The "batch as
  channels" convolution formulation exports fine but onnxruntime runs it 2-3x slower than torch
  (the whole gradient map becomes a huge kernel); a GEMM over the patch matrix is what MLAS is
  fast at.
* ``avg_pool2d_backward``: a depthwise transposed convolution with a ones kernel over the
  gradient divided by each window's divisor (a constant map: count_include_pad, ceil_mode
  and divisor_override handled).
* Batch norm (all train-mode variants) and ``native_dropout``: torch's reference decompositions,
  so batch statistics are computed explicitly and new running stats become outputs, and dropout
  draws from RandomUniformLike (ONNX Dropout in onnxruntime gave correlated masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._decomp import core_aten_decompositions, get_decompositions

from . import attention, batch_norm, conv_grads, depthwise_grad, index_grads, pool_ops

aten = torch.ops.aten


def _im2col_weight_grad(
    grad_out: Tensor,
    x: Tensor,
    w_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    out_c, cg, kh, kw = (int(s) for s in w_shape)
    c_in = int(x.shape[1])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    cols = []
    if sh > 1 or sw > 1:  # unit-step slices of a space-to-depth view (see strided_patches)
        cols = conv_grads.strided_patches(x, (ho, wo), (kh, kw), stride, padding, dilation)
    if not cols:
        xt = x.transpose(0, 1)  # C, N, H, W: channel-major so the patch matrix needs no permute
        if ph or pw:
            xt = torch.nn.functional.pad(xt, [pw, pw, ph, ph])
        for i in range(kh):
            for j in range(kw):
                h0, w0 = i * dh, j * dw
                cols.append(
                    xt[:, :, h0 : h0 + sh * (ho - 1) + 1 : sh, w0 : w0 + sw * (wo - 1) + 1 : sw]
                )
    patches = torch.stack(cols, dim=1) if len(cols) > 1 else cols[0].unsqueeze(1)
    # patches: C, K, N, Ho, Wo -> groups, Cg*K, M   (M = N*Ho*Wo); reshapes only, no Gather
    g = groups
    if g == 1:
        gw = torch.mm(
            grad_out.transpose(0, 1).reshape(out_c, -1), patches.reshape(c_in * kh * kw, -1).t()
        )
    else:
        patches = patches.reshape(g, (c_in // g) * kh * kw, -1)
        go = grad_out.transpose(0, 1).reshape(g, out_c // g, -1)  # groups, Og, M
        gw = torch.bmm(go, patches.transpose(1, 2))
    return gw.reshape(out_c, cg, kh, kw)


def convolution_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias_sizes: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> Any:
    if x.dim() not in (3, 4):
        return NotImplemented  # stays aten.convolution_backward -> reported as unsupported
    if conv_grads.dense_depthwise_1d(x, weight, groups, transposed):
        return conv_grads.depthwise_1d_backward(
            grad_out, x, weight, stride, padding, dilation, output_mask
        )
    if x.dim() == 3:  # Conv1d: the 2-D path on a height-1 map (reshapes are free)
        gi, gw, gb = convolution_backward(
            grad_out.unsqueeze(2),
            x.unsqueeze(2),
            weight.unsqueeze(2),
            bias_sizes,
            [1, *stride],
            [0, *padding],
            [1, *dilation],
            transposed,
            [0, *output_padding],
            groups,
            output_mask,
        )
        return (
            gi.squeeze(2) if gi is not None else None,
            gw.squeeze(2) if gw is not None else None,
            gb,
        )
    if transposed:
        return conv_grads.transposed_convolution_backward(
            grad_out, x, weight, stride, padding, dilation, groups, output_mask, _weight_grad
        )
    gi = gw = gb = None
    h, w_ = int(x.shape[2]), int(x.shape[3])
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    pointwise = groups == 1 and kh == kw == 1 and list(stride) == [1, 1] and not any(padding)
    if output_mask[0] and pointwise:
        gi = conv_grads.pointwise_input_grad(grad_out, weight)
    elif output_mask[0]:
        op = [
            h + 2 * padding[0] - dilation[0] * (kh - 1) - 1 - (ho - 1) * stride[0],
            w_ + 2 * padding[1] - dilation[1] * (kw - 1) - 1 - (wo - 1) * stride[1],
        ]
        gi = aten.convolution.default(
            grad_out, weight, None, list(stride), list(padding), list(dilation), True, op, groups
        )
    if output_mask[1]:
        gw = _weight_grad(grad_out, x, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_out.sum(dim=(0, 2, 3))
    return gi, gw, gb


def _weight_grad(grad_out: Tensor, x: Tensor, w_shape: Sequence[int], *conv: Any) -> Tensor:
    """Weight gradient of a 2-D convolution ``grad_out = d/d(conv(x, w))``, the fastest form
    onnxruntime runs for the layer's shape (pointwise / depthwise / general im2col).

    ``conv``: stride, padding, dilation, groups."""
    stride, padding, dilation, groups = conv
    kh, kw = int(w_shape[2]), int(w_shape[3])
    depthwise = groups > 1 and groups == int(x.shape[1]) == int(w_shape[0]) and w_shape[1] == 1
    pointwise = groups == 1 and kh == kw == 1 and list(stride) == [1, 1] and not any(padding)
    if pointwise and int(x.shape[2]) * int(x.shape[3]) == 1:
        # 1x1 maps (squeeze-excitation): ONE GEMM over the batch, reshapes only; 0.057 ->
        # 0.024 ms on 32x96 -> 24 (bmm + ReduceSum below), benchmarks/conv_backward_forms.py
        n = x.shape[0]
        return torch.mm(grad_out.reshape(n, -1).t(), x.reshape(n, -1)).reshape(w_shape)
    if pointwise:
        # per-sample products summed over the batch: no channel-major copies of x and grad.
        # One GEMM over channel-major (0.43 -> 0.76 ms on 32x16x16x16 -> 64) or channels-last
        # (1.05 ms) transposed operands loses: the transposes cost more than the ReduceSum.
        n = x.shape[0]
        go = grad_out.reshape(n, int(grad_out.shape[1]), -1)
        xs = x.reshape(n, int(x.shape[1]), -1)
        return torch.bmm(go, xs.transpose(1, 2)).sum(0).reshape(w_shape)
    if depthwise:
        return _depthwise_weight_grad(grad_out, x, w_shape, stride, padding, dilation)
    return _im2col_weight_grad(grad_out, x, w_shape, stride, padding, dilation, groups)


def _pool_divisors(size: int, k: int, s: int, p: int, out: int) -> list[tuple[int, int]]:
    """Per output index: (window size incl. padding, window size inside the input)."""
    res = []
    for o in range(out):
        start = o * s - p
        end = min(start + k, size + p)
        full = end - start
        lo, hi = max(start, 0), min(end, size)
        res.append((full, hi - lo))
    return res


def avg_pool2d_backward(
    grad_out: Tensor,
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    if x.dim() != 4:
        return NotImplemented
    kh, kw = kernel_size
    sh, sw = stride if stride else kernel_size
    ph, pw = padding if len(padding) == 2 else (padding[0], padding[0])
    h, w = int(x.shape[2]), int(x.shape[3])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    c = int(x.shape[1])
    rows = _pool_divisors(h, kh, sh, ph, ho)
    cols = _pool_divisors(w, kw, sw, pw, wo)
    inv_rows = [
        [
            1.0 / float(divisor_override)
            if divisor_override
            else 1.0 / float(rf * cf if count_include_pad else ri * ci)
            for (cf, ci) in cols
        ]
        for (rf, ri) in rows
    ]
    inv = torch.tensor(inv_rows, dtype=grad_out.dtype)  # a constant: shapes are static here
    scaled = grad_out * inv
    ones = torch.ones(c, 1, kh, kw, dtype=grad_out.dtype)
    full = aten.convolution.default(scaled, ones, None, [sh, sw], [0, 0], [1, 1], True, [0, 0], c)
    fh, fw = int(full.shape[2]), int(full.shape[3])
    need_h, need_w = h + 2 * ph, w + 2 * pw
    if fh < need_h or fw < need_w:
        full = torch.nn.functional.pad(full, [0, max(0, need_w - fw), 0, max(0, need_h - fh)])
    return full[:, :, ph : ph + h, pw : pw + w]


def _depthwise_weight_grad(grad_out: Tensor, x: Tensor, w_shape: Any, *conv: Any) -> Tensor:
    """Depthwise (one filter per channel) weight gradient: per kernel offset, one slice of
    the padded input times the gradient, summed over batch and space.

    The im2col path stacks every offset's slice into one patch tensor (a Concat copying
    the whole k*k-times-larger map again) and transposes both operands for a batched
    MatMul whose rows are single filters: 18 -> 9 ms on a 32x64x16x16 map (1 thread).
    Strided layers take ONE grouped Conv instead (``conv_grads.depthwise_weight_grad_conv``):
    5.9 -> 4.0 ms at stride 2 on 32x64x16x16, while at stride 1 the contiguous slices here
    win (9.2 vs 13.4 ms, 5.4 vs 6.7 ms on 32x128x8x8; microbenchmark, 1 thread, load 2.5).
    Narrow stride-1 maps (MobileNet's) become one marker node that the exporter lowers
    twice, to row GEMMs (default graph) and to one NCHWc convolution (NCHWc variant):
    see :mod:`.depthwise_grad`.
    """
    stride, padding, dilation = conv
    c, _, kh, kw = (int(s) for s in w_shape)
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    sums = []
    wp = int(x.shape[3]) + 2 * pw
    if depthwise_grad.applies(x, stride, padding):
        return torch.ops.edgefed.depthwise_weight_grad.default(grad_out, x, kh, kw, ph, pw, dh, dw)
    if sh == sw == 1:  # every offset is ONE contiguous slice of the row-flattened padded map
        extra = -(-(kw - 1) * dw // wp)  # rows so that the last offset's slice stays inside
        xf = torch.nn.functional.pad(x, [pw, pw, ph, ph + extra]).flatten(2)
        # gradient on the same row pitch; the zero columns meet wrapped-around inputs
        gq = torch.nn.functional.pad(grad_out, [0, wp - wo]).flatten(2)
        q = ho * wp
        for i in range(kh):
            for j in range(kw):
                off = i * dh * wp + j * dw
                sums.append((xf[:, :, off : off + q] * gq).sum(dim=(0, 2)))
        return torch.stack(sums, dim=1).reshape(c, 1, kh, kw)
    return conv_grads.depthwise_weight_grad_conv(grad_out, x, w_shape, stride, padding, dilation)


def hardtanh_backward(grad_out: Tensor, x: Tensor, min_val: float, max_val: float) -> Tensor:
    """ReLU6 / Hardtanh backward as a 0/1 mask multiply (torch's reference uses Where with a
    scalar branch: 5 ms vs ~1.5 ms on a 32x64x16x16 map in onnxruntime, 1 thread)."""
    keep = torch.logical_and(x > min_val, x < max_val)
    return grad_out * keep.to(grad_out.dtype)


def hardswish_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """0 below -3, x/3 + 1/2 inside (-3, 3), 1 from 3 on (torch's values), as masks."""
    above = (x > -3.0).to(grad_out.dtype)
    inside = (x < 3.0).to(grad_out.dtype)
    return grad_out * (above * (inside * (x / 3.0 - 0.5) + 1.0))


def hardsigmoid_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    keep = torch.logical_and(x > -3.0, x < 3.0)
    return grad_out * (keep.to(grad_out.dtype) * (1.0 / 6.0))


def threshold_backward(grad_out: Tensor, x: Tensor, threshold: float) -> Tensor:
    """ReLU's backward as a multiply by a 0/1 mask instead of torch's Where.

    onnxruntime's Where with a scalar branch ran 9x slower than Greater + Cast + Mul (4.4 vs
    0.49 ms on a 32x32x28x28 map). Differences from Where: a zeroed NaN/Inf gradient becomes
    NaN (training has diverged then anyway) and a zeroed negative gradient becomes -0.0.
    """
    return grad_out * (x > threshold).to(grad_out.dtype)


def decomposition_table(training: bool = True) -> dict[Any, Callable[..., Any]]:
    """core aten decompositions + the ones above (built fresh: callers may extend it)."""
    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    table.update(
        get_decompositions(
            [
                aten.max_pool2d_with_indices_backward,
                aten.native_dropout,
                aten._native_batch_norm_legit,
                aten._native_batch_norm_legit_functional,
                aten._native_batch_norm_legit_no_training,
                aten.native_batch_norm,
                aten._batch_norm_with_update,
                aten._batch_norm_with_update_functional,
                aten.native_batch_norm_backward,
            ]
        )
    )
    # Hardswish / Hardsigmoid forward as ONNX's own one-pass HardSwish / HardSigmoid nodes
    # (the core decomposition is Add + Clip + Mul + Div, four passes over the map): 0.33 ->
    # 0.23 ms on 32x96x8x8, 1.20 -> 0.73 ms on 32x64x16x16 (benchmarks/mobilenet_passes.py).
    table.pop(aten.hardswish.default, None)
    table.pop(aten.hardsigmoid.default, None)
    table[aten.convolution.default] = conv_grads.convolution
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.hardtanh_backward.default] = hardtanh_backward
    table[aten.hardswish_backward.default] = hardswish_backward
    table[aten.hardsigmoid_backward.default] = hardsigmoid_backward
    table.update(index_grads.table())
    table.update(batch_norm.table())
    table.update(attention.table())  # sdpa with a hand-written backward (attention.py)
    # Non-overlapping max pooling goes through pool_ops (the exporter's MaxPool-with-indices
    # is 14x slower in onnxruntime); other windows keep torch's reference backward.
    ref_backward = table[aten.max_pool2d_with_indices_backward.default]
    if training:  # inference graphs never read the indices: the exporter's plain MaxPool
        table[aten.max_pool2d_with_indices.default] = pool_ops.max_pool2d_with_indices

    def max_pool_backward(*args: Any, **kwargs: Any) -> Any:
        r = pool_ops.max_pool2d_with_indices_backward(*args, **kwargs)
        return ref_backward(*args, **kwargs) if r is NotImplemented else r

    table[aten.max_pool2d_with_indices_backward.default] = max_pool_backward
    return table


__all__ = ["avg_pool2d_backward", "convolution_backward", "decomposition_table"]
