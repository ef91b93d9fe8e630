"""device_agent.trainer.StepTrainer: torch-equal training, zero-copy buffers, validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from device_agent.dataset import DatasetError, batch_order, load_npz
from device_agent.trainer import StepTrainer, TrainerError
from edgefed.train_export import SGD, export_training_step
from edgefed.zoo.models import digits_mlp


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = digits_mlp(16)
    g = export_training_step(
        model, (torch.randn(8, 64), torch.randint(0, 10, (8,))), optimizer=SGD(momentum=0.9)
    )
    init = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 64)).astype(np.float32)
    y = rng.integers(0, 10, 70)
    return model, g, init, x, y


def _trainer(setup) -> StepTrainer:
    _, g, init, _, _ = setup
    tr = StepTrainer(g.onnx, g.manifest, inference_onnx=g.inference_onnx)
    tr.set_params(init)
    return tr


def _torch_reference(model, x, y, epochs, bs, lr, seed):
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    for _, idx in batch_order(len(x), epochs, bs, seed):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            ref(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])
        ).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


def test_batch_order_keeps_last_partial_batch_and_is_deterministic() -> None:
    b = list(batch_order(70, 2, 32, seed=3))
    assert [len(i) for _, i in b] == [32, 32, 6, 32, 32, 6]
    assert [e for e, _ in b] == [0, 0, 0, 1, 1, 1]
    assert sorted(np.concatenate([i for e, i in b if e == 0]).tolist()) == list(range(70))
    again = list(batch_order(70, 2, 32, seed=3))
    assert all(np.array_equal(a, c) for (_, a), (_, c) in zip(b, again, strict=True))
    assert not np.array_equal(b[0][1], b[3][1])  # reshuffled each epoch
    assert np.array_equal(next(batch_order(70, 1, 70, 0, shuffle=False))[1], np.arange(70))


def test_matches_torch_and_state_persists_across_calls(setup) -> None:
    model, _, _, x, y = setup
    tr = _trainer(setup)
    s1 = tr.train_epochs(x, y, epochs=1, batch_size=32, lr=0.1, seed=1)
    assert s1.steps == 3 and s1.samples == 70 and len(s1.epoch_loss) == 1
    tr2 = _trainer(setup)
    tr2.train_epochs(x, y, epochs=2, batch_size=32, lr=0.1, seed=1)
    want = _torch_reference(model, x, y, 2, 32, 0.1, 1)
    for k, v in want.items():
        np.testing.assert_allclose(tr2.params[k], v, rtol=1e-5, atol=1e-6)
    # momentum persists between calls: a second 1-epoch call != a fresh trainer's epoch
    assert np.abs(tr.optimizer_state["state:momentum:0.weight"]).max() > 0
    tr.reset_optimizer_state()
    assert all(np.all(v == 0) for v in tr.optimizer_state.values())


def test_npz_input_and_predict(setup, tmp_path) -> None:
    model, _, _, x, y = setup
    np.savez(tmp_path / "d.npz", x=x, y=y)
    tr = _trainer(setup)
    st = tr.train_epochs(tmp_path / "d.npz", epochs=2, batch_size=16, lr=0.1, seed=2)
    assert st.epoch_loss[1] < st.epoch_loss[0]
    want = _torch_reference(model, x, y, 2, 16, 0.1, 2)
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in want.items()})
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tr.predict(x, batch_size=25), logits, rtol=1e-4, atol=1e-5)
    assert tr.accuracy(x, y) == float(np.mean(logits.argmax(1) == y))
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(DatasetError, match="missing arrays"):
        load_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")


def test_buffers_are_swapped_not_copied(setup) -> None:
    _, _, _, x, y = setup
    tr = _trainer(setup)
    name = "param:0.weight"
    a, b = tr._cur[name], tr._nxt[name]
    ids = {id(a), id(b)}
    ptrs = {a.ctypes.data, b.ctypes.data}
    before = a.copy()
    tr.step(x[:8], y[:8], lr=0.1)
    assert tr._cur[name] is b and tr._nxt[name] is a  # the step wrote into the spare buffer
    assert not np.array_equal(b, before)
    tr.train_epochs(x, y, epochs=1, batch_size=8, lr=0.1)
    assert {id(tr._cur[name]), id(tr._nxt[name])} == ids
    assert {tr._cur[name].ctypes.data, tr._nxt[name].ctypes.data} == ptrs
    assert tr._ov_cur[name].data_ptr() == tr._cur[name].ctypes.data


def test_validation_errors_name_the_problem(setup) -> None:
    _, g, init, x, y = setup
    tr = _trainer(setup)
    with pytest.raises(TrainerError, match="missing parameters"):
        tr.set_params({"0.weight": init["0.weight"]})
    with pytest.raises(TrainerError, match="unknown parameter"):
        tr.set_params({**init, "zzz": init["0.bias"]})
    with pytest.raises(TrainerError, match=r"0.weight: shape"):
        tr.set_params({**init, "0.weight": init["0.weight"].T})
    with pytest.raises(TrainerError, match="NaN"):
        tr.set_params({**init, "0.bias": np.full_like(init["0.bias"], np.nan)})
    with pytest.raises(TrainerError, match="dtype"):
        tr.set_params({**init, "0.bias": init["0.bias"].astype(np.int64)})
    tr.set_params({"0.bias": init["0.bias"] + 1}, strict=False)
    np.testing.assert_array_equal(tr.params["0.bias"], init["0.bias"] + 1)
    np.testing.assert_array_equal(tr.params["0.weight"], init["0.weight"])
    with pytest.raises(TrainerError, match="per-sample shape"):
        tr.train_epochs(x[:, :10], y)
    with pytest.raises(TrainerError, match="samples"):
        tr.train_epochs(x, y[:5])
    with pytest.raises(TrainerError, match=r"class ids"):
        tr.train_epochs(x, y + 10)
    with pytest.raises(TrainerError, match="dtype"):
        tr.train_epochs(x.astype(np.complex64), y)
    xn = x.copy()
    xn[3, 3] = np.inf
    with pytest.raises(TrainerError, match="NaN or inf"):
        tr.train_epochs(xn, y)
    with pytest.raises(TrainerError, match="FedProx"):
        tr.train_epochs(x, y, global_params=init)
    with pytest.raises(TrainerError, match="lr"):
        tr.train_epochs(x, y, lr=float("nan"))
    kept = tr.params
    with pytest.raises(TrainerError, match="loss became"):
        tr.train_epochs(x, y, lr=1e38)
    after = tr.params  # diverged: everything restored to the start of the call
    assert all(np.array_equal(after[k], kept[k]) for k in kept)
    with pytest.raises(TrainerError, match="format"):
        StepTrainer(g.onnx, {**g.manifest, "format": "other"})
    with pytest.raises(TrainerError, match="do not match"):
        StepTrainer(g.onnx, {**g.manifest, "inputs": g.manifest["inputs"][::-1]})
    with pytest.raises(TrainerError, match="cannot load"):
        StepTrainer(b"garbage", g.manifest)
    with pytest.raises(TrainerError, match="threads"):
        StepTrainer(g.onnx, g.manifest, threads=0)
    # float64 data is accepted and converted (documented), int labels of any width too
    tr.train_epochs(x.astype(np.float64), y.astype(np.int32), epochs=1)


def test_low_memory_session_trains_identically(setup) -> None:
    _, g, init, x, y = setup
    a = _trainer(setup)
    b = StepTrainer(g.onnx, g.manifest, low_memory=True)
    b.set_params(init)
    for tr in (a, b):
        tr.train_epochs(x, y, epochs=1, batch_size=16, lr=0.1, seed=9)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in init)
