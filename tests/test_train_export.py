"""Training-step export: layers, optimizers, traps from the design note, the gate, errors.

Exports are slow (seconds each), so every graph is exported once per module and shared.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from device_agent.trainer import StepTrainer, TrainerError
from edgefed.train_export import (
    SGD,
    Adam,
    TrainExportError,
    UnsupportedOpError,
    VerificationError,
    export_training_step,
)
from edgefed.train_export.export import _assert_distinct
from edgefed.train_export.verify import verify_step
from edgefed.zoo.models import digits_cnn, digits_mlp

pytestmark = pytest.mark.system  # exports and verifies the zoo models end to end


def zoo() -> nn.Module:
    """Conv (groups 1 and depthwise), BN train, pools, activations, dropout, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.SiLU(),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(8, 4, 1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4, 6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.Sigmoid(),
        nn.Linear(5, 5),
    )


class Text(nn.Module):
    """Embedding (padding_idx) + LayerNorm + mean pooling + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.emb(x)).mean(1))


ZOO_OPT = SGD(momentum=0.9, weight_decay=1e-3, nesterov=True)


@pytest.fixture(scope="module")
def zoo_model() -> nn.Module:
    torch.manual_seed(0)
    return zoo()


@pytest.fixture(scope="module")
def zoo_graph(zoo_model: nn.Module):
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
    return export_training_step(zoo_model, (x, y), optimizer=ZOO_OPT)


@pytest.fixture(scope="module")
def text_model() -> nn.Module:
    torch.manual_seed(1)
    return Text()


@pytest.fixture(scope="module")
def text_graph(text_model: nn.Module):
    x, y = torch.randint(0, 20, (4, 6)), torch.randn(4, 3)
    return export_training_step(
        text_model, (x, y), loss="mse", optimizer=Adam(weight_decay=0.01), fedprox=True
    )


@pytest.fixture(scope="module")
def cnn_model() -> nn.Module:
    torch.manual_seed(2)
    return digits_cnn()


@pytest.fixture(scope="module")
def cnn_graph(cnn_model: nn.Module):
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    return export_training_step(cnn_model, (x, y), optimizer=SGD(momentum=0.5))


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch_run(model, opt_factory, batches, loss_fn, prox_mu=None):
    ref = copy.deepcopy(model).train()
    opt = opt_factory(ref.parameters())
    w0 = [p.detach().clone() for p in ref.parameters()]
    losses = []
    for xb, yb in batches:
        opt.zero_grad()
        loss = loss_fn(ref(torch.from_numpy(xb)), torch.from_numpy(yb))
        total = loss
        if prox_mu:
            total = loss + prox_mu / 2 * sum(
                ((p - w) ** 2).sum() for p, w in zip(ref.parameters(), w0, strict=True)
            )
        total.backward()
        opt.step()
        losses.append(float(loss))
    return ref, losses


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) <= set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_graph_is_plain_onnx_with_dynamic_batch(zoo_graph) -> None:
    for data in (zoo_graph.onnx, zoo_graph.inference_onnx):
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto, full_check=True)
        assert {n.domain for n in proto.graph.node} <= {""}
        assert not proto.functions
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [20]
        x_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert x_dim.dim_param and not x_dim.dim_value
    man = zoo_graph.manifest
    import json

    assert json.loads(json.dumps(man)) == man
    roles = {e["role"] for e in man["inputs"]}
    assert roles == {"x", "y", "lr", "param", "buffer", "state"}
    assert man["updated_buffers"] == ["1.running_mean", "1.running_var"]
    assert man["optimizer"] == {
        "name": "sgd",
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "nesterov": True,
    }


def test_gate_ran_and_matched_tightly(zoo_graph, text_graph, cnn_graph) -> None:
    for g in (zoo_graph, text_graph, cnn_graph):
        v = g.manifest["verification"]
        assert v["batches"] == [16, 7]
        assert v["loss"] < 1e-5 and v["param"] < 1e-5, v


def test_bn_train_mode_updates_running_stats(zoo_model, zoo_graph) -> None:
    """Trap: exported BatchNormalization silently normalising with running stats."""
    tr = StepTrainer(zoo_graph.onnx, zoo_graph.manifest)
    tr.set_params(_state(zoo_model) | {})
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((9, 3, 12, 12)) * 3 + 2).astype(np.float32)
    y = rng.integers(0, 5, 9)
    before = tr.params
    tr.step(x, y, lr=0.0)
    after = tr.params
    ref = copy.deepcopy(zoo_model).train()
    with torch.no_grad():
        ref(torch.from_numpy(x))
    for k in ("1.running_mean", "1.running_var"):
        assert not np.allclose(before[k], after[k])
        np.testing.assert_allclose(after[k], ref.state_dict()[k].numpy(), rtol=1e-5, atol=1e-6)
    # lr = 0: parameters unchanged, only statistics moved
    np.testing.assert_array_equal(before["0.weight"], after["0.weight"])


def test_gate_refuses_train_mode_bn_graph_exported_with_frozen_stats(zoo_model) -> None:
    """The same BN trap seen from the gate: a graph using running stats is refused."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    g = export_training_step(m, (x, y), freeze_bn_stats=True)
    with pytest.raises(VerificationError, match="disagrees"):
        verify_step(g, m, nn.functional.cross_entropy, SGD(), x, y, freeze_bn_stats=False)


