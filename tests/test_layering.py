"""Dependencies point one way: the device side never imports torch (or other coordinator extras).

Each check runs in a fresh interpreter where importing the forbidden packages raises, so a
stray top-level `import torch` anywhere in the torch-free closure fails the test.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import device_agent
import edgefed

# Modules allowed to need the [coordinator] extra (torch, onnx, sklearn, amqtt, matplotlib).
COORDINATOR_ONLY = (
    "edgefed.train_export",
    "edgefed.export",
    "edgefed.zoo",
    "edgefed.apps",
    "edgefed.simulation",
    "edgefed.coordinator",
    "edgefed.sharding",
    "edgefed.fleetops",
    "edgefed.privacy",
    "edgefed.transport.broker",
)
DEVICE_FORBIDDEN = [
    "torch",
    "onnx",
    "onnxscript",
    "sklearn",
    "amqtt",
    "matplotlib",
    "torch_pruning",
]

BLOCKER = """
import importlib.abc, json, sys
FORBIDDEN = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"forbidden import on the device side: {name}")
        return None
sys.meta_path.insert(0, Block())
import importlib
for m in json.loads(sys.argv[2]):
    importlib.import_module(m)
print("ok", len(json.loads(sys.argv[2])))
"""


def _modules(package: object) -> list[str]:
    names = [package.__name__]  # type: ignore[attr-defined]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # type: ignore[attr-defined]
        names.append(info.name)
    return names


def device_side_modules() -> list[str]:
    mods = _modules(edgefed) + _modules(device_agent)
    return [m for m in mods if not m.startswith(COORDINATOR_ONLY) and not m.endswith("__main__")]


def test_device_side_imports_without_coordinator_extras() -> None:
    mods = device_side_modules()
    assert "device_agent" in mods and "edgefed" in mods
    env_root = str(Path(edgefed.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(DEVICE_FORBIDDEN), json.dumps(mods)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=env_root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(mods)}"


def test_blocker_really_blocks_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(["torch"]), json.dumps(["torch"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "forbidden import on the device side: torch" in proc.stderr
