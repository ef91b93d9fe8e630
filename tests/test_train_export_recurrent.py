"""Recurrent step rewrite (issue 13, point 3): GRU / LSTM / RNN through recurrent.py.

Every variant exports (the verification gate runs at two batch sizes against torch autograd
+ torch.optim), each layer direction is ONE ONNX LSTM / GRU / RNN node, and three steps in the
torch-free trainer land where torch lands. The models are user code outside the package (here
and in test_train_export_coverage.py). The node count of a 32-step LSTM step is a structural
check, not a timing.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from test_train_export_coverage import Recurrent  # recurrent layer + linear head
from torch import nn

from device_agent.dataset import batch_order
from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, export_training_step
from edgefed.train_export.recurrent import rnn_mode
from edgefed.train_export.verify import ABS_TOL, BATCHES, UPDATE_RTOL


class LastState(nn.Module):
    """Classifies from the final hidden state h_n (LSTM: h_n and c_n), not from the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 6, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, c) = self.rnn(x)
        return self.fc(torch.cat([h[-1], c[-1]], 1))


STEPS = 5
CASES = {
    "lstm_2layer_bidirectional_batch_first_last": (
        lambda: Recurrent(
            nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True), 5, True
        ),
        ("LSTM", 4),
    ),
    "gru_seq_first_bidirectional_all_steps": (
        lambda: Recurrent(nn.GRU(3, 5, bidirectional=True), STEPS, False),
        ("GRU", 2),
    ),
    "gru_2layer_no_bias_last": (
        lambda: Recurrent(nn.GRU(3, 4, num_layers=2, bias=False, batch_first=True), STEPS, True),
        ("GRU", 2),
    ),
    "rnn_tanh_all_steps": (
        lambda: Recurrent(nn.RNN(3, 5, batch_first=True), STEPS, False),
        ("RNN", 1),
    ),
    "rnn_relu_2layer_bidirectional_last": (
        lambda: Recurrent(
            nn.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True), STEPS, True
        ),
        ("RNN", 4),
    ),
    "lstm_final_state": (LastState, ("LSTM", 1)),
}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, STEPS, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _torch_steps(model: nn.Module, x, y, lr: float) -> dict[str, np.ndarray]:
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    for _, idx in batch_order(len(x), 1, 8, 0, shuffle=False):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_recurrent_variant_exports_verifies_and_trains_like_torch(name: str) -> None:
    build, (op_type, layers) = CASES[name]
    torch.manual_seed(3)
    model = build()
    x, y = _data(4, 1)
    g = export_training_step(model, (x, y), optimizer=SGD(momentum=0.9))
    assert g.manifest["verification"]["batches"] == list(BATCHES) and len(set(BATCHES)) == 2
    for graph in (g.onnx, g.inference_onnx):  # one fused node per layer and direction
        ops = Counter(n.op_type for n in onnx.load_from_string(graph).graph.node)
        assert ops[op_type] == layers, ops
    init = {k: t.detach().numpy().copy() for k, t in model.state_dict().items()}
    x, y = _data(24, 2)
    tr = StepTrainer(g.onnx, g.manifest, inference_onnx=g.inference_onnx)
    tr.set_params(init)
    stats = tr.train_epochs(x.numpy(), y.numpy(), epochs=1, batch_size=8, lr=0.05, shuffle=False)
    assert stats.steps == 3 and np.isfinite(stats.loss)
    want = _torch_steps(model, x, y, 0.05)
    moved = 0
    for k, w in want.items():  # (a last-step head leaves e.g. a reverse W_hh unchanged)
        change = float(np.max(np.abs(w - init[k])))
        err = float(np.max(np.abs(tr.params[k] - w)))
        assert err <= UPDATE_RTOL * change + 10 * ABS_TOL, (k, err, change)
        moved += change > 0
    assert moved >= len(want) - 1  # training really changed the model
    ref = copy.deepcopy(model).eval()
    ref.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in want.items()})
    with torch.no_grad():
        np.testing.assert_allclose(tr.predict(x.numpy()), ref(x).numpy(), rtol=1e-4, atol=1e-5)


