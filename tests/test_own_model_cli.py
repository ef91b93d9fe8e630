"""Issue 14, "Done when": the user's own model through the whole life, by the CLI only.

A model defined in a user file (``my_models.py`` in a temp folder, not a built-in) is
federated by ``edgefed coordinator`` with 3 ``edgefed-agent`` processes on a real mosquitto
secured by ``edgefed broker-config`` (TLS, one password per account, ACLs), exported by
``edgefed export --run`` (distil + prune + int8, signed), published to the canary group with
``edgefed bundle publish --promote`` and promoted, and ``edgefed-agent predict`` runs it on
every device. The second test injects a bad bundle (a user's student that ignores its input:
an accuracy regression), which the canaries roll back automatically.

Python is used only to write files (model source, data, configs) and read outputs; every
action is a subprocess running an edgefed command. The federation and the export run once
(module-scoped fixture) and both tests use them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness.broker import Mosquitto
from harness.net import free_port
from harness.processes import stop_processes
from harness.wait import wait_until

pytestmark = pytest.mark.system

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEVICES = ["dev-0", "dev-1", "dev-2"]
CANARIES = ["dev-0", "dev-1"]
FEATURES = 10

MY_MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """The user's classifier: 10 features -> 2 classes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 2)

    def forward(self, features):
        return self.head(self.body(features))


def make_net():
    return Net()


