"""Model zoo (issue 13, point 2): every zoo model exports, passes the gate at two batch sizes,
and a few steps in the torch-free trainer land where torch autograd + torch.optim land.

Models live in tests/train_export_zoo.py (a user file, outside the package). Each model is
exported once per module. The transformer trains here without dropout (the trainer's masks
cannot equal torch's RNG); dropout inside attention is covered by the coverage test's gate.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_export_zoo import zoo

from device_agent.dataset import batch_order
from device_agent.trainer import StepTrainer
from edgefed.train_export import StepGraph, export_training_step
from edgefed.train_export.export import _loss_fn
from edgefed.train_export.verify import ABS_TOL, BATCHES, UPDATE_RTOL

ZOO = zoo("test")
_CACHE: dict[str, tuple[torch.nn.Module, StepGraph]] = {}


def _exported(name: str) -> tuple[torch.nn.Module, StepGraph]:
    if name not in _CACHE:
        e = ZOO[name]
        torch.manual_seed(7)
        model = e.build()
        x, y = e.data(4, torch.Generator().manual_seed(1))
        _CACHE[name] = (model, export_training_step(model, (x, y), **e.kwargs))
    return _CACHE[name]


def _torch_steps(model, loss_fn, x, y, batches, lr):
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    for _, idx in batches:
        opt.zero_grad()
        loss_fn(ref(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_exports_verifies_and_trains_like_torch(name: str) -> None:
    model, g = _exported(name)
    v = g.manifest["verification"]
    assert v["batches"] == list(BATCHES) and len(set(BATCHES)) == 2
    init = {k: t.detach().numpy().copy() for k, t in model.state_dict().items()}
    x, y = ZOO[name].data(24, torch.Generator().manual_seed(2))
    tr = StepTrainer(g.onnx, g.manifest, inference_onnx=g.inference_onnx)
    tr.set_params(init)
    stats = tr.train_epochs(x.numpy(), y.numpy(), epochs=1, batch_size=8, lr=0.05, shuffle=False)
    assert stats.steps == 3 and np.isfinite(stats.loss)
    loss_fn = _loss_fn(ZOO[name].kwargs.get("loss", "cross_entropy"))[1]
    want = _torch_steps(model, loss_fn, x, y, batch_order(24, 1, 8, 0, shuffle=False), 0.05)
    got = tr.params
    moved = 0
    for k, w in want.items():
        if k not in got:  # num_batches_tracked: a constant in the graph
            assert k.endswith("num_batches_tracked")
            continue
        change = float(np.max(np.abs(w - init[k]), initial=0.0))
        err = float(np.max(np.abs(got[k] - w), initial=0.0))
        assert err <= UPDATE_RTOL * change + 10 * ABS_TOL, (k, err, change)
        moved += change > 0
    assert moved >= len(got) // 2  # training really changed the model
    # eval-mode inference graph agrees with the trained torch model too
    ref = copy.deepcopy(model).eval()
    ref.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in want.items()})
    with torch.no_grad():
        np.testing.assert_allclose(tr.predict(x.numpy()), ref(x).numpy(), rtol=1e-4, atol=1e-5)
