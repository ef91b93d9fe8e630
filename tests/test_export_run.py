"""A user's model end to end: factory file -> federated over MQTT -> model artefact ->
``edgefed export --run`` (real CLI process) -> signed bundle; and run_pipeline on modules
whose forward argument is not named ``x``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export_cli import _cli
from torch import nn

import edgefed
from device_agent.inference import InferenceModel
from edgefed.bundle import verify_bundle, write_keypair
from edgefed.coordinator.artifact import ArtifactError, load_module, read_artifact
from edgefed.coordinator.model import ModelConfigError, federated_model_from_config
from edgefed.export.pipeline import ExportConfig, run_pipeline
from edgefed.usermodel import UserModelError
from edgefed.zoo.data import TaskData, load_digits_arrays, train_test_split

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's classifier; its forward argument is called ``features``, not ``x``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, features):
        return self.head(self.body(features))


def make_net():
    return Net()


def not_a_module():
    return "a string"
'''


def test_factory_errors_name_the_spec(tmp_path: Path) -> None:
    (tmp_path / "my_net.py").write_text(USER_MODEL)
    cases = {
        "my_net:not_a_module": "expected it to return a torch.nn.Module, found str",
        "my_net:missing": "has no function 'missing'",
        "gone.py:make_net": f"file {tmp_path / 'gone.py'} does not exist",
        "no_colon": "expected 'file.py:function'",
    }
    for spec, expected in cases.items():
        with pytest.raises(UserModelError) as e:
            federated_model_from_config({"factory": spec, "input_shape": [64]}, tmp_path)
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ModelConfigError, match=r"\[model\] input_shape: expected"):
        federated_model_from_config({"factory": "my_net:make_net", "input_shape": 64}, tmp_path)
    with pytest.raises(ModelConfigError, match="does not go through the model"):
        federated_model_from_config({"factory": "my_net:make_net", "input_shape": [63]}, tmp_path)


def test_user_model_federated_then_exported_from_the_run(tmp_path: Path) -> None:
    user = tmp_path / "project"
    user.mkdir()
    (user / "my_net.py").write_text(USER_MODEL)
    fm = federated_model_from_config({"factory": "my_net:make_net", "input_shape": [64]}, user)
    assert fm.source["factory"] == f"{user / 'my_net.py'}:make_net"
    assert fm.graphs["full"].manifest["data_contract"]["x_shape"] == ["batch", 64]
    x, y = load_digits_arrays()
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, seed=0)
    fm.evaluation = (x_te, y_te)
    shards = [(x_tr[i::3], y_tr[i::3]) for i in range(3)]
    state = tmp_path / "state"
    hist = edgefed.simulate(
        None,
        shards,
        rounds=8,
        compression="none",
        downlink="none",
        test_data=(x_te, y_te),
        lr=0.1,
        local_epochs=3,
        broker="embedded",
        work_dir=state,
        federated_model=fm,
    )
    assert len(hist) == 8 and hist.final_accuracy > 0.8

    art = read_artifact(state)  # the coordinator wrote it at each checkpoint
    assert art.manifest["round"] == 8 and art.manifest["model_version"] == "r8"
    assert art.manifest["run_id"] and art.manifest["metrics"]["accuracy"] == hist.final_accuracy
    assert art.manifest["input"] == {"name": "x", "shape": ["batch", 64], "dtype": "float32"}
    net = load_module(art)
    assert type(net).__name__ == "Net"
    with torch.no_grad():
        got = net(torch.from_numpy(x_te)).numpy()
    ref = InferenceModel((art.directory / "inference.onnx").read_bytes(), art.manifest).predict(
        x_te, art.params
    )
    assert np.abs(got - ref).max() < 1e-5  # the reloaded module IS the federated model
    assert float((got.argmax(1) == y_te).mean()) == pytest.approx(hist.final_accuracy)
    ev = art.evaluation()
    assert ev is not None and np.array_equal(ev[0], x_te) and np.array_equal(ev[1], y_te)

    # A torn artefact (weights of another round) is refused with the file named.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in art.directory.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    np.savez(bad / "weights.npz", **{k: v * 0 for k, v in art.params.items()})
    with pytest.raises(ArtifactError, match=r"weights\.npz: sha256 differs"):
        read_artifact(bad)

    pub = write_keypair(tmp_path / "k")
    r = _cli(
        "export", "--run", str(state), "-o", "m.efb", "--key", "k", "--json", "t.json",
        "--threads", "1", "--budget", "100", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[export ##### done" in r.stderr  # the progress lines
    assert "| teacher fp32 |" in r.stdout and "| distilled w0.5 pruned 0.5 int8 static |" in (
        r.stdout
    )
    m = verify_bundle(tmp_path / "m.efb", pub)
    assert m.model_version == "r8" and m.inputs[0].shape == ["batch", 64]
    table = json.loads((tmp_path / "t.json").read_text())
    teacher = table["stages"][0]
    # The teacher row is the federated model measured on the held-out half of the
    # coordinator's evaluation set: its accuracy there is reported, and so is the shipped one.
    assert teacher["name"] == "teacher fp32" and 0.8 < teacher["accuracy"] <= 1.0
    chosen = next(s for s in table["stages"] if s["name"] == m.metrics["chosen"])
    assert f"accuracy {100 * chosen['accuracy']:.2f}%" in r.stdout
    assert chosen["bytes"] < teacher["bytes"]

    r = _cli("export", "--run", str(tmp_path / "nowhere"), "-o", "x.efb", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nowhere: expected a coordinator config" in r.stderr
    ck = state / "coordinator.ckpt.npz"
    r = _cli("export", "--teacher-state", str(ck), "-o", "x.efb", cwd=tmp_path)
    assert r.returncode == 1 and f"use: edgefed export --run {state}" in r.stderr


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        z = torch.max_pool2d(torch.relu(self.conv(pixels)), 2)
        return self.fc(torch.flatten(z, 1))


@pytest.mark.parametrize("kind", ["sequential", "named"])
def test_run_pipeline_accepts_any_module_and_argument_name(kind: str) -> None:
    torch.manual_seed(0)
    x, y = load_digits_arrays(image=True)
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, seed=0)
    data = TaskData(x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])
    if kind == "sequential":  # forward(self, input)
        net: nn.Module = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 16, 10),
        )  # fmt: skip
    else:
        net = _Named()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(x_tr)), torch.from_numpy(y_tr)).backward()
        opt.step()
    lines: list[str] = []
    cfg = ExportConfig(
        distill_epochs=2, finetune_epochs=2, latency_runs=3, threads=1, accuracy_budget_pp=100
    )
    res = run_pipeline(net, data, cfg, log=lines.append)
    names = [s.name for s in res.stages]
    assert names[0] == "teacher fp32" and "distilled w0.5 pruned 0.5 int8 static" in names
    assert any(line.startswith("[export #") for line in lines)
    sess = ort.InferenceSession(res.chosen.onnx, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    out = sess.run(None, {"x": x_te[:3]})[0]
    assert out.shape == (3, 10)
    assert res.stages[0].accuracy > 0.9


def test_coordinator_cli_writes_the_artefact_and_export_reads_its_config(
    embedded_broker, fleet_factory, tmp_path: Path
) -> None:
    """`edgefed coordinator` (built-in model) + 2 `edgefed-agent` processes: the artefact is
    written beside the checkpoint, its path printed; `export --run <config>` finds it."""
    import re

    from edgefed.bundle import inspect_bundle

    fleet = fleet_factory(embedded_broker.url, 2, rounds=2)
    x, y = load_digits_arrays()
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, seed=1)
    for i, dev in enumerate(fleet.devices):
        np.savez(tmp_path / f"d{i}.npz", x=x_tr[i::2], y=y_tr[i::2])
        fleet.data[dev] = tmp_path / f"d{i}.npz"
    np.savez(tmp_path / "eval.npz", x=x_te, y=y_te)
    text = fleet.coord_config.read_text()
    text = re.sub(r'(?m)^dir = ".*"$', 'builtin = "digits_mlp"', text)
    text = re.sub(r'(?m)^dataset = ".*"$', f'dataset = "{tmp_path / "eval.npz"}"', text)
    fleet.coord_config.write_text(text)
    coord = fleet.start_coordinator()
    fleet.start_agents()
    assert coord.wait(timeout=400) == 0, fleet.log("coordinator")[-3000:]
    where = fleet.root / "federated-model"
    assert f"federated model (round 2): {where}" in fleet.log("coordinator")
    art = read_artifact(where)
    assert art.source["builtin"] == "digits_mlp" and art.manifest["round"] == 2
    net = load_module(art)
    with torch.no_grad():
        got = net(torch.from_numpy(x_te)).numpy()
    ref = InferenceModel((where / "inference.onnx").read_bytes(), art.manifest).predict(
        x_te, art.params
    )
    assert np.abs(got - ref).max() < 1e-5
    r = _cli(
        "export", "--run", str(fleet.coord_config), "-o", "m.efb", "--prune", "0",
        "--quantize", "none", "--threads", "1", "--budget", "100", "--distill-epochs", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    m = inspect_bundle(tmp_path / "m.efb")
    assert m.model_version == "r2" and m.inputs[0].shape == ["batch", 64]
