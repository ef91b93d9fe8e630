"""Convolution backward forms of wgrad13 (issue 13) against torch autograd: the strided
weight gradient read through a space-to-depth view (stride 2 and 3, padding 0/1/2, dilation
2, non-square maps and kernels, odd sizes, groups, batch 1 and 5), the 1x1 input gradient as
a Conv by the transposed weight, and an exported user network with such layers trained in
the torch-free trainer like torch at batch sizes other than the traced one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_export_mbgrad import _train_both
from torch import nn

from edgefed.train_export import SGD, conv_grads, decompositions, export_training_step

# (batch, c_in, c_out, height, width, kh, kw, stride, padding, dilation, groups)
STRIDED = [
    (5, 3, 4, 11, 9, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 2, 3, 13, 10, 3, 3, (3, 3), (2, 2), (1, 1), 1),
    (5, 4, 2, 9, 12, 3, 2, (2, 3), (0, 1), (1, 1), 1),
    (1, 3, 5, 15, 14, 3, 3, (2, 2), (2, 0), (2, 2), 1),
    (5, 4, 6, 10, 7, 5, 3, (3, 2), (1, 2), (1, 2), 2),
    (1, 6, 4, 8, 8, 1, 1, (2, 2), (0, 0), (1, 1), 1),
    (5, 3, 3, 7, 9, 4, 4, (2, 2), (2, 1), (1, 1), 1),
]


def _grads(geom: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, ci, co, h, w, kh, kw, s, p, d, groups = geom
    gen = torch.Generator().manual_seed(sum(geom[:7]))
    x = torch.randn(n, ci, h, w, generator=gen)
    wt = torch.randn(co, ci // groups, kh, kw, generator=gen, requires_grad=True)
    y = F.conv2d(x, wt, None, s, p, d, groups)
    g = torch.randn(y.shape, generator=gen)
    return x, wt, g, torch.autograd.grad(y, wt, g)[0]


@pytest.mark.parametrize("geom", STRIDED)
def test_strided_weight_grad_matches_autograd(geom: tuple) -> None:
    x, wt, g, want = _grads(geom)
    _, _, _, _, _, kh, kw, s, p, d, groups = geom
    cols = conv_grads.strided_patches(x, g.shape[2:], (kh, kw), s, p, d)
    assert len(cols) == kh * kw  # the space-to-depth form applies to every geometry here
    got = decompositions._weight_grad(g, x, wt.shape, list(s), list(p), list(d), groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_strided_weight_grad_detects_a_wrong_window() -> None:
    """The comparison above can fail: windows read one column off give another result."""
    geom = STRIDED[0]
    x, wt, g, want = _grads(geom)
    got = decompositions._weight_grad(g, x.roll(1, 3), wt.shape, [2, 2], [1, 1], [1, 1], 1)
    assert not torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 7, 3, 6, 5), (1, 16, 64, 4, 4), (5, 6, 9, 1, 1)])
def test_pointwise_input_grad_matches_autograd(shape: tuple) -> None:
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, ci, h, w, generator=gen, requires_grad=True)
    wt = torch.randn(co, ci, 1, 1, generator=gen)
    y = F.conv2d(x, wt)
    g = torch.randn(y.shape, generator=gen)
    want = torch.autograd.grad(y, x, g)[0]
    got = conv_grads.pointwise_input_grad(g, wt)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class StridedUserNet(nn.Module):
    """A user's network: a 3-channel stride-2 stem on an odd non-square image, a stride-3
    dilated conv with asymmetric padding, a grouped stride-2 rectangular conv and 1x1 convs
    (one on a 1x1 map, as in squeeze-excitation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.dil = nn.Conv2d(12, 12, 3, stride=3, padding=(2, 0), dilation=2)
        self.grp = nn.Conv2d(12, 8, (3, 2), stride=2, padding=(1, 2), groups=4)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn(self.stem(x)))
        h = F.relu(self.dil(F.relu(self.pw(h))))
        h = self.grp(h)
        h = h * torch.sigmoid(self.se(h.mean(dim=(2, 3), keepdim=True)))
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("batch", [1, 5])
def test_exported_strided_step_trains_like_torch(batch: int) -> None:
    torch.manual_seed(13)
    m = StridedUserNet()
    shape = (3, 23, 19)
    g = export_training_step(
        m, (torch.randn(4, *shape), torch.randint(0, 3, (4,))), optimizer=SGD(momentum=0.9)
    )
    rng = np.random.default_rng(batch)
    xb = rng.standard_normal((batch, *shape)).astype(np.float32)
    yb = np.arange(batch) % 3
    tr, ref = _train_both(m, g, xb, yb, batch)
    for k, v in ref.state_dict().items():
        if k in tr.params:
            np.testing.assert_allclose(tr.params[k], v.detach().numpy(), rtol=1e-4, atol=2e-5)
    for k in ("stem.weight", "dil.weight", "grp.weight", "pw.weight"):
        assert not np.allclose(tr.params[k], m.state_dict()[k].numpy()), k