def test_dropout_masks_are_fresh_and_have_the_right_rate(zoo_graph) -> None:
    """Trap: onnxruntime's Dropout gave correlated masks; ours uses RandomUniformLike."""
    proto = onnx.load_from_string(zoo_graph.onnx)
    rnd = [n for n in proto.graph.node if n.op_type == "RandomUniformLike"]
    assert len(rnd) == 1 and not [n for n in proto.graph.node if n.op_type == "Dropout"]
    consumers = [n for n in proto.graph.node if rnd[0].output[0] in n.input]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(rnd[0].output[0], 1, None))
    proto.graph.output.extend(
        onnx.helper.make_tensor_value_info(o, onnx.TensorProto.BOOL, None)
        for c in consumers
        for o in c.output
    )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feed = {}
    for e in zoo_graph.manifest["inputs"]:
        shape = [2000 if s == "batch" else s for s in e["shape"]]
        if e["role"] == "y":
            feed[e["name"]] = rng.integers(0, 5, shape)
        else:
            feed[e["name"]] = rng.standard_normal(shape).astype(np.float32)
    n_out = len(zoo_graph.manifest["outputs"])
    u1 = sess.run(None, feed)[n_out]
    u2 = sess.run(None, feed)[n_out]
    assert u1.shape == (2000, 4)
    keep1, keep2 = u1 > 0.3, u2 > 0.3
    assert abs(keep1.mean() - 0.7) < 0.02 and abs(keep2.mean() - 0.7) < 0.02
    corr = np.corrcoef(keep1.ravel(), keep2.ravel())[0, 1]
    assert abs(corr) < 0.05, corr  # independent across runs


def test_embedding_layernorm_adam_fedprox_match_torch(text_model, text_graph) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 20, (50, 6))
    x[:, -2:] = 0  # padding_idx rows get exactly zero gradient
    y = rng.standard_normal((50, 3)).astype(np.float32)
    tr = StepTrainer(text_graph.onnx, text_graph.manifest)
    tr.set_params(_state(text_model))
    tr.train_epochs(x, y, epochs=2, batch_size=16, lr=0.01, seed=3, mu=0.5)
    from device_agent.dataset import batch_order

    batches = [(x[i], y[i]) for _, i in batch_order(50, 2, 16, 3)]
    ref, _ = _torch_run(
        text_model,
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        batches,
        nn.functional.mse_loss,
        prox_mu=0.5,
    )
    assert _max_diff(tr.params, _state(ref)) < 2e-5


def test_adam_eps_is_an_input_and_zero_gradients_stay_finite(text_model, text_graph) -> None:
    """Trap: the exporter's optimizer dropped eps=1e-8 -> 0/0 = NaN for zero gradients."""
    names = [e["name"] for e in text_graph.manifest["inputs"]]
    assert "adam_eps" in names
    proto = onnx.load_from_string(text_graph.onnx)
    assert not [t for t in proto.graph.initializer if t.name == "adam_eps"]
    tr = StepTrainer(text_graph.onnx, text_graph.manifest)
    tr.set_params(_state(text_model))
    x = np.zeros((8, 6), np.int64)  # only the padding row: every embedding grad is zero
    y = np.zeros((8, 3), np.float32)
    tr.train_epochs(x, y, epochs=3, batch_size=4, lr=0.1, seed=0)
    p = tr.params
    assert all(np.isfinite(v).all() for v in p.values())
    assert np.all(p["emb.weight"][0] == 0.0)  # zero grad, zero v: 0 / eps, not 0 / 0
    from device_agent.dataset import batch_order

    batches = [(x[i], y[i]) for _, i in batch_order(8, 3, 4, 0)]
    ref, _ = _torch_run(
        text_model,
        lambda q: torch.optim.Adam(q, lr=0.1, weight_decay=0.01),
        batches,
        nn.functional.mse_loss,
        prox_mu=0.01,
    )
    assert _max_diff(p, _state(ref)) < 2e-5


