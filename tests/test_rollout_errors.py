"""Issue 14, item 7 (bundle/device side) and the canary decision rule: errors a user can act
on, in one line, and why a canary is (not) promoted."""

from __future__ import annotations

import numpy as np
from rollout_helpers import run_cli, write_device_data

from edgefed.bundle.rollout import RolloutReport, decide


def test_keygen_creates_a_missing_folder(tmp_path) -> None:
    p = run_cli("-m", "edgefed", "keygen", str(tmp_path / "keys" / "new" / "fleet.key"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "keys" / "new" / "fleet.key.pub").is_file()


def test_missing_coordinator_key_file_is_named(tmp_path) -> None:
    data = write_device_data(tmp_path / "d.npz", seed=0)
    missing = tmp_path / "keys" / "coordinator.key.pub"
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[agent]\ndevice_id = "dev-0"\ndata = "{data}"\nstate_dir = "{tmp_path / "s"}"\n'
        f'coordinator_key = "{missing}"\n[transport]\nurl = "mqtt://127.0.0.1:1"\n'
    )
    p = run_cli("-m", "device_agent.cli", "--config", str(conf), timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    # one line naming the config file, the key and the resolved path that is missing
    assert len(lines) == 1 and str(conf) in lines[0] and "coordinator_key" in lines[0], lines
    assert str(missing) in lines[0] and "expected an existing file" in lines[0], lines
    assert "not hex" not in p.stderr


def _rep(dev: str, acc: float, base: float, lat: float = 1.0, base_lat: float = 1.0, n=100):
    return RolloutReport(dev, "installed", "v2", "v2", latency_ms_b1=lat, mode="canary",
                         eval_samples=n, accuracy=acc, baseline_version="v1",
                         baseline_accuracy=base, baseline_latency_ms=base_lat)  # fmt: skip


def test_canary_decision_weights_devices_by_samples_and_checks_latency() -> None:
    devs = {"a", "b"}
    # a: -3 pp on 100 samples, b: +1 pp on 300: weighted 0 pp -> promoted
    ok = decide({"a": _rep("a", 0.87, 0.90), "b": _rep("b", 0.91, 0.90, n=300)}, devs, "v2")
    assert ok.promote and np.isclose(ok.accuracy, ok.baseline_accuracy), ok
    # the same drops with the weights swapped: -2 pp > the 1 pp budget -> rolled back
    bad = decide({"a": _rep("a", 0.87, 0.90, n=300), "b": _rep("b", 0.91, 0.90)}, devs, "v2")
    assert not bad.promote and "2.00 pp below" in bad.reason, bad
    assert decide({"a": _rep("a", 0.87, 0.90, n=300), "b": _rep("b", 0.91, 0.90)}, devs, "v2",
                  accuracy_budget_pp=2.5).promote  # fmt: skip
    slow = decide({d: _rep(d, 0.9, 0.9, lat=3.0) for d in devs}, devs, "v2")
    assert not slow.promote and "3.00x" in slow.reason, slow
    missing = decide({"a": _rep("a", 0.9, 0.9)}, devs, "v2")
    assert not missing.promote and "['b']" in missing.reason
    refused = RolloutReport("b", "refused", "v1", "v2", "input mismatch: ...", mode="canary")
    r = decide({"a": _rep("a", 0.9, 0.9), "b": refused}, devs, "v2")
    assert not r.promote and "input mismatch" in r.reason
