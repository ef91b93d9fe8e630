"""`edgefed.simulate`: the README's ten-line example, compression/strategy options, mixed
fleets, and argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgefed
from edgefed.strategies import FedAdam

pytestmark = pytest.mark.system  # federated simulations end to end


def test_readme_example_five_devices_small_mlp() -> None:
    rng = np.random.default_rng(0)

    def data(n):
        x = rng.standard_normal((n, 10)).astype(np.float32)
        return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    history = edgefed.simulate(
        model,
        [data(100) for _ in range(5)],
        rounds=10,
        strategy="fedavg",
        compression="int8",
        test_data=data(500),
    )
    assert len(history) == 10 and [h["round"] for h in history] == list(range(1, 11))
    assert all(h["participants"] == 5 for h in history)
    assert history.accuracy[-1] > 0.85 > history.accuracy[0] - 0.2
    assert history.cum_bytes_up == sorted(history.cum_bytes_up)


@pytest.fixture(scope="module")
def setup():
    from edgefed.coordinator.model import build_federated_model

    rng = np.random.default_rng(1)
    devs = []
    for i in range(4):
        x = rng.standard_normal((80, 10)).astype(np.float32)
        devs.append((x, (x[:, 2] - x[:, 5] > 0.1 * i).astype(np.int64)))
    x = rng.standard_normal((400, 10)).astype(np.float32)
    test = (x, (x[:, 2] - x[:, 5] > 0).astype(np.int64))
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    fm = build_federated_model(
        net, (torch.from_numpy(devs[0][0][:8]), torch.from_numpy(devs[0][1][:8])), head="last"
    )
    return devs, test, fm


def test_codecs_strategies_and_mixed_fleet(setup) -> None:
    devs, test, fm = setup
    kw = dict(rounds=6, test_data=test, lr=0.2, federated_model=fm)
    f32 = edgefed.simulate(None, devs, compression="none", **kw)
    top = edgefed.simulate(None, devs, compression="topk:0.1+int8; min_elements=1", **kw)
    assert top[-1]["payload_up"] < f32[-1]["payload_up"] / 3
    assert top.final_accuracy > 0.75 and f32.final_accuracy > 0.8
    adam = edgefed.simulate(None, devs, strategy=FedAdam(server_lr=0.05), **kw)
    assert adam.final_accuracy > 0.75
    med = edgefed.simulate(None, devs, strategy="median", fraction=0.5, **kw)
    assert all(h["sampled"] == 2 for h in med)
    mixed = edgefed.simulate(None, devs, head="last", weak_devices=[0, 1], **kw)
    assert mixed.final_accuracy > 0.75
    per_dev = mixed[-1]["bytes_up"]
    assert per_dev < f32[-1]["bytes_up"]  # head-only devices send fewer tensors


def test_argument_errors(setup) -> None:
    devs, _, fm = setup
    with pytest.raises(ValueError, match="at least one device"):
        edgefed.simulate(None, [], federated_model=fm)
    with pytest.raises(ValueError, match="equally long"):
        edgefed.simulate(None, [(devs[0][0], devs[0][1][:3])], federated_model=fm)
    with pytest.raises(ValueError, match="unknown strategy"):
        edgefed.simulate(None, devs, strategy="fedsgd", federated_model=fm)
    with pytest.raises(ValueError):
        edgefed.simulate(None, devs, compression="topk:7", federated_model=fm)
