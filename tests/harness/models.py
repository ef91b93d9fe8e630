"""The demo model of the tests and its synthetic data, exported ONCE per session.

Why: exporting a step graph runs the verification gate (torch vs onnxruntime), seconds per
export; the same 10-10-2 MLP used to be exported again in conftest and in three test
modules. ``build_model_dir`` writes it once into a session temp dir (FederatedModel.save
layout) and every user loads it from there, torch-free, in milliseconds. The model is
defined here, outside the package (house rule: system tests use a user's own model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 standard-normal features; label = x0 + x1 > 0 (learnable by the MLP)."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def build_model_dir(d: Path) -> Path:
    """Write into ``d``:

    - ``model/``: the 10-10-2 MLP's full step graph (what the fleets and agents train);
    - ``model-head/``: the same export plus a head-only graph (last layer trainable);
    - ``eval.npz``: a held-out set; ``data-<i>.npz`` (i < 32): per-device data;
    - ``data-slow.npz``: 150,000 rows, seconds of local training (a device busy mid-round).
    """
    import torch

    from edgefed.coordinator.model import FederatedModel, build_federated_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    x, y = tiny_data(8, 0)
    fm = build_federated_model(net, (torch.from_numpy(x), torch.from_numpy(y)), head="last")
    FederatedModel(fm.initial, {"full": fm.graphs["full"]}).save(d / "model")
    fm.save(d / "model-head")
    x, y = tiny_data(300, 999)
    np.savez(d / "eval.npz", x=x, y=y)
    for i in range(32):
        x, y = tiny_data(40, i)
        np.savez(d / f"data-{i}.npz", x=x, y=y)
    x, y = tiny_data(150_000, 77)
    np.savez(d / "data-slow.npz", x=x, y=y)
    return d


EMULATED_STEP = "[agent]\nemulate_step_s = 0.001\n"


def slow_and_fast(fleet: object, model_dir: Path, tmp: Path, slow: str = "dev-2") -> str:
    """Give ``slow`` the 150,000-row set and every other device of a harness ``Fleet``
    15,000 rows, so an asynchronous run outlasts one slow task; returns the slow device.

    Rows alone did not make the times: the tiny model trains 150,000 rows in ~0.7 s on a
    quiet machine, under the ~1 s the fast devices' updates took to close a buffer, so all
    three landed in version 1 and nothing was outstanding (a CI failure). Every device
    also gets ``[agent] emulate_step_s`` (each step lasts >= 1 ms, the CPU idle): a slow
    task >= 4.7 s and a fast one >= 0.47 s on any machine, the 10x the tests rely on (the
    slow task is out when version 1 closes and lands before the run's last version)."""
    for d in fleet.devices:  # type: ignore[attr-defined]
        if d == slow:
            fleet.data[d] = model_dir / "data-slow.npz"  # type: ignore[attr-defined]
        else:
            x, y = tiny_data(15_000, int(d.split("-")[1]))
            fleet.data[d] = tmp / f"data-mid-{d}.npz"  # type: ignore[attr-defined]
            np.savez(fleet.data[d], x=x, y=y)  # type: ignore[attr-defined]
        conf = fleet.agent_config(d)  # type: ignore[attr-defined]
        conf.write_text(conf.read_text().replace("[agent]\n", EMULATED_STEP, 1))
    return slow
