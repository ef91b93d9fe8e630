"""One intake for the coordinator and the sharded aggregator workers (issue 12).

A user's model (a file this test writes, with a head graph for weak devices) runs one round
sharded over a real mosquitto and two ``edgefed aggregator`` worker processes. The weak
device is given the head-only graph but sends a FULL-model update (real codec bytes); the
worker must refuse it with the same reason the unsharded engine gives, and the coordinator
must count that reason in the round's metrics. The honest full device trains for real
(exported ONNX step graph in onnxruntime) and is counted once; the resulting model equals
the unsharded engine's over the same two messages.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness.processes import stop_processes

from device_agent.agent import DeviceWorker
from edgefed.codec import CompressionSpec, UpdateMeta, encode_update
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.protocol import UpdateHeader, pack
from edgefed.sharding import ShardedAggregation, ShardingConfig
from edgefed.strategies import FedAvg
from edgefed.transport import Topics, TransportConfig
from edgefed.transport.client import MqttClient

USER_MODEL = '''
import torch

class TinyNet(torch.nn.Module):
    """A user's own model: not one of edgefed's demo models."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))
'''


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def _user_model(tmp_path: Path):
    import torch

    from edgefed.coordinator.model import build_federated_model

    src = tmp_path / "user_model.py"
    src.write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("user_model", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    x, y = _data(8, 0)
    return build_federated_model(
        mod.TinyNet(), (torch.from_numpy(x), torch.from_numpy(y)), head="last"
    )


def _engine(fm) -> RoundEngine:
    eng = RoundEngine(fm, FedAvg(), RoundConfig(uplink="int8", lr=0.1, seed=3))
    eng.register("dev-full", {}, [])
    eng.register("dev-weak", {"profile": "weak"}, [])
    return eng


def _full_model_update(eng: RoundEngine, rnd: int) -> bytes:
    """What a misbehaving weak device sends: a delta for EVERY tensor of the model."""
    rng = np.random.default_rng(7)
    delta = {k: 0.1 * rng.standard_normal(s).astype(np.float32) for k, s in eng.schema.items()}
    meta = UpdateMeta(rnd, "dev-weak", 40, eng.model_version, kind="delta")
    payload = encode_update(delta, meta, CompressionSpec.parse("int8"))
    return pack(UpdateHeader(rnd, "dev-weak", "weak1", 40, 0.5).to_dict(), {"update": payload})


def _start_workers(url: str, tmp: Path, n: int) -> list[subprocess.Popen]:
    conf = tmp / "worker.toml"
    conf.write_text(
        '[worker]\nid = "x"\ngroup = "aggs"\nheartbeat_interval = 0.3\n'
        f'[transport]\nurl = "{url}"\nfleet = "intake"\n'
    )
    procs = []
    for i in range(n):
        log = open(tmp / f"agg-{i}.log", "wb")  # noqa: SIM115 (closed with the process)
        args = ["-m", "edgefed", "aggregator", "--config", str(conf), "--id", f"agg-{i}"]
        procs.append(
            subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ))
        )  # fmt: skip
    return procs


def test_full_model_update_from_head_only_device_is_dropped_by_sharded_workers(
    mosquitto, tmp_path: Path
) -> None:
    fm = _user_model(tmp_path)
    assert set(fm.graphs["head"].updated) < set(fm.shapes)  # the head graph is a strict subset
    sharded, plain = _engine(fm), _engine(fm)
    tasks = sharded.start_round(["dev-full", "dev-weak"], sharded=True)
    plain_tasks = plain.start_round(["dev-full", "dev-weak"])
    assert sharded._sampled == {"dev-full": "full", "dev-weak": "head"}
    honest = DeviceWorker("dev-full", *_data(60, 1), tmp_path / "dev-full", durable=False)
    messages = {"dev-full": honest.handle_task(tasks["dev-full"]), "dev-weak": None}
    messages["dev-weak"] = _full_model_update(sharded, 1)
    assert plain_tasks.keys() == tasks.keys()

    # the unsharded engine: the reference reason and model
    assert plain.handle_update("dev-full", messages["dev-full"])
    assert not plain.handle_update("dev-weak", messages["dev-weak"])
    ref = plain.finish_round()
    ref_reason = next(d["reason"] for d in ref.drop_log if d["device"] == "dev-weak")
    assert ref_reason.startswith("invalid: tensors outside its graph"), ref.drop_log

    topics = Topics("intake")
    procs = _start_workers(mosquitto.url, tmp_path, 2)
    tc = TransportConfig(url=mosquitto.url, fleet="intake", protocol="5")
    agg = ShardedAggregation(
        tc, sharded.schema, ShardingConfig(workers=2, group="aggs", heartbeat_timeout=5.0)
    )
    dev = MqttClient(TransportConfig(url=mosquitto.url, protocol="5"), "test-devices")
    try:
        agg.start()
        agg.wait_for_workers(timeout=60)
        dev.start()
        agg.announce(sharded.announcement(for_workers=True))
        agg.pump(time.monotonic() + 30, lambda: agg.workers_at(1))
        assert agg.workers_at(1), agg.worker_round
        for d, msg in messages.items():
            dev.publish(topics.update(d), msg)

        def settled() -> bool:
            return (
                agg.all_reported() is False
                and "dev-full" in agg.reported_devices()
                and any(w.device == "dev-weak" for w in agg.worker_drops)
            )

        agg.pump(time.monotonic() + 30, settled)
        assert settled(), (agg.reported_devices(), agg.worker_drops)
        m = sharded.finish_round(agg.close_round())
    finally:
        dev.stop()
        agg.stop()
        stop_processes(procs)
    weak = [d["reason"] for d in m.drop_log if d["device"] == "dev-weak"]
    assert weak[0] == ref_reason, m.drop_log  # the same check, the same words
    assert m.participants == 1 and m.dropped == ref.dropped, (m.dropped, ref.dropped)
    assert m.dropped["invalid"] == 1
    for k in fm.shapes:  # only the honest device moved the model, in both setups
        np.testing.assert_allclose(sharded.params[k], plain.params[k], rtol=1e-5, atol=1e-6)
    body = next(k for k in fm.shapes if k.startswith("body"))
    assert not np.allclose(sharded.params[body], fm.initial[body])  # the honest device trained
