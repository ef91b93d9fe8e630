"""MobileNet-style step rewrites (issue 13, mbgrad13): exported steps with odd depthwise
layers and offset BatchNorm inputs trained in the torch-free trainer like torch. (The
depthwise weight gradient's two lowerings are checked op by op in
test_train_export_depthwise_grad.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, StepGraph, export_training_step


def _train_both(
    m: nn.Module, g: StepGraph, xb: np.ndarray, yb: np.ndarray, batch: int
) -> tuple[StepTrainer, nn.Module]:
    """Three epochs of SGD momentum 0.9 in the torch-free trainer and in torch, from ``m``."""
    tr = StepTrainer(g.onnx, g.manifest)
    tr.set_params({k: v.detach().numpy() for k, v in m.state_dict().items()}, strict=False)
    tr.train_epochs(xb, yb, epochs=3, batch_size=batch, lr=0.1, shuffle=False)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        opt.step()
    return tr, ref


class OddDepthwiseNet(nn.Module):
    """A user's block: 20 channels, a non-square map, a dilated rectangular depthwise kernel,
    BatchNorm + ReLU6 and Hardswish (the MobileNetV2/V3 activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 20, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(20)
        self.dw = nn.Conv2d(20, 20, (3, 5), padding=(1, 4), dilation=(1, 2), groups=20)
        self.bn2 = nn.BatchNorm2d(20)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn(self.stem(x)))
        h = F.hardswish(self.bn2(self.dw(h))) + h
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_odd_depthwise_step_trains_like_torch(batch: int) -> None:
    torch.manual_seed(7)
    m = OddDepthwiseNet()
    x = torch.randn(4, 3, 6, 9)
    g = export_training_step(
        m, (x, torch.randint(0, 3, (4,))), optimizer=SGD(momentum=0.9), nchwc_alternative=False
    )
    rng = np.random.default_rng(batch)
    xb = (rng.standard_normal((batch, 3, 6, 9)) + 1.0).astype(np.float32)
    yb = np.arange(batch) % 3
    tr, ref = _train_both(m, g, xb, yb, batch)
    for k, v in ref.state_dict().items():
        if k in tr.params:
            np.testing.assert_allclose(tr.params[k], v.detach().numpy(), rtol=1e-4, atol=2e-5)
    assert not np.allclose(tr.params["dw.weight"], m.state_dict()["dw.weight"].numpy())


class OffsetBNNet(nn.Module):
    """BatchNorm fed activations with |mean| = 600 std (a user's unnormalised sensor input),
    trained through the BatchNormalization affine nodes. The float32 centring itself limits
    this: mean 1000 / std 0.5 or 300 / 0.2 fail the gate on main as on this branch (and with
    the rejected ``x * s + (b - mean * s)`` fold alike), so this is a regression check of
    the affine nodes on offset data, not a discriminator of the fold."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(5)
        self.conv = nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.conv(self.bn(x)))
        return self.head(h.mean(dim=(2, 3)))


def test_bn_affine_nodes_keep_precision_when_mean_dwarfs_std() -> None:
    torch.manual_seed(9)
    m = OffsetBNNet()
    x = torch.randn(4, 5, 7, 6) * 0.5 + 300.0
    g = export_training_step(
        m, (x, torch.randint(0, 3, (4,))), optimizer=SGD(momentum=0.9), nchwc_alternative=False
    )
    rng = np.random.default_rng(4)
    xb = (rng.standard_normal((6, 5, 7, 6)) * 0.5 + 300.0).astype(np.float32)
    yb = np.arange(6) % 3
    tr, ref = _train_both(m, g, xb, yb, 6)
    sd = ref.state_dict()
    for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "conv.weight"):
        np.testing.assert_allclose(tr.params[k], sd[k].numpy(), rtol=1e-4, atol=2e-5)
