"""Small reference PyTorch models used by tests, benchmarks and the demo (torch only).

Sizes follow the benchmark definitions of issue 4: digits are 8x8 (64 features, 10 classes),
"28x28" models take MNIST-shaped input (1x28x28).
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


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["cnn_28", "digits_cnn", "digits_mlp", "mlp_784", "param_count", "torch"]
