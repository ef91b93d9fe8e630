"""Device agent: task handling with a real step graph, on-disk state and resume, redelivered
tasks, hostile tasks, config, capabilities and `edgefed-agent predict`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from device_agent import cli
from device_agent.agent import AgentConfig, DeviceWorker, capabilities
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.strategies import FedAvg
from edgefed.transport.message import pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype(np.float32)
    return x, (x[:, 0] - x[:, 2] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def fm(fl_model_dir: Path) -> FederatedModel:
    """The demo 10-10-2 MLP (exported once per session by the harness)."""
    return FederatedModel.load(fl_model_dir / "model")


def test_task_update_state_and_restart(fm, tmp_path: Path) -> None:
    eng = RoundEngine(fm, FedAvg(), RoundConfig(uplink="topk:0.3+int8; min_elements=1", lr=0.1))
    x, y = _data(50, 3)
    w = DeviceWorker("dev-a", x, y, tmp_path / "a")
    task = eng.start_round(["dev-a"])["dev-a"]
    out = w.handle_task(task)
    header, parts = unpack(out)
    assert header["round"] == 1 and header["num_samples"] == 50 and "update" in parts
    assert np.isfinite(header["loss"])
    st = tmp_path / "a"
    assert (st / "residual.ef").exists() and (st / "outbox.bin").read_bytes() == out
    assert w.state.graphs() == [fm.graphs["full"].sha]
    # the same task redelivered (QoS 1, or after a crash): the SAME update, no retraining
    assert w.handle_task(task) == out
    assert eng.handle_update("dev-a", out) and not eng.handle_update("dev-a", w.handle_task(task))
    eng.finish_round()
    # restart: a new process with the same state dir resumes model version and residual
    w2 = DeviceWorker("dev-a", x, y, st)
    assert (w2.state.model_version, w2.state.last_round, w2.state.rounds_done) == ("r0", 1, 1)
    task2 = eng.start_round(["dev-a"])["dev-a"]
    assert "graph" in unpack(task2)[1] or w2.state.has_graph(fm.graphs["full"].sha)
    residual_before = w2._feedback(eng.schema).norm()
    assert residual_before > 0  # loaded from disk, not a fresh zero residual
    out2 = w2.handle_task(task2)
    assert unpack(out2)[0]["round"] == 2 and eng.handle_update("dev-a", out2)
    assert eng.finish_round().participants == 1
    with pytest.raises(ValueError, match="belongs to"):
        DeviceWorker("dev-b", x, y, st)


def test_hostile_tasks_are_rejected_and_worker_keeps_going(fm, tmp_path: Path) -> None:
    eng = RoundEngine(fm, FedAvg(), RoundConfig())
    w = DeviceWorker("dev-h", *_data(20, 1), tmp_path / "h")
    fresh = DeviceWorker("dev-f", *_data(20, 2), tmp_path / "f")
    tasks = eng.start_round(["dev-f", "dev-h"])
    task = tasks["dev-h"]
    header, parts = unpack(task)
    assert w.handle_task(b"\xff" * 10) is None
    assert w.handle_task(pack({"type": "task", "round": "1"})) is None  # wrong type
    bad_w = dict(parts, weights=parts["weights"][:-5])
    err = unpack(w.handle_task(pack(header, bad_w)))[0]
    assert "bad weights" in err["error"]
    no_graph = {"weights": unpack(tasks["dev-f"])[1]["weights"]}
    err = unpack(fresh.handle_task(pack(unpack(tasks["dev-f"])[0], no_graph)))[0]
    assert "missing graph" in err["error"]
    assert not eng.handle_update("dev-f", pack(err))  # coordinator logs the device's error
    assert eng.device("dev-f").graphs == []  # ...and will resend the graph
    assert w.handle_task(task) is not None  # the genuine task still works


def test_agent_config_and_capabilities(tmp_path: Path) -> None:
    # The example's paths are a Pi's (/var/lib, /etc): read its tables without checking them.
    cfg = AgentConfig.from_dict(tomllib.loads((ROOT / "examples" / "agent.toml").read_text()))
    assert cfg.device_id == "pi-kitchen-01" and cfg.transport.use_tls
    assert cfg.transport.session_expiry == 86400
    for d, msg in [
        ({"agent": {"data": "x.npz"}}, "device_id: expected a string, found nothing"),
        ({"agent": {"device_id": "a/b", "data": "x"}}, "invalid device id"),
        ({"agent": {"device_id": "a", "data": "x", "colour": 1}}, "\\[agent\\] colour: unknown"),
        ({"agent": {"device_id": "a", "data": "x", "threads": 0}}, "threads"),
        ({"agent": {"device_id": "a", "data": "x"}, "transport": {"url": "ftp://x"}}, "scheme"),
    ]:
        with pytest.raises(ValueError, match=msg):
            AgentConfig.from_dict(d)
    caps = capabilities("weak")
    assert {"arch", "cores", "ram_mb", "onnxruntime"} <= set(caps) and caps["profile"] == "weak"
    assert caps["cores"] >= 1 and caps["ram_mb"] > 0


def test_predict_cli_runs_the_deployed_model(fm, tmp_path: Path, capsys) -> None:
    eng = RoundEngine(fm, FedAvg(), RoundConfig())
    x, y = _data(30, 5)
    w = DeviceWorker("dev-p", x, y, tmp_path / "p")
    w.handle_task(eng.start_round(["dev-p"])["dev-p"])
    np.save(tmp_path / "x.npy", x[:7])
    rc = cli.main(
        [
            "predict",
            "--state-dir",
            str(tmp_path / "p"),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "logits.npy"),
        ]
    )
    assert rc == 0
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (7, 2) and np.isfinite(logits).all()
    assert (
        cli.main(
            ["predict", "--state-dir", str(tmp_path / "p"), "--input", str(tmp_path / "x.npy")]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("model r0:")
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    assert (
        cli.main(
            ["predict", "--state-dir", str(tmp_path / "p"), "--input", str(tmp_path / "bad.npy")]
        )
        == 2
    )
