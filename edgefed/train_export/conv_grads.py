"""Backward of transposed convolutions (``nn.ConvTranspose1d/2d``) for step graphs.

Why no new kernels: a transposed convolution is the adjoint of the ordinary convolution
with the same weight, stride, padding, dilation and groups, so

* its input gradient is that ordinary convolution applied to ``grad_out`` (one ONNX Conv;
  the ``output_padding`` rows are read through the convolution's own padding), and
* its weight gradient is the ordinary convolution's weight gradient with the roles of
  input and output swapped: ``grad_out`` plays the input, the layer input plays the output
  gradient. The weight layout already matches (``in, out / groups, kh, kw``), so the same
  im2col / pointwise / depthwise forms the exporter uses for Conv apply unchanged.

The verification gate checks the result against torch autograd like every other layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


__all__ = ["transposed_convolution_backward"]
