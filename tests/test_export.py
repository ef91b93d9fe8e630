"""Export pipeline stages on tiny models: distillation, pruning, int8, budget, bundle.

Real torch training, real dynamo ONNX exports, real onnxruntime sessions; sizes kept tiny
(16x16 digits, quarter-width CNN) so the module runs in well under a minute.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from edgefed.bundle import generate_keypair, install_bundle, verify_bytes
from edgefed.export.distill import distill, kd_loss, predict_logits, train_supervised
from edgefed.export.measure import export_onnx, parity, session
from edgefed.export.pipeline import (
    AccuracyBudgetError,
    ExportConfig,
    make_bundle,
    run_pipeline,
)
from edgefed.export.prune import prune_structured, width_scaled
from edgefed.export.quantize_onnx import qdq_op_counts, quantize_static_qdq
from edgefed.zoo.data import TaskData, noisy_digits
from edgefed.zoo.models import DigitsCNN
from edgefed.zoo.models import param_count as count_params

pytestmark = pytest.mark.system  # distill / prune / quantize pipeline end to end

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data() -> TaskData:
    d = noisy_digits(train_per_digit=1, test_per_digit=1, size=16, noise=0.1, seed=1)
    return d


@pytest.fixture(scope="module")
def teacher(data: TaskData) -> DigitsCNN:
    torch.manual_seed(0)
    m = DigitsCNN(width=0.25, image_size=16)
    train_supervised(m, data.x_train, data.y_train, epochs=4, lr=5e-3, batch_size=64)
    return m


def acc(model, d: TaskData) -> float:
    return float((predict_logits(model, d.x_test).argmax(1).numpy() == d.y_test).mean())


def test_kd_loss_definition():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, None, T, 0.3), kl, atol=1e-5)  # soft targets only
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, T, 0.3), 0.3 * kl + 0.7 * ce, atol=1e-5)
    assert float(kd_loss(t, t, None, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kd_loss(s, t, y, temperature=0.0)


def test_teacher_learns(teacher, data):
    assert acc(teacher, data) > 0.6  # 10 classes: chance is 0.1


def test_distillation_reduces_loss_and_needs_no_labels(teacher, data):
    example = torch.from_numpy(data.x_train[:2])
    student = width_scaled(teacher, example, 0.5)
    assert count_params(student) < 0.4 * count_params(teacher)
    t_pred = predict_logits(teacher, data.x_test).argmax(1)

    def agreement(m) -> float:
        return float((predict_logits(m, data.x_test).argmax(1) == t_pred).float().mean())

    before = agreement(student)
    losses = distill(student, teacher, data.x_train, None, epochs=3, lr=5e-3, batch_size=64)
    assert losses[-1] < 0.7 * losses[0]
    assert agreement(student) > max(before, 0.5)


def test_pruning_shrinks_and_onnx_matches_torch(teacher, data):
    example = torch.from_numpy(data.x_train[:2])
    pruned = prune_structured(teacher, example, 0.5)
    assert count_params(pruned) < 0.4 * count_params(teacher)
    assert pruned.features[0].out_channels == teacher.features[0].out_channels // 2
    assert pruned.fc2.out_features == 10  # classifier outputs kept
    assert count_params(teacher) == count_params(DigitsCNN(width=0.25, image_size=16))  # copy
    onnx_bytes = export_onnx(pruned, example)
    model = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert all(len(n.metadata_props) == 0 for n in model.graph.node)  # metadata stripped
    assert parity(pruned, onnx_bytes, data.x_test[:37]) < 1e-4  # odd batch: dynamic axis
    assert session(onnx_bytes).run(None, {"x": data.x_test[:1]})[0].shape == (1, 10)
    with pytest.raises(ValueError, match="at least 2"):
        export_onnx(pruned, example[:1])


def test_int8_static_qdq_per_channel_runs(teacher, data):
    fp = export_onnx(teacher, torch.from_numpy(data.x_train[:2]))
    q = quantize_static_qdq(fp, data.x_train[:128])
    ops = qdq_op_counts(q)
    assert ops.get("QuantizeLinear", 0) >= 3 and ops.get("DequantizeLinear", 0) >= 6
    model = onnx.load_from_string(q)
    inits = {i.name: i for i in model.graph.initializer}
    per_channel = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[1] in inits
        and len(onnx.numpy_helper.to_array(inits[n.input[1]]).shape) == 1
        and onnx.numpy_helper.to_array(inits[n.input[1]]).shape[0] > 1
    ]
    assert per_channel, "expected per-channel weight scales"
    out_fp = session(fp).run(None, {"x": data.x_test})[0]
    out_q = session(q).run(None, {"x": data.x_test})[0]
    assert np.isfinite(out_q).all()
    assert float((out_fp.argmax(1) == out_q.argmax(1)).mean()) > 0.9
    assert len(q) < len(fp)


def test_budget_refuses_and_keeps_teacher(teacher, data):
    """An undistilled student breaks a 0 pp budget: refused, not pruned, teacher chosen."""
    student = DigitsCNN(width=0.125, image_size=16)
    cfg = ExportConfig(
        accuracy_budget_pp=0.0, distill_epochs=0, threads=1, latency_runs=3, objective="size"
    )
    res = run_pipeline(teacher, data, cfg, student=student)
    names = [s.name for s in res.stages]
    assert names == [
        "teacher fp32",
        "teacher int8 static",
        "distilled student fp32",
        "distilled student int8 static",
    ]
    s = res.stage("distilled student fp32")
    assert s.status.startswith("refused: drop") and s.drop_pp > 10
    assert res.chosen.name in ("teacher fp32", "teacher int8 static") and res.chosen.ok
    with pytest.raises(AccuracyBudgetError, match="refused") as e:
        res.require("distilled student fp32")
    assert "| distilled student fp32 |" in e.value.table


@pytest.fixture(scope="module")
def full_run(teacher, data):
    cfg = ExportConfig(
        accuracy_budget_pp=100.0,
        distill_epochs=2,
        finetune_epochs=2,
        lr=5e-3,
        batch_size=64,
        threads=1,
        latency_runs=3,
        objective="size",
    )
    return run_pipeline(copy.deepcopy(teacher), data, cfg)


def test_pipeline_measures_every_candidate_and_picks_by_objective(full_run):
    names = [s.name for s in full_run.stages]
    assert len(names) == 6 and names[-1] == "distilled w0.5 pruned 0.5 int8 static"
    for s in full_run.stages:
        assert s.bytes == len(s.onnx) > 0 and s.ms_b1 > 0 and s.ms_b64 > 0
        assert (s.parity is not None) == s.name.endswith("fp32")
        if s.parity is not None:
            assert s.parity < 1e-3
    assert full_run.chosen.bytes == min(s.bytes for s in full_run.stages)
    params = [s.params for s in full_run.stages if s.name.endswith("fp32")]
    assert params[0] > params[1] > params[2]
    table = full_run.table()
    assert table.count("\n") == 7 and "(chosen)" in table


def test_bundle_from_pipeline_installs_and_runs(full_run, data, tmp_path):
    sk, vk = generate_keypair()
    blob = make_bundle(full_run, data, "tiny-v1", signing_key=sk)
    m = verify_bytes(blob, vk).manifest
    assert m.metrics["chosen"] == full_run.chosen.name and len(m.metrics["stages"]) == 6
    assert m.inputs[0].shape == ["batch", 1, 16, 16] and m.labels[3] == "3"
    (tmp_path / "b.efb").write_bytes(blob)
    inst = install_bundle(tmp_path / "b.efb", vk, tmp_path / "root")
    out = session(inst.model_path.read_bytes()).run(None, {"x": data.x_test[:5]})[0]
    assert out.shape == (5, 10)
