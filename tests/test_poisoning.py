"""Model poisoning: 20% of devices send scaled or sign-flipped updates.

Runs the runtime's in-process path (the one ``edgefed.simulate`` uses without a broker): the
coordinator's RoundEngine builds real int8 task messages, every DeviceWorker trains the
exported ONNX step graph in onnxruntime and returns a real compressed update; attackers are
DeviceWorkers that rewrite their own honest update before sending it (what a compromised
device can do). sklearn digits, MLP 64-32-10, 10 devices (2 attackers), IID split.

Attacks: "scaled" multiplies the update by 10 (boosting); "sign-flipped" by -4 (a flip without
boosting only slows FedAvg down: -2.3 pp measured, not an attack worth defending against).
Defense: trimmed mean (beta 0.2) behind the adaptive norm bound. Claims, against the clean
FedAvg run: with the defense accuracy stays within 3 pp; without it the damage shows (>= 15 pp).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from device_agent.agent import DeviceWorker
from edgefed.codec import CompressionSpec, ModelSchema, decode_update, encode_update
from edgefed.coordinator.model import FederatedModel, build_federated_model
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.security.norm_bound import AdaptiveNormBound
from edgefed.simulation import make_evaluator
from edgefed.strategies import Strategy, make_strategy
from edgefed.transport.message import pack, unpack

pytestmark = pytest.mark.system  # federated runs under attack end to end

DEVICES, ATTACKERS, ROUNDS = 10, 2, 20
ATTACKS = {"scaled": 10.0, "sign-flipped": -4.0}


class Attacker(DeviceWorker):
    """Trains honestly, then multiplies its update by ``factor`` before sending it."""

    def __init__(self, *args, factor: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.factor = factor

    def handle_task(self, data: bytes) -> bytes | None:
        out = super().handle_task(data)
        assert out is not None
        header, parts = unpack(out)
        task_header, _ = unpack(data)
        upd = decode_update(parts["update"], ModelSchema(task_header["schema"]))
        bad = {k: v * np.float32(self.factor) for k, v in upd.to_dense().items()}
        spec = CompressionSpec.parse(task_header["uplink"])
        return pack(header, {"update": encode_update(bad, upd.meta, spec)})


@pytest.fixture(scope="module")
def setup() -> tuple[FederatedModel, object, list[tuple[np.ndarray, np.ndarray]]]:
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(x))
    x, y = (x[idx] / 16).astype(np.float32), y[idx].astype(np.int64)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fm = build_federated_model(model, (torch.from_numpy(xtr[:8]), torch.from_numpy(ytr[:8])))
    g = fm.graphs["full"]
    evaluate = make_evaluator(g.inference_onnx, g.manifest, xte, yte)
    shards = [(xtr[p], ytr[p]) for p in np.array_split(np.arange(len(xtr)), DEVICES)]
    return fm, evaluate, shards


def run(setup, strategy: Strategy, factor: float | None, work: Path) -> float:
    fm, evaluate, shards = setup
    cfg = RoundConfig(min_devices=1, local_epochs=2, batch_size=16, lr=0.1, seed=0)
    engine = RoundEngine(fm, strategy, cfg, evaluate)
    ids = [f"dev-{i}" for i in range(DEVICES)]
    workers = {}
    for i, (dev, (x, y)) in enumerate(zip(ids, shards, strict=True)):
        kw = {"persist_model": False, "durable": False}
        if factor is not None and i < ATTACKERS:
            workers[dev] = Attacker(dev, x, y, work / dev, factor=factor, **kw)
        else:
            workers[dev] = DeviceWorker(dev, x, y, work / dev, **kw)
        engine.register(dev, {}, [])
    logging.disable(logging.WARNING)  # attackers' updates are accepted, but be quiet anyway
    try:
        for _ in range(ROUNDS):
            for dev, task in engine.start_round(ids).items():
                assert engine.handle_update(dev, workers[dev].handle_task(task))
            m = engine.finish_round()
    finally:
        logging.disable(logging.NOTSET)
    assert m.participants == DEVICES
    return float(m.accuracy)


def defended() -> Strategy:
    s = make_strategy("trimmed_mean", beta=0.2)
    s.norm_bound = AdaptiveNormBound(factor=2.0)
    return s


@pytest.fixture(scope="module")
def clean_accuracy(setup, tmp_path_factory) -> float:
    acc = run(setup, make_strategy("fedavg"), None, tmp_path_factory.mktemp("clean"))
    assert acc > 0.9  # the task is learnable in this budget: the comparisons mean something
    return acc


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_defense_holds_and_no_defense_is_damaged(
    setup, clean_accuracy: float, attack: str, tmp_path: Path
) -> None:
    factor = ATTACKS[attack]
    undefended = run(setup, make_strategy("fedavg"), factor, tmp_path / "fedavg")
    with_defense = run(setup, defended(), factor, tmp_path / "defended")
    print(
        f"{attack}: clean {clean_accuracy:.3f} fedavg {undefended:.3f} defended {with_defense:.3f}"
    )
    assert undefended < clean_accuracy - 0.15, "the attack should hurt plain FedAvg"
    assert with_defense >= clean_accuracy - 0.03


def test_adaptive_norm_bound_alone_stops_scaling(setup, clean_accuracy, tmp_path) -> None:
    s = make_strategy("fedavg")
    s.norm_bound = AdaptiveNormBound(factor=2.0)
    acc = run(setup, s, ATTACKS["scaled"], tmp_path)
    assert acc >= clean_accuracy - 0.03
    assert s.norm_bound.clipped >= ATTACKERS * ROUNDS  # every attacker update was clipped
