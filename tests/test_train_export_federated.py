"""Federated end to end with the new families (issue 13, point 4).

``edgefed.simulate`` federates a Conv1d model and a GRU model (defined here, outside the
package) over devices holding a generated 1-D signal classification task; the federated model
must land within 2 pp of the same model trained centrally in torch on the pooled data (same
initial weights, same number of epochs, same optimizer settings).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import edgefed

LENGTH = 24
CLASSES = 3
DEVICES = 4
ROUNDS = 8
LOCAL_EPOCHS = 4  # FedAvg of 4 devices: ~1/4 of the central progress per local epoch
MOMENTUM = 0.9
LR = 0.05


def signals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a sine of frequency (k + 1) cycles per window, random phase and amplitude,
    plus noise and a random offset."""
    y = rng.integers(0, CLASSES, n)
    t = np.arange(LENGTH) / LENGTH
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amp = rng.uniform(0.5, 1.5, (n, 1))
    x = amp * np.sin(2 * np.pi * (y[:, None] + 1) * t + phase)
    x += 0.3 * rng.standard_normal((n, LENGTH)) + rng.normal(0, 0.3, (n, 1))
    return x.astype(np.float32), y.astype(np.int64)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 8, 3, padding=1, groups=8),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


class GRUNet(nn.Module):
    """Reads the window as 8 steps of 3 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 12, batch_first=True)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x.reshape(x.shape[0], -1, 3))[0][:, -1])


def central(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, test) -> float:
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    g = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(16):
            opt.zero_grad()
            nn.functional.cross_entropy(ref(xt[idx]), yt[idx]).backward()
            opt.step()
    ref.eval()
    with torch.no_grad():
        pred = ref(torch.from_numpy(test[0])).argmax(1).numpy()
    return float((pred == test[1]).mean())


@pytest.mark.parametrize("build", [ConvNet, GRUNet], ids=["conv1d", "gru"])
def test_federated_matches_central_within_2pp(build) -> None:
    rng = np.random.default_rng(5)
    devs = [signals(150, rng) for _ in range(DEVICES)]
    test = signals(600, rng)
    torch.manual_seed(0)
    model = build()
    hist = edgefed.simulate(
        model,
        devs,
        rounds=ROUNDS,
        strategy="fedavg",
        compression="none",
        downlink="none",
        test_data=test,
        batch_size=16,
        lr=LR,
        momentum=MOMENTUM,
        local_epochs=LOCAL_EPOCHS,
    )
    fed = hist.accuracy[-1]
    x = np.concatenate([d[0] for d in devs])
    y = np.concatenate([d[1] for d in devs])
    cen = central(model, x, y, ROUNDS, test)
    assert cen > 0.8, f"central baseline too weak to compare ({cen:.3f})"
    assert abs(fed - cen) <= 0.02, f"federated {fed:.3f} vs central {cen:.3f}"
