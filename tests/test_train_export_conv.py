"""Convolution rewrites of the training-step exporter (issue 13, conv13) against torch
autograd at geometries random gate inputs rarely stress: the dense depthwise Conv1d form
(strides, padding wider than the kernel reach, dilation, one output step) and the
ConvTranspose backward (output_padding, dilation, groups); plus one exported step."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, conv_grads, decompositions, export_training_step

# (length, kernel, stride, padding, dilation)
DEPTHWISE_1D = [
    (49, 3, 2, 1, 1),
    (16, 5, 1, 2, 1),
    (10, 3, 1, 2, 2),
    (7, 3, 3, 0, 1),
    (5, 5, 1, 4, 1),
]


@pytest.mark.parametrize("geom", DEPTHWISE_1D)
def test_dense_depthwise_conv1d_matches_autograd(geom: tuple[int, ...]) -> None:
    length, k, s, p, d = geom
    gen = torch.Generator().manual_seed(length * 31 + k)
    x = torch.randn(3, 4, length, generator=gen)
    w, b = torch.randn(4, 1, k, generator=gen), torch.randn(4, generator=gen)
    assert conv_grads.dense_depthwise_1d(x, w, 4)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    want = F.conv1d(xs, ws, bs, s, p, d, groups=4)
    got = conv_grads.depthwise_1d_forward(x, w, b, [s], [p], [d])
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=gen)
    gx, gw, gb = torch.autograd.grad(want, (xs, ws, bs), g)
    ox, ow, ob = conv_grads.depthwise_1d_backward(g, x, w, [s], [p], [d], [True, True, True])
    for a, e in ((ox, gx), (ow, gw), (ob, gb)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# (in, out, kernel, stride, padding, output_padding, dilation, groups), 2-D
TRANSPOSED = [
    (4, 6, 3, 2, 1, 1, 1, 1),
    (4, 6, 3, 2, 0, 1, 2, 2),
    (6, 6, 3, 1, 1, 0, 1, 6),
    (6, 6, 3, 2, 1, 1, 1, 6),
    (4, 6, 1, 1, 0, 0, 1, 1),
    (4, 8, 4, 3, 2, 2, 1, 2),
]


@pytest.mark.parametrize("geom", TRANSPOSED)
def test_transposed_convolution_backward_matches_autograd(geom: tuple[int, ...]) -> None:
    cin, cout, k, s, p, op, d, groups = geom
    gen = torch.Generator().manual_seed(sum(geom))
    x = torch.randn(3, cin, 5, 6, generator=gen)
    w = torch.randn(cin, cout // groups, k, k, generator=gen)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = F.conv_transpose2d(xs, ws, None, s, p, op, groups, d)
    g = torch.randn(y.shape, generator=gen)
    gx, gw = torch.autograd.grad(y, (xs, ws), g)
    ox, ow, ob = conv_grads.transposed_convolution_backward(
        g, x, w, [s, s], [p, p], [d, d], groups, [True, True, True], decompositions._weight_grad
    )
    torch.testing.assert_close(ox, gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ow, gw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ob, g.sum(dim=(0, 2, 3)))


@pytest.mark.system  # exports and verifies a step
def test_exported_depthwise_conv1d_step_has_no_grouped_conv_and_trains_like_torch() -> None:
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=8),
        nn.ReLU(),
        nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    x = torch.randn(6, 3, 20)
    m(x)
    g = export_training_step(m, (x, torch.randint(0, 2, (6,))), optimizer=SGD(momentum=0.9))
    nodes = onnx.load_from_string(g.onnx).graph.node
    grouped = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose")
               and any(a.name == "group" and a.i > 1 for a in n.attribute)]  # fmt: skip
    assert not grouped
    tr = StepTrainer(g.onnx, g.manifest)
    init = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    tr.set_params(init)
    xb = np.random.default_rng(0).standard_normal((8, 3, 20)).astype(np.float32)
    yb = np.arange(8) % 2
    tr.train_epochs(xb, yb, epochs=1, batch_size=8, lr=0.1, shuffle=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(m(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
    opt.step()
    assert not np.allclose(tr.params["2.weight"], init["2.weight"])  # the depthwise layer learnt
    for k, v in m.state_dict().items():
        np.testing.assert_allclose(tr.params[k], v.detach().numpy(), rtol=1e-4, atol=1e-5)
