"""Bundle roll-out (issue 6) in the real agent process, published with ``edgefed bundle
publish`` on a real mosquitto: the agent installs a signed bundle, reports its version and
measured latency, ``edgefed-agent predict`` then runs the bundle's model; a bundle whose model
does not load is refused (the previous one stays active) and reported, and the agent keeps
serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefed.bundle.builder import build_bundle
from edgefed.bundle.format import Manifest, TensorSpec
from edgefed.bundle.signing import load_signing_key, write_keypair

pytestmark = pytest.mark.system  # mosquitto + agent process

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def model(seed: int, op: str = "MatMul") -> tuple[bytes, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((10, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString(), w


def bundle(sk, version: str, op: str = "MatMul") -> tuple[bytes, np.ndarray]:
    manifest = Manifest(
        model_version=version,
        inputs=[TensorSpec("x", ["batch", 10], "float32")],
        outputs=[TensorSpec("y", ["batch", 64], "float32")],
        opset=17,
    )
    onnx_bytes, w = model(len(version), op)
    return build_bundle(onnx_bytes, manifest, signing_key=sk), w


def _publish(url: str, blob: Path, pub: Path) -> tuple[int, list[dict]]:
    args = ["-m", "edgefed", "bundle", "publish", str(blob), "--broker", url, "--fleet", "ro"]
    args += ["--group", "canary", "--key", str(pub), "--wait", "dev-0", "--timeout", "60"]
    p = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=90)
    reps = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, reps


def test_agent_installs_published_bundle_and_refuses_broken_one(
    mosquitto, fl_model_dir, tmp_path, mqtt_watch
) -> None:
    watch = mqtt_watch(mosquitto.url, ["edgefed/ro/presence/+"])
    pub = write_keypair(tmp_path / "bundle.key")
    sk = load_signing_key(tmp_path / "bundle.key")
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[agent]\ndevice_id = "dev-0"\ndata = "{fl_model_dir / "data-0.npz"}"\n'
        f'state_dir = "{tmp_path / "state"}"\nbundle_key = "{pub}"\ngroup = "canary"\n'
        f'[transport]\nurl = "{mosquitto.url}"\nfleet = "ro"\nbackoff_min = 0.2\n'
    )
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 (closed with the process)
    agent = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "--config", str(conf)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    try:
        watch.wait_for(lambda msgs: len(msgs) > 0, 60)  # online (and subscribed) first
        good = tmp_path / "v1.efb"
        blob, w = bundle(sk, "v1")
        good.write_bytes(blob)
        rc, reps = _publish(mosquitto.url, good, pub)
        assert rc == 0, (reps, (tmp_path / "agent.log").read_text()[-3000:])
        r = reps[0]
        assert r["status"] == "installed" and r["model_version"] == "v1", r
        assert r["latency_ms_b1"] > 0

        x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        p = subprocess.run(
            [sys.executable, "-m", "device_agent.cli", "predict", "--config", str(conf),
             "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
            env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w, rtol=1e-4, atol=1e-4)

        broken = tmp_path / "v2.efb"
        broken.write_bytes(bundle(sk, "v2-broken", op="NoSuchOp")[0])
        rc, reps = _publish(mosquitto.url, broken, pub)
        assert rc == 1
        r = reps[0]
        assert r["status"] == "refused" and "does not load" in r["reason"], r
        assert r["model_version"] == "v1" and r["offered_version"] == "v2-broken"
        assert agent.poll() is None  # still serving

        rc, reps = _publish(mosquitto.url, good, pub)  # re-offering v1 still gets an answer
        assert reps and reps[0]["model_version"] == "v1", reps
    finally:
        agent.kill()
        agent.wait(timeout=10)
        log.close()
