"""Shared pieces of the issue-14 roll-out and run tests: the user's model file, its data,
bundles exported from it, agent processes and a presence reader.

The model is defined in a file the test writes (``my_models.py`` with ``make_net``), never
a built-in: the path a user takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

USER_MODELS = '''
import torch


def make_net(features: int = 10):
    """The user's classifier: features -> 2 classes."""
    return torch.nn.Sequential(
        torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )
'''


def user_models(directory: Path) -> Any:
    """Write my_models.py into ``directory`` and import it (as a user's own file)."""
    path = directory / "my_models.py"
    path.write_text(USER_MODELS)
    spec = importlib.util.spec_from_file_location(f"my_models_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_user_net(d: Path, features: int = 10) -> Any:
    """The user's ``make_net`` (a my_models.py written into ``d``), exported with the Python
    API: a FederatedModel."""
    import torch

    from edgefed.coordinator.model import build_federated_model

    torch.manual_seed(0)
    net = user_models(d).make_net(features=features)
    x, y = task_data(8, 0, features=features)
    return build_federated_model(net, (torch.from_numpy(x), torch.from_numpy(y)))


def task_data(n: int, seed: int, features: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic two-class data (nothing downloads): the label is the sign of x0 + x1."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, features)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def write_device_data(path: Path, seed: int, n: int = 60, n_val: int = 200) -> Path:
    x, y = task_data(n, seed)
    xv, yv = task_data(n_val, seed + 1000)
    np.savez(path, x=x, y=y, x_val=xv, y_val=yv)
    return path


def train(net: Any, steps: int = 300, seed: int = 0) -> Any:
    """A few hundred SGD steps: the user model learns the task (> 90 % accuracy)."""
    import torch

    torch.manual_seed(seed)
    x, y = task_data(2000, 4242)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for i in range(steps):
        sl = slice((i * 64) % 1936, (i * 64) % 1936 + 64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt[sl]), yt[sl]).backward()
        opt.step()
    return net.eval()


def shuffled(net: Any, seed: int = 0) -> Any:
    """The same architecture with every weight tensor's entries permuted: a bad model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            flat = p.detach().flatten()
            p.copy_(flat[torch.randperm(flat.numel(), generator=g)].view_as(p))
    return net


def make_bundle(net: Any, version: str, signing_key: Any, features: int = 10) -> bytes:
    """Export ``net`` with edgefed's exporter (edgefed.export.measure.export_onnx) and sign
    it into a bundle whose input signature is float32[batch, features]."""
    import torch

    from edgefed.bundle.builder import build_bundle
    from edgefed.bundle.format import Manifest, TensorSpec
    from edgefed.export.measure import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx

    class Named(torch.nn.Module):
        """export_onnx names the batch dimension of an argument called ``x``; nn.Sequential's
        is ``input`` (fixed in the exporter by issue 14 item 3, in parallel)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(x)

    onnx_bytes = export_onnx(Named(net), torch.zeros(4, features))
    manifest = Manifest(
        model_version=version,
        inputs=[TensorSpec(INPUT_NAME, ["batch", features], "float32")],
        outputs=[TensorSpec(OUTPUT_NAME, ["batch", 2], "float32")],
        opset=OPSET,
        labels=["0", "1"],
    )
    return build_bundle(onnx_bytes, manifest, signing_key=signing_key)


def toml_table(table: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())


def start_agent(
    root: Path, device: str, data: Path, transport: dict[str, Any], **agent: Any
) -> subprocess.Popen[bytes]:
    """``python -m device_agent.cli`` with its TOML (``agent``: extra [agent] keys)."""
    conf = root / f"{device}.toml"
    keys = {"device_id": device, "data": str(data), "state_dir": str(root / "state" / device)}
    keys.update(agent)
    conf.write_text(f"[agent]\n{toml_table(keys)}\n[transport]\n{toml_table(transport)}\n")
    log = open(root / f"{device}.log", "ab")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "--config", str(conf)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    log.close()
    return p


class Presence:
    """Reads the fleet's retained presence with edgefed's own client (any account allowed
    to read ``presence/+``) and waits for conditions on it."""

    def __init__(self, transport: Any) -> None:
        from edgefed.transport import Topics
        from edgefed.transport.client import MqttClient

        self.topics = Topics(transport.fleet, transport.topic_prefix)
        self.client = MqttClient(
            transport, f"presence-watch-{os.getpid()}-{id(self)}",
            subscriptions=[self.topics.all_presence],
        )  # fmt: skip
        self.client.start(timeout=30)
        self.last: dict[str, dict[str, Any]] = {}

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not pred(self.last):
            if time.monotonic() > deadline:
                raise TimeoutError(f"presence: {what} not seen in {timeout}s: {self.last}")
            m = self.client.get(timeout=0.2)
            if m is not None and m.payload:
                msg = json.loads(m.payload)
                self.last[msg["device_id"]] = msg
        return self.last

    def wait_online(self, devices: list[str], timeout: float = 60) -> None:
        self.wait(
            lambda last: all(last.get(d, {}).get("status") == "online" for d in devices),
            timeout, f"{devices} online",
        )  # fmt: skip

    def wait_bundle(self, device: str, version: str | None, timeout: float = 60) -> None:
        self.wait(
            lambda last: last.get(device, {}).get("bundle_version", "?") == version,
            timeout, f"{device} running bundle {version}",
        )  # fmt: skip

    def close(self) -> None:
        self.client.stop()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def reports(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
