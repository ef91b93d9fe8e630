"""The whole system on the secured broker from ``edgefed broker-config``: TLS, one account per
connection, ACLs. A sharded coordinator (its aggregation client on its own account through
``[sharding.transport]``), 3 ``edgefed aggregator`` processes on aggregator accounts, and 3
agents on device accounts run two rounds; every update is counted."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from typing import Any

import numpy as np
import pytest
from harness.processes import stop_processes

from device_agent.agent import AgentService, DeviceWorker
from edgefed.coordinator.config import CoordinatorConfig
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.service import CoordinatorService
from edgefed.fleetops.broker_config import Device
from edgefed.strategies import FedAvg
from edgefed.transport import TransportConfig

pytestmark = pytest.mark.system  # secured mosquitto + worker processes


def test_sharded_fleet_runs_on_the_secured_broker(
    secured_mosquitto_factory: Any, fl_model_dir, tmp_path
) -> None:
    devs, workers = ["dev-0", "dev-1", "dev-2"], ["agg-0", "agg-1", "agg-2"]
    sm = secured_mosquitto_factory(
        "sys",
        devices=tuple(Device(d) for d in devs),
        coordinators=("coordinator", "coordinator-agg"),
        aggregators=tuple(workers),
    )
    accounts = sm.written.directory / "accounts"

    def table(user: str) -> dict:
        return tomllib.loads((accounts / f"{user}.toml").read_text())["transport"]

    cfg = CoordinatorConfig.from_dict(
        {
            "sharding": {"workers": 3, "group": "aggs", "transport": table("coordinator-agg")},
            "transport": table("coordinator"),
        }
    )
    procs = []
    for w in workers:
        conf = tmp_path / f"{w}.toml"
        t = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in table(w).items())
        conf.write_text(f'[worker]\nid = "{w}"\ngroup = "aggs"\nheartbeat_interval = 0.5\n'
                        f"[transport]\n{t}\n")  # fmt: skip
        log = open(tmp_path / f"{w}.log", "wb")  # noqa: SIM115 (closed below)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "edgefed", "aggregator", "--config", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
            )
        )
        log.close()
    engine = RoundEngine(
        FederatedModel.load(fl_model_dir / "model"),
        FedAvg(),
        RoundConfig(min_devices=3, lr=0.1, round_timeout=20.0),
    )
    svc = CoordinatorService(
        engine, cfg.transport, 2, wait_timeout=60,
        sharding=cfg.sharding, sharding_transport=cfg.sharding_transport,
    )  # fmt: skip
    agents = []
    for i, d in enumerate(devs):
        with np.load(fl_model_dir / f"data-{i}.npz") as z:
            w = DeviceWorker(d, z["x"], z["y"], tmp_path / d)
        agents.append(AgentService(w, TransportConfig.from_dict(table(d))))
    threads = [a.start_thread() for a in agents]
    try:
        svc.start_thread()
        ok = svc.finished.wait(120)
        logs = "".join((tmp_path / f"{w}.log").read_text() for w in workers)
        assert ok and svc.error is None, (svc.error, logs[-3000:])
        assert [h["participants"] for h in engine.history] == [3, 3], (engine.history, logs)
        assert all(h["dropped"] == {} for h in engine.history), engine.history
        assert all(a.updates_sent == 2 for a in agents)
        broker_log = (sm.written.directory / "mosquitto.log").read_text(errors="replace")
        assert "already connected" not in broker_log, broker_log[-3000:]  # no session take-over
    finally:
        svc.stop()
        for a in agents:
            a.stop()
        for th in threads:
            th.join(timeout=10)
        stop_processes(procs)
