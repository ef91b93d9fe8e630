"""A user's config mistake through the real CLIs (``edgefed coordinator``, ``edgefed-agent``,
``edgefed aggregator``, each a subprocess): ONE line on stderr naming the file, the key,
what was expected and what was found, a non-zero exit, never a traceback (issue 14 item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def run_cli(*args: str, cwd: Path) -> str:
    """Run a CLI to its (early) exit; return its only stderr line."""
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one clear line
    return lines[0]


def coordinator(tmp_path: Path, text: str) -> str:
    conf = tmp_path / "coordinator.toml"
    conf.write_text(text)
    return run_cli("edgefed", "coordinator", "--config", str(conf), cwd=tmp_path)


def agent(tmp_path: Path, text: str, *pre: str) -> str:
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    return run_cli("device_agent.cli", *pre, "--config", str(conf), cwd=tmp_path)


def test_coordinator_rounds_given_as_a_string(tmp_path: Path) -> None:
    line = coordinator(tmp_path, '[coordinator]\nrounds = "3"\n')
    assert line == (
        f"edgefed coordinator: {tmp_path / 'coordinator.toml'}: [coordinator] rounds: "
        'expected an integer, found the string "3"'
    )


def test_coordinator_missing_evaluation_dataset(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    conf = tmp_path / "conf" / "c.toml"
    conf.write_text('[evaluation]\ndataset = "data/eval.npz"\n')
    # run from another folder: the path is relative to the config file, not to the cwd
    line = run_cli("edgefed", "coordinator", "--config", str(conf), cwd=tmp_path)
    assert line == (
        f"edgefed coordinator: {conf}: [evaluation] dataset: expected an existing file, "
        f"found nothing at {tmp_path / 'conf' / 'data' / 'eval.npz'}"
    )


def test_coordinator_evaluation_npz_without_x(tmp_path: Path) -> None:
    np.savez(tmp_path / "eval.npz", features=np.zeros((2, 3)), y=np.zeros(2))
    line = coordinator(tmp_path, '[evaluation]\ndataset = "eval.npz"\n')
    assert line.endswith(
        "[evaluation] dataset: expected an .npz with arrays x and y, found arrays "
        f"['features', 'y'] in {tmp_path / 'eval.npz'}"
    )


def test_coordinator_missing_model_dir(tmp_path: Path) -> None:
    line = coordinator(tmp_path, '[model]\ndir = "exported-model"\n')
    assert line == (
        f"edgefed coordinator: {tmp_path / 'coordinator.toml'}: [model] dir: expected an "
        f"existing directory, found nothing at {tmp_path / 'exported-model'}"
    )


def test_coordinator_missing_signing_key(tmp_path: Path) -> None:
    line = coordinator(tmp_path, '[security]\nsigning_key = "keys/coordinator.key"\n')
    assert line == (
        f"edgefed coordinator: {tmp_path / 'coordinator.toml'}: [security] signing_key: "
        f"expected an existing file, found nothing at {tmp_path / 'keys' / 'coordinator.key'}"
    )


def test_coordinator_unreadable_signing_key(tmp_path: Path) -> None:
    (tmp_path / "c.key").write_text("not a key\n")
    line = coordinator(tmp_path, '[security]\nsigning_key = "c.key"\n')
    assert line == (
        f"edgefed coordinator: [security] signing_key: private key {tmp_path / 'c.key'} "
        "is not hex text"
    )


def test_coordinator_malformed_toml(tmp_path: Path) -> None:
    line = coordinator(tmp_path, "[coordinator\nrounds = 3\n")
    assert line.startswith(
        f"edgefed coordinator: {tmp_path / 'coordinator.toml'}: not valid TOML: "
    )


def test_coordinator_missing_config_file(tmp_path: Path) -> None:
    line = run_cli("edgefed", "coordinator", "--config", str(tmp_path / "no.toml"), cwd=tmp_path)
    assert line == f"edgefed coordinator: {tmp_path / 'no.toml'}: no such file"


def test_agent_malformed_toml_names_the_file(tmp_path: Path) -> None:
    line = agent(tmp_path, '[agent]\ndevice_id = "d1\ndata = "d.npz"\n')
    assert line.startswith(f"edgefed-agent: {tmp_path / 'agent.toml'}: not valid TOML: ")


def test_agent_missing_coordinator_key_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    line = agent(
        tmp_path, '[agent]\ndevice_id = "d1"\ndata = "d.npz"\ncoordinator_key = "keys/c.pub"\n'
    )
    assert line == (
        f"edgefed-agent: {tmp_path / 'agent.toml'}: [agent] coordinator_key: expected an "
        f"existing file, found nothing at {tmp_path / 'keys' / 'c.pub'}"
    )
    assert "hex" not in line


def test_agent_data_without_x(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", features=np.zeros((4, 2), np.float32), y=np.zeros(4))
    line = agent(tmp_path, '[agent]\ndevice_id = "d1"\ndata = "d.npz"\n')
    assert line == (
        f"edgefed-agent: {tmp_path / 'agent.toml'}: [agent] data: expected an .npz with arrays "
        f"x, y, found arrays ['features', 'y'] in {tmp_path / 'd.npz'}"
    )


def test_agent_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"")
    line = agent(tmp_path, '[agent]\ndevice_id = "d1"\ndata = "d.npz"\nthreads = "2"\n')
    assert line == (
        f"edgefed-agent: {tmp_path / 'agent.toml'}: [agent] threads: expected an integer, "
        'found the string "2"'
    )


def test_agent_predict_with_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"")
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\ndevice_id = "d1"\ndata = "d.npz"\n[transport]\nurl = "ftp://x"\n')
    line = run_cli(
        "device_agent.cli", "predict", "--config", str(conf), "--input", "x.npy", cwd=tmp_path
    )
    assert line == (
        f"edgefed-agent predict: {conf}: [transport] url: broker URL 'ftp://x': scheme must be "
        "mqtt:// or mqtts://"
    )


def test_aggregator_unknown_key(tmp_path: Path) -> None:
    conf = tmp_path / "worker.toml"
    conf.write_text('[worker]\nid = "agg-1"\nheartbeat = 1.0\n')
    line = run_cli("edgefed", "aggregator", "--config", str(conf), cwd=tmp_path)
    assert line.startswith(
        f"edgefed aggregator: {conf}: [worker] heartbeat: unknown key (expected one of id, group, "
        "heartbeat_interval"
    )
