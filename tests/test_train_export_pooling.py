"""Max pooling in exported steps: torch's first-maximum tie rule, floor-mode remainders and
the windows that keep the exporter's default path (pool_ops only takes k x k / stride k)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, export_training_step

pytestmark = pytest.mark.system  # exports and verifies a model per pooling case


class PositionalPool(nn.Module):
    """maxpool(x + p) with a per-pixel parameter p: dL/dp shows WHICH input got the gradient."""

    def __init__(self, c: int, h: int, w: int, pool: nn.MaxPool2d, relu: bool) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(c, h, w))
        self.act = nn.ReLU() if relu else nn.Identity()
        self.pool = pool
        self.fc = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(x + self.p)).flatten(1))


POOLS = {
    "2x2 stride 2, 7x7 (floor remainder)": (nn.MaxPool2d(2), 7, True, False),
    "3x3 stride 3, 9x9": (nn.MaxPool2d(3), 9, True, False),
    "2x2 stride 2, 6x5": (nn.MaxPool2d(2), (6, 5), True, False),
    # ReLU before the pool: its mask moves onto the pooled gradient (fusion.py); zeros tie
    "ReLU then 2x2 stride 2, 7x7": (nn.MaxPool2d(2), 7, True, True),
    "3x3 stride 2 pad 1 (default path)": (nn.MaxPool2d(3, stride=2, padding=1), 7, False, False),
    "2x2 ceil_mode, 7x7 (default path)": (nn.MaxPool2d(2, ceil_mode=True), 7, False, False),
    # row windows (what MaxPool1d becomes): ArgMax + MatMul spread, no SpaceToDepth
    "1x2 stride (1,2), 3x7 (floor remainder)": (nn.MaxPool2d((1, 2)), (3, 7), "rows", False),
    "ReLU then 1x3 stride (1,3), 2x9": (nn.MaxPool2d((1, 3)), (2, 9), "rows", True),
}


def _model(pool: nn.MaxPool2d, hw: int | tuple[int, int], relu: bool) -> nn.Module:
    h, w = (hw, hw) if isinstance(hw, int) else hw
    torch.manual_seed(0)
    m = PositionalPool(2, h, w, pool, relu)
    m(torch.zeros(1, 2, h, w))  # materialise the lazy Linear
    return m


@pytest.mark.parametrize("name", list(POOLS))
def test_step_matches_torch_with_ties(name: str) -> None:
    pool, hw, fast, relu = POOLS[name]
    m = _model(pool, hw, relu)
    h, w = m.p.shape[1:]
    g = export_training_step(
        m, (torch.randn(4, 2, h, w), torch.randint(0, 3, (4,))), optimizer=SGD(momentum=0.9)
    )
    nodes = onnx.load_from_string(g.onnx).graph.node
    ops = [n.op_type for n in nodes]
    with_indices = [n for n in nodes if n.op_type == "MaxPool" and len(n.output) > 1]
    if fast == "rows":  # no MaxPool-with-indices: ArgMax forward, MatMul-spread backward
        assert "ArgMax" in ops and "SpaceToDepth" not in ops and not with_indices
    elif fast:  # no MaxPool-with-indices (slow in onnxruntime) and no scatter for the pool
        assert "SpaceToDepth" in ops and "Col2Im" in ops and not with_indices
    else:
        assert "SpaceToDepth" not in ops and with_indices
    if fast is True and relu:  # ReLU's mask was applied before Col2Im, not the full-size grad
        unpooled = {o for n in nodes if n.op_type in ("Col2Im", "Pad") for o in n.output}
        assert not [n for n in nodes if n.op_type == "Mul" and set(n.input) & unpooled]
    if fast == "rows" and relu:  # one Greater for ReLU's mask, on the pooled (small) map
        small = [n for n in nodes if n.op_type == "Greater"]
        assert len(small) == 1
    # the inference graph (verified against the model by the export) needs no indices at all
    inf = [n for n in onnx.load_from_string(g.inference_onnx).graph.node if n.op_type == "MaxPool"]
    assert len(inf) == 1 and len(inf[0].output) == 1

    # Integer inputs and p = 0: most windows hold several equal maxima; torch sends the
    # gradient to the FIRST one in row-major window order, and so must the step graph.
    rng = np.random.default_rng(1)
    x = rng.integers(-1 if relu else 0, 2, (8, 2, h, w)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    state = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    tr = StepTrainer(g.onnx, g.manifest)
    tr.set_params(state)
    tr.train_epochs(x, y, epochs=1, batch_size=8, lr=0.5, shuffle=False)

    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    grad_p = ref.p.grad.clone()
    opt.step()
    assert int((grad_p != 0).sum()) > 0
    np.testing.assert_allclose(tr.params["p"], ref.p.detach().numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        tr.params["fc.weight"], ref.fc.weight.detach().numpy(), atol=1e-6, rtol=0
    )
    # a tie-blind backward (gradient to every maximum) would move far more pixels
    moved = np.abs(tr.params["p"]) > 0
    assert moved.sum() == int((grad_p != 0).sum())
