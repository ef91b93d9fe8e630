"""Issue 14, item 5 against the federated model: a fleet federates the user's model (defined
in a ``my_models.py`` the test writes), every device ends with the final model, and canaries
of bundles are judged against THAT model on the devices' held-out data: a bundle that always
answers one class is rolled back (the canary, which had no bundle before, runs its federated
model again), a well-trained one is promoted to the fleet."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness.wait import wait_until
from rollout_helpers import make_bundle, reports, run_cli, task_data, train, user_models

from device_agent.agent import AgentService, DeviceWorker
from edgefed.bundle.signing import load_signing_key, write_keypair
from edgefed.bundle.unpack import current
from edgefed.coordinator.model import FederatedModel, build_federated_model
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.service import CoordinatorService
from edgefed.strategies import FedAvg
from edgefed.transport import TransportConfig


def test_canary_is_judged_against_the_federated_model(mosquitto: Any, tmp_path: Path) -> None:
    mm = user_models(tmp_path)
    torch.manual_seed(0)
    x8, y8 = task_data(8, 0)
    fm = build_federated_model(mm.make_net(), (torch.from_numpy(x8), torch.from_numpy(y8)))
    fm.save(tmp_path / "model")
    pub = write_keypair(tmp_path / "bundle.key")
    sk = load_signing_key(tmp_path / "bundle.key")
    good = train(mm.make_net())
    constant = copy.deepcopy(good)
    with torch.no_grad():  # always class 0: about half right on balanced data
        constant[2].weight.zero_()
        constant[2].bias.copy_(torch.tensor([5.0, -5.0]))
    files = {"bad": tmp_path / "bad.efb", "good": tmp_path / "good.efb"}
    files["bad"].write_bytes(make_bundle(constant, "const-v1", sk))
    files["good"].write_bytes(make_bundle(good, "good-v1", sk))

    t = TransportConfig(url=mosquitto.url, fleet="life", backoff_min=0.2, keepalive=5)
    engine = RoundEngine(
        FederatedModel.load(tmp_path / "model"), FedAvg(),
        RoundConfig(min_devices=2, lr=0.1, local_epochs=5, round_timeout=30.0),
    )  # fmt: skip
    svc = CoordinatorService(engine, t, 2, wait_timeout=60)
    agents = {}
    for i, (dev, groups) in enumerate([("dev-0", ("all", "canary")), ("dev-1", ("all",))]):
        x, y = task_data(120, i)
        w = DeviceWorker(dev, x, y, tmp_path / "state" / dev)
        agents[dev] = AgentService(w, t, bundle_key=str(pub), groups=groups,
                                   holdout=task_data(300, 100 + i))  # fmt: skip
    threads = [a.start_thread() for a in agents.values()]
    publish = ["-m", "edgefed", "bundle", "publish", "--broker", mosquitto.url, "--fleet", "life"]
    publish += ["--group", "canary", "--promote", "--wait", "dev-0", "--timeout", "60"]
    try:
        svc.start_thread()
        assert svc.finished.wait(120) and svc.error is None, svc.error
        for a in agents.values():
            wait_until(lambda a=a: a.worker.state.model_version == "r2", 30, "final model r2")

        p = run_cli(*publish, str(files["bad"]))
        assert p.returncode == 1, (p.stdout, p.stderr)
        canary, back = reports(p.stdout)
        assert canary["baseline_version"] == "r2", canary  # the federated model
        assert canary["baseline_accuracy"] > 0.75, canary  # the run did learn the task
        assert canary["accuracy"] < canary["baseline_accuracy"] - 0.01, canary
        assert "ROLLED BACK const-v1" in p.stdout, p.stdout
        assert back["status"] == "rolled_back" and back["model_version"] is None, back
        assert current(tmp_path / "state" / "dev-0" / "bundles") is None
        np.save(tmp_path / "x.npy", task_data(5, 7)[0])
        state0 = str(tmp_path / "state" / "dev-0")
        q = run_cli("-m", "device_agent.cli", "predict", "--state-dir", state0,
                    "--input", str(tmp_path / "x.npy"))  # fmt: skip
        assert q.returncode == 0 and q.stdout.startswith("model r2:"), (q.stdout, q.stderr)

        p = run_cli(*publish, str(files["good"]))
        assert p.returncode == 0 and "PROMOTED good-v1" in p.stdout, (p.stdout, p.stderr)
        (rep,) = reports(p.stdout)
        assert rep["accuracy"] >= rep["baseline_accuracy"] - 0.01, rep
        for dev in agents:  # the fleet (dev-1 is no canary) runs the promoted bundle
            root = tmp_path / "state" / dev / "bundles"
            wait_until(lambda r=root: (c := current(r)) is not None and
                  c.manifest.model_version == "good-v1", 30, f"{dev} on good-v1")  # fmt: skip
    finally:
        svc.stop()
        for a in agents.values():
            a.stop()
        for th in threads:
            th.join(timeout=10)
