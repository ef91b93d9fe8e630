"""The device side trains where `import torch` fails: a fresh venv with the base install only.

Step graphs are exported here (main env, with torch); a fresh venv (no system site-packages)
gets numpy + onnxruntime installed by pip (from the machine's cache/local wheels) and a copy
of device_agent on PYTHONPATH. The trainer needs
nothing from edgefed._core. Training there must match a torch reference run.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.dataset import batch_order
from edgefed.train_export import SGD, export_training_step
from edgefed.zoo.models import digits_mlp

pytestmark = pytest.mark.system  # builds a venv without torch

ROOT = Path(__file__).resolve().parents[1]
# What the trainer imports. --no-deps: onnxruntime's own requirements (sympy, protobuf, ...)
# are not needed to run a session, and skipping them keeps this test near a minute.
AGENT_DEPS = ["numpy", "onnxruntime"]

CHILD = r"""
import json, sys
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch is importable in the agent venv")
import numpy as np
from device_agent.trainer import StepTrainer
d = sys.argv[1]
tr = StepTrainer(
    d + "/step.onnx", d + "/manifest.json", threads=1, inference_onnx=d + "/inference.onnx"
)
tr.set_params(dict(np.load(d + "/params.npz")))
stats = tr.train_epochs(d + "/data.npz", epochs=3, batch_size=32, lr=0.1, seed=7)
np.savez(d + "/trained.npz", **tr.params)
z = np.load(d + "/data.npz")
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "edgefed"))
acc = tr.accuracy(z["x"], z["y"])
print(json.dumps({"epoch_loss": stats.epoch_loss, "acc": acc, "modules": mods}))
"""


@pytest.mark.slow
def test_train_in_venv_without_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = digits_mlp()
    g = export_training_step(
        model, (torch.randn(8, 64), torch.randint(0, 10, (8,))), optimizer=SGD(momentum=0.9)
    )
    work = tmp_path / "graphs"
    g.save(work)
    init = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(work / "params.npz", **init)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 64)).astype(np.float32) * 2
    y = rng.integers(0, 10, 300)
    x = (centers[y] + rng.standard_normal((300, 64))).astype(np.float32)
    np.savez(work / "data.npz", x=x, y=y)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(  # the host's pip installs INTO the venv (saves bootstrapping pip there)
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            site,
            *AGENT_DEPS,
        ],
        check=True,
        timeout=300,
    )
    agent = tmp_path / "agent_src"
    shutil.copytree(ROOT / "device_agent", agent / "device_agent")
    env = {"PYTHONPATH": str(agent), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run([str(py), "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0 and b"No module named 'torch'" in probe.stderr
    out = subprocess.run(
        [str(py), "-c", CHILD, str(work)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["modules"] == []
    assert res["epoch_loss"][-1] < 0.5 * res["epoch_loss"][0]
    assert res["acc"] > 0.9

    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _, idx in batch_order(300, 3, 32, 7):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            ref(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])
        )
        loss.backward()
        opt.step()
    trained = np.load(work / "trained.npz")
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(trained[k], v.numpy(), rtol=1e-5, atol=1e-5)
