"""The optimizer update folded into the weight-gradient Gemm: present in the graph, and the
trained parameters still follow torch.optim step after step."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, export_training_step

pytestmark = pytest.mark.system  # exports and trains against torch end to end


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    )


def _weight_first_gemms(onnx_bytes: bytes) -> int:
    """Gemms whose A operand is a parameter (seen through Identity): W @ x^T forwards."""
    graph = onnx.load_from_string(onnx_bytes).graph
    producer = {o: n for n in graph.node for o in n.output}

    def source(name: str) -> str:
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    return sum(
        1 for n in graph.node if n.op_type == "Gemm" and source(n.input[0]).startswith("param:")
    )


def _gemms(onnx_bytes: bytes) -> list[dict[str, float]]:
    out = []
    for n in onnx.load_from_string(onnx_bytes).graph.node:
        if n.op_type == "Gemm":
            out.append({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
    return out


@pytest.mark.parametrize(("momentum", "attr", "value"), [(0.0, "alpha", -1.0), (0.9, "beta", 0.9)])
def test_update_is_fused_and_matches_torch(momentum: float, attr: str, value: float) -> None:
    m = _model()
    g = export_training_step(
        m, (torch.randn(4, 1, 4, 4), torch.randint(0, 5, (4,))), optimizer=SGD(momentum)
    )
    fused = [a for a in _gemms(g.onnx) if a.get(attr) == pytest.approx(value)]
    assert len(fused) == 3  # conv (im2col GEMM) and both Linear weights
    assert _weight_first_gemms(g.onnx) == 2  # both Linear forwards as W @ x^T
    assert _weight_first_gemms(g.inference_onnx) == 0

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    tr = StepTrainer(g.onnx, g.manifest)
    tr.set_params({k: v.detach().numpy().copy() for k, v in m.state_dict().items()})
    tr.train_epochs(x, y, epochs=3, batch_size=8, lr=0.05, shuffle=False)

    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum)
    for _ in range(3):
        for i in range(0, 40, 8):
            opt.zero_grad()
            xb, yb = torch.from_numpy(x[i : i + 8]), torch.from_numpy(y[i : i + 8])
            nn.functional.cross_entropy(ref(xb), yb).backward()
            opt.step()
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(tr.params[k], v.numpy(), atol=2e-6, rtol=0, err_msg=k)
