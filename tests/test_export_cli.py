"""`edgefed export` end to end through the real CLI: federated-style state_dict in,
signed bundle out; a forced stage that breaks the budget exits 2 with the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefed.bundle import verify_bundle, write_keypair
from edgefed.export.distill import train_supervised
from edgefed.zoo.data import noisy_digits
from edgefed.zoo.models import DigitsCNN

pytestmark = pytest.mark.system  # the export pipeline end to end in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgefed", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_export_cli(tmp_path: Path):
    torch.set_num_threads(1)
    d = noisy_digits(train_per_digit=1, test_per_digit=1, size=16, noise=0.1, seed=2)
    np.savez(
        tmp_path / "data.npz",
        x_train=d.x_train,
        y_train=d.y_train,
        x_test=d.x_test,
        y_test=d.y_test,
    )
    torch.manual_seed(0)
    teacher = DigitsCNN(width=0.25, image_size=16)
    train_supervised(teacher, d.x_train, d.y_train, epochs=3, lr=5e-3, batch_size=64)
    torch.save(teacher.state_dict(), tmp_path / "global.pt")  # what the coordinator saves
    pub = write_keypair(tmp_path / "k")
    common = [
        "--data", "data.npz", "--teacher-state", "global.pt", "--teacher-width", "0.25",
        "--prune", "0", "--quantize", "none", "--threads", "1",
    ]  # fmt: skip
    r = _cli(
        "export", "-o", "m.efb", "--key", "k", "--model-version", "g7", "--budget", "100",
        "--distill-epochs", "1", "--json", "t.json", *common, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| teacher fp32 |" in r.stdout and "shipping: distilled w0.5 fp32" in r.stdout
    m = verify_bundle(tmp_path / "m.efb", pub)
    assert m.model_version == "g7" and m.metrics["chosen"] == "distilled w0.5 fp32"
    assert json.loads((tmp_path / "t.json").read_text())["stages"][0]["name"] == "teacher fp32"

    r = _cli(
        "export", "-o", "n.efb", "--budget", "0", "--distill-epochs", "0",
        "--stage", "distilled w0.5 fp32", *common, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "REFUSED: stage 'distilled w0.5 fp32' refused: drop" in r.stderr
    assert "| distilled w0.5 fp32 |" in r.stdout and not (tmp_path / "n.efb").exists()