def test_maxpool_cnn_matches_torch_over_epochs(cnn_model, cnn_graph) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((45, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 45)
    tr = StepTrainer(cnn_graph.onnx, cnn_graph.manifest)
    tr.set_params(_state(cnn_model))
    tr.train_epochs(x, y, epochs=2, batch_size=16, lr=0.1, seed=5)
    from device_agent.dataset import batch_order

    batches = [(x[i], y[i]) for _, i in batch_order(45, 2, 16, 5)]
    ref, _ = _torch_run(
        cnn_model,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5),
        batches,
        nn.functional.cross_entropy,
    )
    assert _max_diff(tr.params, _state(ref)) < 1e-5


def test_frozen_backbone_baked_and_head_only(zoo_model) -> None:
    g = export_training_step(
        zoo_model,
        (torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))),
        optimizer=SGD(momentum=0.9),
        trainable=lambda name, p: name.startswith("15."),
        freeze_bn_stats=True,
        bake_frozen=True,
    )
    man = g.manifest
    assert man["trainable"] == ["15.weight", "15.bias"]
    assert {e["role"] for e in man["inputs"]} == {"x", "y", "lr", "param", "state"}
    assert "0.weight" in man["baked"] and "1.running_mean" in man["baked"]
    tr = StepTrainer(g.onnx, man)
    full = _state(zoo_model)
    tr.set_params(full)  # baked tensors are accepted when they match the export
    bad = dict(full)
    bad["0.weight"] = bad["0.weight"] + 1.0
    with pytest.raises(TrainerError, match="baked"):
        tr.set_params(bad)
    x = np.random.default_rng(6).standard_normal((10, 3, 12, 12)).astype(np.float32)
    tr.train_epochs(x, np.arange(10) % 5, epochs=1, batch_size=4, lr=0.1)
    assert not np.allclose(tr.params["15.weight"], full["15.weight"])


def test_unsupported_op_names_op_and_layer() -> None:
    # ConvTranspose1d/2d export now (test_train_export_coverage); 3-D ones stay refused
    m = nn.Sequential(nn.ConvTranspose3d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6 * 6, 2))
    with pytest.raises(UnsupportedOpError) as ei:
        export_training_step(m, (torch.randn(4, 2, 4, 4, 4), torch.randint(0, 2, (4,))))
    assert "convolution_backward" in str(ei.value)
    assert ei.value.layer.startswith("0 (ConvTranspose3d)")
    assert "ConvTranspose1d/2d" in str(ei.value)  # the nearest supported alternative


def test_aliased_example_inputs_are_refused() -> None:
    """Trap: `[zeros] * 2` for Adam's m and v became ONE graph input."""
    z = torch.zeros(3)
    with pytest.raises(TrainExportError, match="share memory"):
        _assert_distinct([torch.ones(2), z, z])
    _assert_distinct([torch.zeros(3), torch.zeros(3)])


def smooth_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, label_smoothing=0.1)


def test_callable_loss_and_gate_refuses_a_graph_that_disagrees_with_the_model() -> None:
    torch.manual_seed(5)
    m = digits_mlp(8)
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    g = export_training_step(m, (x, y), loss=smooth_ce)
    assert g.manifest["loss"] == "smooth_ce"
    verify_step(g, m, smooth_ce, SGD(), x, y, freeze_bn_stats=False)  # passes with the truth
    with pytest.raises(VerificationError, match="loss"):  # plain CE is not what was exported
        verify_step(g, m, nn.functional.cross_entropy, SGD(), x, y, freeze_bn_stats=False)
    other = copy.deepcopy(m)
    other[1] = nn.Tanh()
    with pytest.raises(VerificationError, match="loss"):
        verify_step(g, other, smooth_ce, SGD(), x, y, freeze_bn_stats=False)


def test_bad_arguments_are_clear_errors(zoo_model) -> None:
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="not in the model"):
        export_training_step(zoo_model, (x, y), trainable=["nope"])
    with pytest.raises(ValueError, match="loss"):
        export_training_step(zoo_model, (x, y), loss="hinge")
    with pytest.raises(ValueError, match="same batch size"):
        export_training_step(zoo_model, (x, y[:3]))
    bn = nn.Sequential(nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(TrainExportError, match="momentum=None"):
        export_training_step(bn, (torch.randn(4, 4), torch.randn(4, 4)), loss="mse")
