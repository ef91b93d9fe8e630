"""Signed downlink (issue 7) wired into the coordinator service and the device agent.

A coordinator signing with its Ed25519 key and two agents holding its public key run two
rounds on a real mosquitto. Forged tasks published by another MQTT client -- unsigned,
signed with another key, a real signature for another device's topic, a tampered copy, and a
correctly signed task of an old round (a replay) -- are each refused with a logged reason,
and the agent keeps training.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from harness.wait import wait_until

from device_agent.agent import AgentService, DeviceWorker
from edgefed.bundle.signing import generate_keypair
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.service import CoordinatorService
from edgefed.security.downlink import DownlinkSigner, DownlinkVerifier
from edgefed.strategies import FedAvg
from edgefed.transport import Topics, TransportConfig
from edgefed.transport.client import MqttClient
from edgefed.transport.message import pack

pytestmark = pytest.mark.system  # a real mosquitto


def test_agent_trains_on_signed_tasks_and_refuses_forged_ones(
    mosquitto, fl_model_dir, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    t = TransportConfig(url=mosquitto.url, fleet="sig", backoff_min=0.2, keepalive=5)
    topics = Topics("sig")
    sk, vk = generate_keypair()
    other_sk, _ = generate_keypair()
    engine = RoundEngine(
        FederatedModel.load(fl_model_dir / "model"),
        FedAvg(),
        RoundConfig(min_devices=2, lr=0.1, round_timeout=20.0),
    )
    svc = CoordinatorService(engine, t, 2, wait_timeout=60, signer=DownlinkSigner(sk))
    agents = {}
    for i, dev in enumerate(["dev-0", "dev-1"]):
        with np.load(fl_model_dir / f"data-{i}.npz") as z:
            w = DeviceWorker(dev, z["x"], z["y"], tmp_path / dev)
        agents[dev] = AgentService(w, t, verifier=DownlinkVerifier(vk))
    threads = [a.start_thread() for a in agents.values()]
    attacker = MqttClient(t, "attacker").start()
    try:
        task0 = topics.task("dev-0")
        fake = pack({"type": "task", "round": 1, "model_version": "r0"}, {"weights": b"x" * 100})
        signed = DownlinkSigner(sk).sign(task0, fake, 1)
        tampered = signed[:-1] + bytes([signed[-1] ^ 1])
        forgeries = [
            fake,  # unsigned
            DownlinkSigner(other_sk).sign(task0, fake, 1),  # someone else's key
            DownlinkSigner(sk).sign(topics.task("dev-1"), fake, 1),  # dev-1's task, replayed here
            tampered,
        ]
        wait_until(
            lambda: all(a.client.connected.is_set() for a in agents.values()),
            30,
            "agents connected",
        )
        for f in forgeries:
            attacker.publish(task0, f)
        a0 = agents["dev-0"]
        wait_until(lambda: len(a0.refused) >= 4, 20, "4 refused tasks")
        assert a0.refused == ["bad_magic", "unknown_key", "bad_signature", "bad_signature"], (
            a0.refused
        )
        svc.start_thread()
        assert svc.finished.wait(60), "coordinator did not finish"
        assert svc.error is None
        assert [h["participants"] for h in engine.history] == [2, 2]  # signed tasks worked
        assert a0.worker.state.last_round == 2
        # A correctly signed task of round 1, re-published after round 2: a replay.
        attacker.publish(task0, DownlinkSigner(sk).sign(task0, fake, 1))
        wait_until(lambda: len(a0.refused) >= 5, 20, "5 refused tasks")
        assert a0.refused[-1] == "replayed"
        assert a0.updates_sent == 2  # nothing forged was ever trained on or answered
        text = caplog.text
        assert text.count("dev-0: refused downlink on") == 5, text[-3000:]
        assert "dev-1: refused downlink" not in text
        assert all(th.is_alive() for th in threads)  # the agents kept going
    finally:
        attacker.stop()
        svc.stop()
        for a in agents.values():
            a.stop()
        for th in threads:
            th.join(timeout=10)


def test_signing_key_config_paths(tmp_path) -> None:
    from device_agent.agent import AgentConfig
    from edgefed.coordinator.config import CoordinatorConfig

    p = tmp_path / "c.toml"
    p.write_text('[security]\nsigning_key = "keys/coord.key"\n')
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/coord.key").write_text("00" * 32)  # load checks that the key file exists
    assert CoordinatorConfig.load(p).signing_key == str(tmp_path / "keys/coord.key")
    assert CoordinatorConfig.from_dict({}).signing_key is None
    a = AgentConfig.from_dict(
        {"agent": {"device_id": "d", "data": "x.npz", "coordinator_key": "c.pub"}}
    )
    assert a.coordinator_key == "c.pub" and a.bundle_key is None