def test_lstm_32_steps_is_a_small_graph() -> None:
    """Torch's own decomposition unrolled this step into 5,574 ONNX nodes (main, 2026-12-03);
    the hand-written layer has no per-step nodes at all: the cell-state loop and the backward
    through time are one Scan each, whose bodies hold a handful of nodes."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM(3, 16, batch_first=True), 32, True)
    x = torch.randn(4, 32, 3)
    g = export_training_step(model, (x, torch.randint(0, 3, (4,))), optimizer=SGD(momentum=0.9))
    nodes = onnx.load_from_string(g.onnx).graph.node
    assert len(nodes) < 500, len(nodes)
    ops = Counter(n.op_type for n in nodes)
    assert ops["LSTM"] == 1 and ops["Scan"] == 2, ops
    # out[:, -1] is read from h_n: no zero-filled [N, T, H] output gradient scattered into
    assert ops["ScatterND"] == 0, ops
    for scan in (n for n in nodes if n.op_type == "Scan"):
        body = onnx.helper.get_attribute_value(next(a for a in scan.attribute if a.name == "body"))
        assert len(body.node) <= 8, [n.op_type for n in body.node]
    assert "Gemm" in {
        n.op_type
        for s in nodes
        if s.op_type == "Scan"
        for a in s.attribute
        if a.name == "body"
        for n in a.g.node
    }


def test_one_step_sequence_and_frozen_first_layer() -> None:
    """T = 1 (no per-step Split) and a frozen first layer (no weight grads there) still pass
    the gate."""
    torch.manual_seed(1)
    one = Recurrent(nn.LSTM(3, 4, bidirectional=True, batch_first=True), 1, True)
    g = export_training_step(one, (torch.randn(4, 1, 3), torch.randint(0, 3, (4,))))
    assert g.manifest["verification"]["param"] <= 1e-5
    two = Recurrent(nn.GRU(3, 4, num_layers=2, batch_first=True), STEPS, True)
    x, y = _data(4, 5)
    g = export_training_step(two, (x, y), trainable=lambda n, p: not n.endswith("_l0"))
    assert g.manifest["frozen"] == [
        f"rnn.{k}_l0" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    assert g.manifest["verification"]["param"] <= 1e-5


@pytest.mark.parametrize(
    "rnn",
    [
        nn.LSTM(3, 4, num_layers=2, bidirectional=True),
        nn.GRU(3, 4, bidirectional=True, batch_first=True),
        nn.RNN(3, 4, nonlinearity="relu", bias=False),
    ],
    ids=["lstm", "gru", "rnn_relu"],
)
def test_hand_written_backward_equals_autograd_float64(rnn: nn.RNNBase) -> None:
    """Eager, in float64, with a given initial state and an unbatched input too: outputs,
    final states and the gradients of input, initial state and every weight agree."""
    rnn = rnn.double()
    lstm = isinstance(rnn, nn.LSTM)
    for shape in [(6, 2, 3), (6, 3)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        dirs = 2 if rnn.bidirectional else 1
        batch = () if len(shape) == 2 else (shape[0] if rnn.batch_first else shape[1],)
        state_shape = (rnn.num_layers * dirs, *batch, 4)
        h0 = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
        hx = (h0, c0) if lstm else h0

        def run(ctx, hx=hx, x=x, h0=h0, c0=c0):
            with ctx:
                out, hn = rnn(x, hx)
                states = hn if lstm else (hn,)
                loss = (out.sin() * torch.arange(out.numel()).reshape(out.shape)).sum()
                loss = loss + sum((s * s).sum() for s in states)
                inputs = [x, h0, *([c0] if lstm else []), *rnn.parameters()]
                return [out, *states, *torch.autograd.grad(loss, inputs)]

        want, got = run(contextlib.nullcontext()), run(rnn_mode())
        for w, o in zip(want, got, strict=True):
            torch.testing.assert_close(o, w, rtol=1e-9, atol=1e-10)


class _Pick(nn.Module):
    """One time step of a recurrent layer's output, picked the way a user writes it."""

    def __init__(self, rnn: nn.RNNBase, pick) -> None:
        super().__init__()
        self.rnn, self.pick = rnn, pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.rnn(x)[0])


@pytest.mark.parametrize(
    ("batch_first", "pick"),
    [
        (True, lambda o: o[:, -1]),
        (True, lambda o: o[:, 0, :]),
        (True, lambda o: o.select(1, 5)),
        (True, lambda o: o[:, 2]),  # a middle step: torch's select
        (False, lambda o: o[-1]),
        (False, lambda o: o[0] * o[:, 1].sum()),  # o[:, 1] is a batch index, not time
    ],
    ids=["last", "first", "select_last", "middle", "seq_first_last", "seq_first_first"],
)
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=["lstm", "gru", "rnn"])
def test_first_or_last_step_read_from_the_states_float64(
    batch_first: bool, pick, cls: type[nn.RNNBase]
) -> None:
    """``out[:, -1]`` / ``out[:, 0]`` of the last layer are read from h_n (rnn_mode): values and
    every gradient equal torch autograd's, for a bidirectional 2-layer layer."""
    torch.manual_seed(4)
    model = _Pick(cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first), pick)
    model = model.double()
    x = torch.randn((3, 6, 3) if batch_first else (6, 3, 3), dtype=torch.float64)
    x.requires_grad_(True)

    def run(ctx):
        with ctx:
            y = model(x)
            loss = (y.sin() * torch.arange(y.numel()).reshape(y.shape)).sum()
            return [y, *torch.autograd.grad(loss, [x, *model.parameters()])]

    want, got = run(contextlib.nullcontext()), run(rnn_mode())
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-9, atol=1e-10)


def test_packed_sequences_keep_torchs_path() -> None:
    """rnn_mode hands packed input (another signature) back to torch unchanged."""
    rnn = nn.GRU(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with rnn_mode():
        got = rnn(packed)[0].data
    torch.testing.assert_close(got, rnn(packed)[0].data)
