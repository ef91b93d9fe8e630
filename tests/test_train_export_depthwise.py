"""Depthwise 2-D convolution paths of the training-step exporter (issue 13, dw13) against
torch autograd: the strided weight gradient as one grouped Conv (geometries where the
stride does not divide the padded map, dilation, rectangular kernels), and an exported
strided depthwise step trained in the torch-free trainer like torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, decompositions, export_training_step

# (channels, height, width, kh, kw, stride, padding, dilation)
DEPTHWISE_2D = [
    (4, 9, 9, 3, 3, (2, 2), (1, 1), (1, 1)),
    (3, 15, 13, 3, 3, (2, 3), (2, 1), (2, 1)),
    (5, 8, 7, 5, 3, (3, 2), (2, 0), (1, 1)),
    (2, 6, 6, 3, 3, (1, 1), (1, 1), (1, 1)),
    (6, 11, 10, 2, 4, (2, 1), (0, 2), (1, 2)),
]


@pytest.mark.parametrize("geom", DEPTHWISE_2D)
def test_depthwise_weight_grad_matches_autograd(geom: tuple) -> None:
    c, h, w, kh, kw, s, p, d = geom
    gen = torch.Generator().manual_seed(sum(geom[:5]))
    x = torch.randn(5, c, h, w, generator=gen)
    wt = torch.randn(c, 1, kh, kw, generator=gen, requires_grad=True)
    y = F.conv2d(x, wt, None, s, p, d, c)
    g = torch.randn(y.shape, generator=gen)
    want = torch.autograd.grad(y, wt, g)[0]
    got = decompositions._weight_grad(g, x, wt.shape, list(s), list(p), list(d), c)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_exported_strided_depthwise_step_trains_like_torch() -> None:
    torch.manual_seed(5)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 3),
    )
    x = torch.randn(6, 3, 9, 9)
    g = export_training_step(m, (x, torch.randint(0, 3, (6,))), optimizer=SGD(momentum=0.9))
    tr = StepTrainer(g.onnx, g.manifest)
    init = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    tr.set_params(init)
    xb = np.random.default_rng(1).standard_normal((8, 3, 9, 9)).astype(np.float32)
    yb = np.arange(8) % 3
    tr.train_epochs(xb, yb, epochs=1, batch_size=8, lr=0.1, shuffle=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(m(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
    opt.step()
    assert not np.allclose(tr.params["2.weight"], init["2.weight"])  # the depthwise layer learnt
    for k, v in m.state_dict().items():
        if k not in tr.params:
            continue  # num_batches_tracked: not a step input
        np.testing.assert_allclose(tr.params[k], v.detach().numpy(), rtol=1e-4, atol=1e-5)
