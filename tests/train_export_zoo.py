"""A zoo of small edge models, one per family the training-step exporter covers (issue 13).

Imported by tests/test_train_export_zoo.py (tiny shapes) and benchmarks/train_zoo.py
(realistic shapes). Defined here, outside the edgefed package, as a user would.
Every entry builds (model, x, y, export kwargs) for a given batch size and scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgefed.train_export import SGD


def conv_bn_act(cin: int, cout: int, k: int, s: int = 1, groups: int = 1, act=nn.ReLU6):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block (expand 1x1, depthwise 3x3, project 1x1), optional V3 SE + Hardswish."""

    def __init__(self, c: int, expand: int, se: bool = False) -> None:
        super().__init__()
        h = c * expand
        act = nn.Hardswish if se else nn.ReLU6
        self.expand = conv_bn_act(c, h, 1, act=act)
        self.dw = conv_bn_act(h, h, 3, groups=h, act=act)
        self.se = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(h, h // 4, 1),
                nn.ReLU(),
                nn.Conv2d(h // 4, h, 1),
                nn.Hardsigmoid(),
            )
            if se
            else None
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        if self.se is not None:
            h = h * self.se(h)
        return x + self.project(h)


def mobilenet(width: int = 8, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        conv_bn_act(3, width, 3, 2),
        InvertedResidual(width, 4),
        conv_bn_act(width, 2 * width, 3, 2),
        InvertedResidual(2 * width, 4),
        InvertedResidual(2 * width, 3, se=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def kws_conv1d(mfcc: int = 10, width: int = 16, classes: int = 6) -> nn.Module:
    """Keyword spotting: 1-D convolutions over MFCC frames (DS-CNN style)."""
    return nn.Sequential(
        nn.Conv1d(mfcc, width, 5, padding=2, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1, groups=width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


class Autoencoder1d(nn.Module):
    """Sensor-window autoencoder (anomaly detection): Conv1d down, ConvTranspose1d up."""

    def __init__(self, channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv1d(channels, width, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.dec = nn.Sequential(
            nn.ConvTranspose1d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(width, channels, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class SensorRNN(nn.Module):
    """GRU or LSTM over an accelerometer-like window, classify from the last step."""

    def __init__(self, kind: str = "gru", features: int = 3, hidden: int = 16, classes: int = 4):
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = cls(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


class TinyTransformer(nn.Module):
    """2-layer transformer encoder over feature frames, mean-pooled."""

    def __init__(self, features: int = 4, d: int = 16, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.proj(x)).mean(1))


class BagText(nn.Module):
    """Bag-of-embeddings text classifier (fastText style)."""

    def __init__(self, vocab: int = 100, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean", padding_idx=0)
        self.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bag(x))


def regression_mlp(features: int = 8, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, 1),
    )


def _flat_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.squeeze(1), y)


@dataclass
class ZooEntry:
    """One zoo model: builder, input maker (batch, generator) -> (x, y), export kwargs."""

    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    kwargs: dict[str, Any]


def _cls(shape: tuple[int, ...], classes: int):
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)

    return make


def _reconstruct(shape: tuple[int, ...]):
    """Target = the input window itself (an autoencoder's reconstruction loss)."""

    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, *shape), generator=g)
        return x, x.clone()

    return make


def _tokens(length: int, vocab: int, classes: int):
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, vocab, (n, length), generator=g)
        return x, torch.randint(0, classes, (n,), generator=g)

    return make


def _regression(features: int):
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, features), generator=g)
        return x, x[:, :3].sum(1) + 0.1 * torch.randn(n, generator=g)

    return make


MOMENTUM = SGD(momentum=0.9)


def zoo(scale: str = "test") -> dict[str, ZooEntry]:
    """scale 'test': tiny inputs (fast exports); 'bench': edge-realistic input sizes."""
    big = scale == "bench"
    img = 32 if big else 12
    frames = 49 if big else 16
    steps = 32 if big else 6
    seq = 16 if big else 6
    return {
        "mobilenet": ZooEntry(
            lambda: mobilenet(16 if big else 8), _cls((3, img, img), 10), {"optimizer": MOMENTUM}
        ),
        "kws_conv1d": ZooEntry(
            lambda: kws_conv1d(10, 32 if big else 16),
            _cls((10, frames), 6),
            {"optimizer": MOMENTUM},
        ),
        "autoencoder1d": ZooEntry(
            lambda: Autoencoder1d(3, 32 if big else 8),
            _reconstruct((3, 64 if big else 16)),
            {"optimizer": MOMENTUM, "loss": "mse"},
        ),
        "gru_sensor": ZooEntry(
            lambda: SensorRNN("gru", 3, 32 if big else 16),
            _cls((steps, 3), 4),
            {"optimizer": MOMENTUM},
        ),
        "lstm_sensor": ZooEntry(
            lambda: SensorRNN("lstm", 3, 32 if big else 16),
            _cls((steps, 3), 4),
            {"optimizer": MOMENTUM},
        ),
        "transformer": ZooEntry(
            lambda: TinyTransformer(4, 32 if big else 16),
            _cls((seq, 4), 3),
            {"optimizer": MOMENTUM},
        ),
        "bag_text": ZooEntry(
            lambda: BagText(1000 if big else 100, 32 if big else 16),
            _tokens(seq, 100, 4),
            {"optimizer": MOMENTUM},
        ),
        "regression_mlp": ZooEntry(
            lambda: regression_mlp(8, 64 if big else 32),
            _regression(8),
            {"optimizer": MOMENTUM, "loss": _flat_mse},
        ),
    }
