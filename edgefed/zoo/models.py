"""Reference PyTorch models of the tests, benchmarks, demo and export pipeline (torch only).

Any nn.Module classifier works with the library; these are the shared demo models. Sizes
follow the benchmark definitions of issue 4: digits are 8x8 (64 features, 10 classes),
"28x28" models take MNIST-shaped input (1x28x28). ``DigitsCNN`` is the export pipeline's
teacher on the 28x28 noisy-digits task (``edgefed.zoo.data.noisy_digits``).
"""

from __future__ import annotations

import torch
from torch import nn


def digits_mlp(hidden: int = 32) -> nn.Module:
    """MLP 64-hidden-10 for sklearn digits (flattened 8x8 images)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def digits_cnn(channels: int = 8) -> nn.Module:
    """Small CNN for 1x8x8 digits: conv3x3 + ReLU + maxpool 2 + linear."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 16, 10),
    )


def mlp_784() -> nn.Module:
    """MLP 784-1024-512-10 (1.33M parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def cnn_28() -> nn.Module:
    """~1M-parameter CNN on 1x28x28: two conv3x3 blocks (32, 64) + maxpool, FC 3136-288-10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 288),
        nn.ReLU(),
        nn.Linear(288, 10),
    )


class DigitsCNN(nn.Module):
    """Teacher of the design note: conv 32-64-128 (BN, ReLU, maxpool), FC 128, FC 10.

    ``width`` scales every hidden width (a hand-written student; the pipeline's default
    student is the teacher pruned to a width instead, which keeps the teacher's weights).
    Convs have no bias: BN follows. 241,770 parameters at width 1.
    """

    def __init__(
        self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1, image_size: int = 28
    ) -> None:
        super().__init__()
        c1, c2, c3, f = (max(1, round(w * width)) for w in (32, 64, 128, 128))
        layers: list[nn.Module] = []
        prev = in_channels
        for c in (c1, c2, c3):
            layers += [
                nn.Conv2d(prev, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            prev = c
        self.features = nn.Sequential(*layers)
        side = image_size // 8  # three 2x2 max-pools, floor each: 28 -> 14 -> 7 -> 3
        self.fc1 = nn.Linear(c3 * side * side, f)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DigitsCNN", "cnn_28", "digits_cnn", "digits_mlp", "mlp_784", "param_count", "torch"]
