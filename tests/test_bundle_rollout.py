"""Roll-out over a real mosquitto: chunked publish, verify, install, report, rollback."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefed.bundle import (
    BundleError,
    InstalledBundle,
    Manifest,
    TensorSpec,
    build_bundle,
    current,
    generate_keypair,
)
from edgefed.bundle.rollout import (
    DeviceRollout,
    RolloutReport,
    all_status_topic,
    collect_reports,
    publish_bundle,
)
from edgefed.transport.client import MqttClient
from edgefed.transport.config import TransportConfig
from edgefed.transport.topics import Topics

pytestmark = pytest.mark.system  # a real mosquitto


def model(seed: int, op: str = "MatMul") -> bytes:
    w = np.random.default_rng(seed).standard_normal((128, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def bundle(sk, version: str, op: str = "MatMul") -> bytes:
    manifest = Manifest(
        model_version=version,
        inputs=[TensorSpec("x", ["batch", 128], "float32")],
        outputs=[TensorSpec("y", ["batch", 64], "float32")],
        opset=17,
    )
    return build_bundle(model(len(version), op), manifest, signing_key=sk)


def test_rollout_over_mosquitto(mosquitto, tmp_path: Path):
    sk, vk = generate_keypair()
    topics = Topics(fleet="farm")
    cfg = TransportConfig(url=mosquitto.url, fleet="farm", chunk_size=4096)
    coord = MqttClient(cfg, "coord", subscriptions=[all_status_topic(topics)]).start()
    activations: dict[str, list[str]] = {"dev-a": [], "dev-b": []}

    def activator(device: str):
        def activate(inst: InstalledBundle) -> None:
            if device == "dev-b" and inst.manifest.model_version == "v5-breaks-runtime":
                raise RuntimeError("runtime could not start the new model")
            activations[device].append(inst.manifest.model_version)

        return activate

    stop = threading.Event()
    clients, threads = [], []
    devices: dict[str, DeviceRollout] = {}
    for dev, groups in (("dev-a", ("all", "canary")), ("dev-b", ("all",))):
        # subscriptions are renewed on every CONNACK, so set them before start()
        client = MqttClient(cfg, dev)
        roll = DeviceRollout(
            client, topics, dev, tmp_path / dev, vk, activate=activator(dev), groups=groups
        )
        client.subscriptions = roll.subscriptions()
        client.start()
        clients.append(client)
        devices[dev] = roll
        t = threading.Thread(target=roll.serve, args=(stop.is_set,), daemon=True)
        t.start()
        threads.append(t)
    try:
        both = {"dev-a", "dev-b"}

        def roll_out(blob: bytes, group: str, expect: set[str]) -> dict[str, RolloutReport]:
            publish_bundle(coord, topics, blob, group)
            reps = collect_reports(coord, topics, expect, timeout=60)
            assert set(reps) == expect, reps
            return reps

        v1 = bundle(sk, "v1")
        assert len(v1) > 4 * 4096  # really chunked
        reps = roll_out(v1, "all", both)
        for dev, r in reps.items():
            assert r.status == "installed" and r.model_version == "v1", r
            assert r.latency_ms_b1 is not None and r.latency_ms_b1 > 0
            assert current(tmp_path / dev).manifest.model_version == "v1"

        reps = roll_out(bundle(sk, "v2-canary"), "canary", {"dev-a"})
        assert reps["dev-a"].status == "installed" and reps["dev-a"].previous_version == "v1"
        assert current(tmp_path / "dev-b").manifest.model_version == "v1"

        reps = roll_out(bundle(sk, "v3-broken", op="NoSuchOp"), "all", both)
        for r in reps.values():
            assert r.status == "refused" and "does not load" in r.reason, r
        assert reps["dev-a"].model_version == "v2-canary" and reps["dev-b"].model_version == "v1"

        forger_sk, _ = generate_keypair()
        reps = roll_out(bundle(forger_sk, "v4-forged"), "all", both)
        assert all(r.status == "refused" and "bad signature" in r.reason for r in reps.values())

        reps = roll_out(bundle(sk, "v5-breaks-runtime"), "all", both)
        assert reps["dev-a"].status == "installed"
        b = reps["dev-b"]
        assert b.status == "rolled_back" and b.model_version == "v1", b
        assert "runtime could not start" in b.reason
        assert current(tmp_path / "dev-b").manifest.model_version == "v1"
        assert activations["dev-b"] == ["v1", "v1"]  # v1, then re-activated after rollback

        # garbage on the bundle topic: refused with a reason, device keeps serving
        coord.publish("edgefed/farm/bundle/all", b"\x00\x01garbage")
        reps = collect_reports(coord, topics, both, timeout=60)
        assert all(r.status == "refused" for r in reps.values())
        assert current(tmp_path / "dev-a").manifest.model_version == "v5-breaks-runtime"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for c in [*clients, coord]:
            c.stop()


def test_publish_refuses_non_bundle():
    """Checked before the client is touched (None would fail on use)."""
    with pytest.raises(BundleError, match="truncated or corrupt"):
        publish_bundle(None, Topics(), b"not a zip")