class Blind(nn.Module):
    """A student that ignores its input: it can only learn the class prior."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(x * 0.0)


def make_blind():
    return Blind()
'''


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic two-class data (nothing downloads): the label is the sign of x0 + x1."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, FEATURES)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def edgefed(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """One edgefed command (``edgefed`` or ``edgefed-agent`` as ``python -m``)."""
    module = "device_agent.cli" if args[0] == "agent" else "edgefed"
    argv = [sys.executable, "-m", module, *(args[1:] if args[0] == "agent" else args)]
    return subprocess.run(
        argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip


def reports(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@dataclass
class Life:
    root: Path
    broker: Mosquitto
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    coordinator_log: str = ""
    export: subprocess.CompletedProcess[str] | None = None

    def publish(self, bundle: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return edgefed(
            "bundle", "publish", bundle, "--config", "broker/accounts/publisher.toml",
            "--key", "keys/coordinator.key.pub", "--timeout", "90", *extra, cwd=self.root,
        )  # fmt: skip

    def predict(self, device: str) -> subprocess.CompletedProcess[str]:
        return edgefed(
            "agent", "predict", "--config", f"{device}.toml", "--input", "test.npz",
            cwd=self.root, timeout=60,
        )  # fmt: skip

    def agent_logs(self) -> str:
        return "".join((self.root / f"{d}.log").read_text(errors="replace") for d in DEVICES)


def _fail(what: str, p: subprocess.CompletedProcess[str]) -> str:
    return f"{what} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Life]:
    root = tmp_path_factory.mktemp("own-model")
    # the user's files: model, evaluation set, device data (with a held-out split), test input
    (root / "my_models.py").write_text(MY_MODELS)
    xe, ye = _data(600, 99)
    np.savez(root / "eval.npz", x=xe, y=ye)
    for i, d in enumerate(DEVICES):
        x, y = _data(300, i)
        xv, yv = _data(200, 100 + i)
        np.savez(root / f"{d}.npz", x=x, y=y, x_val=xv, y_val=yv)
    xt, yt = _data(100, 555)
    np.savez(root / "test.npz", x=xt)
    np.save(root / "test-labels.npy", yt)

    # 1. the secured broker: `edgefed broker-config`, then mosquitto on its config
    fleet = 'fleet = "farm"\n' + "".join(
        f'[[devices]]\nid = "{d}"\ngroups = {json.dumps(["canary"] if d in CANARIES else [])}\n'
        for d in DEVICES
    )
    (root / "fleet.toml").write_text(fleet)
    port = free_port()
    extra = ["--broker-user", "root"] if os.geteuid() == 0 else []
    p = edgefed(
        "broker-config", "--out", "broker", "--fleet-file", "fleet.toml", "--host", "127.0.0.1",
        "--bind", "127.0.0.1", "--tls-port", str(port), "--no-persistence", *extra, cwd=root,
    )  # fmt: skip
    assert p.returncode == 0, _fail("broker-config", p)
    broker = Mosquitto(port, root / "broker" / "mosquitto.conf", root / "mosquitto.stderr")
    broker.start()
    life = Life(root, broker)
    try:
        # 2. the signing key (tasks and bundles), configs from the generated accounts
        p = edgefed("keygen", "keys/coordinator.key", cwd=root)
        assert p.returncode == 0, _fail("keygen", p)
        account = {
            a: (root / "broker" / "accounts" / f"{a}.toml").read_text()
            for a in ["coordinator", *DEVICES]
        }
        (root / "coordinator.toml").write_text(
            "[coordinator]\nrounds = 4\nmin_devices = 3\nfraction = 1.0\nround_timeout = 60\n"
            'wait_timeout = 120\ncheckpoint = "state/coordinator.ckpt.npz"\n'
            'metrics = "state/metrics.jsonl"\n'
            '[model]\nfactory = "my_models:make_net"\ninput_shape = [10]\n'
            'input_dtype = "float32"\nloss = "cross_entropy"\nnum_classes = 2\n'
            '[training]\nlocal_epochs = 2\nlr = 0.1\n[compression]\nuplink = "int8"\n'
            'downlink = "int8"\n[evaluation]\ndataset = "eval.npz"\n'
            '[security]\nsigning_key = "keys/coordinator.key"\n' + account["coordinator"]
        )
        for d in DEVICES:
            group = 'group = "canary"\n' if d in CANARIES else ""
            (root / f"{d}.toml").write_text(
                f'[agent]\ndevice_id = "{d}"\ndata = "{d}.npz"\nstate_dir = "state-{d}"\n'
                f'coordinator_key = "keys/coordinator.key.pub"\n'
                f'bundle_key = "keys/coordinator.key.pub"\n{group}'
                + account[d]
                + "backoff_min = 0.2\nkeepalive = 5\n"
            )

        # 3. federate: `edgefed-agent` x 3 + `edgefed coordinator` (until its last round)
        for d in DEVICES:
            with open(root / f"{d}.log", "ab") as log:
                life.agents.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "device_agent.cli", "--config", f"{d}.toml"],
                        cwd=root,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=ENV,
                    )
                )
        p = edgefed("coordinator", "--config", "coordinator.toml", cwd=root, timeout=400)
        life.coordinator_log = p.stdout + p.stderr
        assert p.returncode == 0, _fail("coordinator", p) + life.agent_logs()[-3000:]

        # 4. export the federated model: distil + prune + int8, signed
        life.export = edgefed(
            "export", "--run", "coordinator.toml", "-o", "model.efb",
            "--key", "keys/coordinator.key", "--json", "export.json", "--threads", "1",
            "--model-version", "user-v1",
            "--distill-epochs", "3", "--finetune-epochs", "3", cwd=root, timeout=600,
        )  # fmt: skip
        assert life.export.returncode == 0, _fail("export", life.export)
        yield life
    finally:
        stop_processes(life.agents)
        broker.stop()


def test_user_model_federated_exported_canaried_promoted_and_predicted(life: Life) -> None:
    root = life.root
    # the coordinator federated the user's model with all three devices in every round
    metrics = (root / "state" / "metrics.jsonl").read_text()
    rounds = [json.loads(line) for line in metrics.splitlines()]
    assert [r["participants"] for r in rounds] == [3, 3, 3, 3], rounds
    assert all(r["dropped"] == {} for r in rounds), rounds
    final_acc = rounds[-1]["accuracy"]
    assert final_acc > 0.85, rounds
    assert "federated model (round 4):" in life.coordinator_log, life.coordinator_log[-2000:]
    model_json = json.loads((root / "state" / "federated-model" / "model.json").read_text())
    assert model_json["model"]["factory"].endswith("my_models.py:make_net"), model_json
    assert "UNSIGNED" not in life.agent_logs()  # the downlink was signed

    # export: the candidates table; the shipped bundle is smaller than the federated fp32
    assert life.export is not None
    table = json.loads((root / "export.json").read_text())
    names = [s["name"] for s in table["stages"]]
    assert names[0] == "teacher fp32" and any("int8" in n for n in names), names
    p = edgefed("bundle", "inspect", "model.efb", cwd=root)
    assert p.returncode == 0, _fail("bundle inspect", p)
    assert "user-v1" in p.stdout and "float32" in p.stdout, p.stdout

    # canary: dev-0 and dev-1 evaluate the bundle against the federated model r4, promoted
    p = life.publish("model.efb", "--group", "canary", "--promote", "--wait", *CANARIES)
    assert p.returncode == 0, _fail("publish --promote", p)
    assert "PROMOTED user-v1" in p.stdout, p.stdout
    reps = reports(p.stdout)
    assert sorted(r["device"] for r in reps) == CANARIES, p.stdout
    for r in reps:
        assert r["status"] == "installed" and r["mode"] == "canary", r
        assert r["baseline_version"] == "r4" and r["eval_samples"] == 200, r
        assert r["accuracy"] >= r["baseline_accuracy"] - 0.01, r
        assert r["latency_ms_b1"] > 0, r

    # predict on every device (dev-2 got it by the promotion): the bundle (not the federated
    # model r4, the fallback) answers, and correctly
    labels = np.load(root / "test-labels.npy")
    for d in DEVICES:
        wait_until(lambda d=d: life.predict(d).stdout.startswith("model user-v1:"), 60, d)
        q = life.predict(d)
        assert q.returncode == 0, _fail(f"predict on {d}", q)
        classes = q.stdout.strip().split(":", 1)[1]
        got = np.array([int(c) for c in classes.split()])
        assert got.shape == labels.shape and (got == labels).mean() > 0.85, (d, q.stdout)
    assert all(a.poll() is None for a in life.agents)


def test_bad_bundle_is_rolled_back_by_the_canaries(life: Life) -> None:
    root = life.root
    before = {d: life.predict(d).stdout.split(":", 1)[0] for d in DEVICES}
    assert all(v.startswith("model ") for v in before.values()), before
    # a user's student that ignores its input: distilled, exported and signed like any other
    p = edgefed(
        "export", "--run", "coordinator.toml", "-o", "bad.efb", "--student",
        "my_models.py:make_blind", "--prune", "0", "--quantize", "none", "--budget", "100",
        "--key", "keys/coordinator.key", "--model-version", "bad-v1", "--threads", "1",
        "--json", "bad.json", cwd=root, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, _fail("export of the blind student", p)
    stages = json.loads((root / "bad.json").read_text())["stages"]
    assert stages[-1]["accuracy"] < stages[0]["accuracy"] - 0.2, stages  # a real regression

    p = life.publish("bad.efb", "--group", "canary", "--promote", "--wait", *CANARIES)
    assert p.returncode == 1, _fail("publish of the bad bundle", p)
    assert "ROLLED BACK bad-v1" in p.stdout and "pp below" in p.stdout, p.stdout
    reps = reports(p.stdout)
    canary, back = reps[: len(CANARIES)], reps[len(CANARIES) :]
    assert all(r["accuracy"] < r["baseline_accuracy"] - 0.01 for r in canary), canary
    assert sorted(r["device"] for r in back) == CANARIES, p.stdout
    assert all(r["status"] == "rolled_back" for r in back), back
    # every device runs what it ran before: the canaries were rolled back, dev-2 never saw it
    after = {d: life.predict(d).stdout.split(":", 1)[0] for d in DEVICES}
    assert after == before, (before, after)
    assert all(a.poll() is None for a in life.agents)
