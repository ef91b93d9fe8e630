"""The whole flow over MQTT: coordinator service + device agents, against a real mosquitto
and against the embedded amqtt broker; hostile messages mid-run; checkpoint resume; and the
`edgefed demo` command itself."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import AgentService, DeviceWorker
from edgefed.coordinator.metrics import MetricsWriter, read_metrics
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.service import CoordinatorService
from edgefed.simulation import make_evaluator, simulate
from edgefed.strategies import FedAvg
from edgefed.transport import Topics, TransportConfig, split_message
from edgefed.transport.client import MqttClient

pytestmark = pytest.mark.system  # brokers and the demo end to end


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype(np.float32)
    return x, (x[:, 0] + x[:, 3] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def fm(fl_model_dir: Path) -> FederatedModel:
    """The demo 10-10-2 MLP (exported once per session by the harness)."""
    return FederatedModel.load(fl_model_dir / "model")


@pytest.mark.parametrize("broker", ["mosquitto", "embedded_broker"])
def test_federated_rounds_over_mqtt(broker: str, request, fm, tmp_path: Path) -> None:
    b = request.getfixturevalue(broker)
    devices = [_data(60, i) for i in range(3)]
    hist = simulate(
        None,
        devices,
        rounds=3,
        compression="topk:0.5+int8",
        test_data=_data(300, 9),
        lr=0.3,
        local_epochs=2,
        broker=b.url,
        work_dir=tmp_path,
        federated_model=fm,
        metrics_path=tmp_path / "m.jsonl",
    )
    assert [h["round"] for h in hist] == [1, 2, 3]
    assert all(h["participants"] == 3 and h["dropped"] == {} for h in hist)
    assert hist[-1]["accuracy"] > 0.8 and hist[-1]["cum_bytes_up"] > 0
    assert len(read_metrics(tmp_path / "m.jsonl")) == 3
    assert (tmp_path / "dev-000" / "model.npz").exists()  # the agent deployed the model


def _agents(fm, url: str, fleet: str, tmp_path: Path, n: int = 2) -> list[AgentService]:
    tc = TransportConfig(url=url, fleet=fleet, backoff_min=0.1, backoff_max=1.0)
    return [
        AgentService(DeviceWorker(f"a{i}", *_data(40, i), tmp_path / f"a{i}"), tc) for i in range(n)
    ]


def test_hostile_messages_duplicates_and_resume(mosquitto, fm, tmp_path: Path) -> None:
    fleet = "hostile"
    tc = TransportConfig(url=mosquitto.url, fleet=fleet, backoff_min=0.1, backoff_max=1.0)
    topics = Topics(fleet)
    ev = make_evaluator(
        fm.graphs["full"].inference_onnx, fm.graphs["full"].manifest, *_data(200, 7)
    )
    ck = tmp_path / "coord.npz"

    def service(rounds: int) -> CoordinatorService:
        eng = RoundEngine(fm, FedAvg(), RoundConfig(min_devices=2, round_timeout=20), ev)
        return CoordinatorService(
            eng,
            tc,
            rounds,
            checkpoint=ck,
            metrics=MetricsWriter(tmp_path / "m.jsonl", None),
            wait_timeout=30,
        )

    # a spy sees the real updates; an attacker replays one and sends junk everywhere
    spy = MqttClient(tc, "spy", [topics.all_updates]).start()
    evil = MqttClient(tc, "evil").start()
    agents = _agents(fm, mosquitto.url, fleet, tmp_path)
    threads = [a.start_thread() for a in agents]
    svc = service(2)
    t = threading.Thread(target=svc.run, daemon=True)
    try:
        t.start()
        first = spy.get(timeout=30)
        assert first is not None
        for topic in (topics.update("a0"), topics.presence("a1"), topics.update("ghost")):
            evil.publish_frame(topic, b"\x00" * 3)  # not even a frame
            evil.publish(topic, b"{not json")  # a valid frame around garbage
            evil.publish(topic, json.dumps({"status": "online", "device_id": "x"}).encode())
        evil.publish_frame(topics.update("a0"), split_message(b"x" * 10, 4)[1][0][:-1])
        dev = first.topic.rsplit("/", 1)[1]
        evil.publish(first.topic, first.payload)  # replay with a new transport message id
        nan = np.full(10, np.nan, np.float32).tobytes()
        evil.publish(topics.update("a1"), b"\x10\x00\x00\x00" + nan[:12] + nan)
        t.join(timeout=90)
        assert not t.is_alive() and svc.error is None
    finally:
        svc.stop()
        t.join(timeout=10)
    hist = read_metrics(tmp_path / "m.jsonl")
    assert [h["round"] for h in hist] == [1, 2]
    assert all(h["participants"] == 2 for h in hist)
    drops = [d for h in hist for d in h["drop_log"]]
    # the replay is dropped as a duplicate, or as late if its round had already closed
    assert any(d["device"] == dev and d["reason"].startswith(("duplicate", "late")) for d in drops)
    assert any(d["reason"].startswith("invalid") for d in drops)
    assert svc.rejected["invalid presence"] >= 1
    assert sum(1 for _ in svc.client.rejected) >= 1  # the broken frames, named in the log
    # restart with the same checkpoint: resumes after round 2, runs only round 3
    svc2 = service(3)
    t2 = threading.Thread(target=svc2.run, daemon=True)
    t2.start()
    t2.join(timeout=90)
    try:
        assert not t2.is_alive() and svc2.error is None
        assert svc2.engine.round == 3 and len(svc2.engine.history) == 3
        assert [h["round"] for h in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    finally:
        svc2.stop()
        for a in agents:
            a.stop()
        for th in threads:
            th.join(timeout=10)
        spy.stop()
        evil.stop()


def test_demo_command_end_to_end(embedded_broker, tmp_path: Path, capsys) -> None:
    """The whole life: federate -> export -> sign -> canary -> promote -> predict."""
    from edgefed.apps import demo as cli_demo

    args = argparse.Namespace(
        devices=3,
        rounds=4,
        alpha=0.5,
        model="mlp",
        compression="int8",
        strategy="fedavg",
        lr=0.1,
        weak=0,
        broker=embedded_broker.url,
        seed=0,
        out=str(tmp_path / "demo"),
        canaries=2,
        budget=100.0,  # 4 rounds: the gate is not what this test is about (see test_rollout_*)
        no_rollout=False,
    )
    assert cli_demo.run(args) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert "round   4/4" in out and "final accuracy" in out
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 1000
    rows = read_metrics(tmp_path / "demo" / "metrics-int8.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[-1]["participants"] == 3
    # export: the candidates table, signed with the ephemeral key, verified
    assert "| teacher fp32 |" in out and "int8 static |" in out, out
    assert "model.efb" in out and ", signed)" in out and "OK: " in out, out
    from edgefed.bundle import verify_bundle

    demo = tmp_path / "demo"
    m = verify_bundle(demo / "model.efb", demo / "keys" / "demo.key.pub")
    assert m.model_version == "r4-edge"
    # canary on dev-000 and dev-001, promoted; dev-002 predicts with the bundle
    assert "PROMOTED r4-edge" in out, out
    reps = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    assert sorted(r["device"] for r in reps) == ["dev-000", "dev-001"], reps
    assert all(r["mode"] == "canary" and r["baseline_version"] == "r4" for r in reps), reps
    assert "dev-002 runs r4-edge:" in out, out
    logits = np.load(demo / "predict-logits.npy")
    assert logits.shape[1] == 10 and len(logits) > 0
    assert "federated fp32 ONNX" in out and "bundle: " in out, out
    timings = json.loads((demo / "timings.json").read_text())
    assert list(timings) == [
        "federate", "export", "sign+verify", "canary+promote", "predict", "total",
    ]  # fmt: skip
    # signed downlink, no export chatter
    noise = ("UNSIGNED", "NOT signed", "torchvision is not installed", "Warning")
    assert not any(n in cap.out + cap.err for n in noise), cap.err[-2000:]
    bad = argparse.Namespace(**{**vars(args), "broker": "http://nope"})
    assert cli_demo.run(bad) == 2
