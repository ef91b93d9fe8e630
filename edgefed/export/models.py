"""Reference models for the digits task. Any nn.Module classifier works with the pipeline."""

from __future__ import annotations

import torch
from torch import nn


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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
