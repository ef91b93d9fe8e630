"""Issue 14, item 1 (device side): each agent checks its data file against the data contract
the coordinator announces (the task graph's manifest ``data_contract``) before it trains.

A device whose file holds 12 features for a model of 10 refuses the task with one line naming
the file, the expected and the actual shape; the coordinator counts it as a "device error"
with that reason (not "deadline") and closes the round without waiting for it; restarted,
the agent says the same at start-up from the contract it stored. Real processes: ``edgefed
coordinator`` with the user's model (a ``my_models.py`` the test writes) and two
``edgefed-agent`` processes on a real mosquitto.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from harness.processes import stop_processes
from harness.wait import wait_until
from rollout_helpers import ENV, USER_MODELS, start_agent, task_data

from device_agent.contract import contract_mismatch

CONTRACT = {"x_shape": ["batch", 10], "x_dtype": "float32", "y_dtype": "int64", "num_classes": 2}


def test_contract_mismatches_are_one_line_naming_file_expected_and_found() -> None:
    x, y = task_data(20, 0)
    assert contract_mismatch(CONTRACT, x, y, "d.npz") is None
    assert contract_mismatch(CONTRACT, x.astype(np.float64), y, "d.npz") is None  # cast
    assert contract_mismatch(None, x[:, :3], y, "d.npz") is None  # no contract announced
    cases = {
        "wide": (np.zeros((20, 12), np.float32), y, "x is float32[20, 12]"),
        "image": (np.zeros((20, 1, 10), np.float32), y, "x is float32[20, 1, 10]"),
        "ints": (x.astype(np.int64), y, "x is int64[20, 10]"),
        "labels": (x, y + 2, "y holds class 3, the federated model has classes 0..1"),
        "float labels": (x, y.astype(np.float32), "y is float32, expected int64"),
    }
    for name, (cx, cy, found) in cases.items():
        msg = contract_mismatch(CONTRACT, cx, cy, "/data/d.npz")
        assert msg is not None and "\n" not in msg, name
        assert msg.startswith("data contract: /data/d.npz: ") and found in msg, (name, msg)
        if name in ("wide", "image", "ints"):
            assert "expects float32['batch', 10] (per sample [10])" in msg, (name, msg)


def test_agent_refuses_data_that_break_the_contract_and_the_coordinator_says_why(
    mosquitto: Any, tmp_path: Path
) -> None:
    (tmp_path / "my_models.py").write_text(USER_MODELS)
    xe, ye = task_data(300, 99)
    np.savez(tmp_path / "eval.npz", x=xe, y=ye)
    x, y = task_data(80, 0)
    np.savez(tmp_path / "good.npz", x=x, y=y)
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((80, 12), np.float32), y=y)
    t = {"url": mosquitto.url, "fleet": "dc", "backoff_min": 0.2, "keepalive": 5}
    (tmp_path / "coordinator.toml").write_text(
        "[coordinator]\nrounds = 2\nmin_devices = 2\nfraction = 1.0\nround_timeout = 120\n"
        'wait_timeout = 60\ncheckpoint = "state/c.ckpt.npz"\nmetrics = "state/m.jsonl"\n'
        '[model]\nfactory = "my_models:make_net"\ninput_shape = [10]\n'
        '[evaluation]\ndataset = "eval.npz"\n'
        f'[transport]\nurl = "{mosquitto.url}"\nfleet = "dc"\nbackoff_min = 0.2\n'
    )
    procs = [
        start_agent(tmp_path, "dev-0", tmp_path / "good.npz", t),
        start_agent(tmp_path, "dev-1", wide, t),
    ]
    try:
        p = subprocess.run(
            [sys.executable, "-m", "edgefed", "coordinator", "--config", "coordinator.toml"],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
        rounds = [json.loads(s) for s in (tmp_path / "state/m.jsonl").read_text().splitlines()]
        assert [r["participants"] for r in rounds] == [1, 1], rounds
        for r in rounds:  # the reason, never "deadline": the round did not wait for dev-1
            assert r["dropped"] == {"device error": 1}, r
            (drop,) = r["drop_log"]
            assert drop["device"] == "dev-1", drop
            assert f"data contract: {wide}: x is float32[80, 12]" in drop["reason"], drop
            assert "expects float32['batch', 10]" in drop["reason"], drop
        assert "data contract" in p.stderr, p.stderr[-3000:]  # the coordinator logged it
        log1 = (tmp_path / "dev-1.log").read_text()
        assert f"data contract: {wide}" in log1 and "training on" not in log1, log1[-3000:]

        # restarted, dev-1 checks its data at start-up against the contract it stored
        stop_processes(procs[1:])
        procs[1] = start_agent(tmp_path, "dev-1", wide, t)
        start_line = f"edgefed-agent: data contract: {wide}: x is float32[80, 12]"
        wait_until(lambda: (tmp_path / "dev-1.log").read_text().count(start_line) == 1, 60)
        assert procs[1].poll() is None  # it keeps serving (and refusing with the reason)
    finally:
        stop_processes(procs)
