"""Dependencies point one way: the device side never imports torch (or other coordinator
extras), and torch-free code follows core <- codec <- protocol/transport <- agent/coordinator.

The rules are declared per package in ``edgefed/_layering.py``; this test discovers every
module of ``edgefed`` and ``device_agent`` (so a new package is checked without touching
it). The import check runs in a fresh interpreter where importing the coordinator extras
raises, so a stray top-level ``import torch`` anywhere in the torch-free closure fails; the
direction check reads every import statement (function-level ones too) from the source.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import device_agent
import edgefed
from edgefed import _layering as L

PACKAGES = (edgefed, device_agent)

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


def module_files() -> dict[str, Path]:
    """Every module of the installed packages, discovered from their directories."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root.parent).with_suffix("").parts
            name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
            out[name] = f
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """edgefed / device_agent modules that ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from pkg import sub` names the submodule sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("edgefed", "device_agent"):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                found.add(t)
    return found


def torch_free_modules() -> list[str]:
    return [m for m in module_files() if not L.coordinator_side(m)]


def test_discovery_sees_every_package() -> None:
    mods = set(module_files())
    assert {"edgefed", "device_agent", "edgefed.codec.wire", "edgefed.atomic"} <= mods
    free = set(torch_free_modules())
    assert "edgefed.train_export" not in free and "edgefed.codec" in free
    assert "device_agent.agent" in free


def test_device_side_imports_without_coordinator_extras() -> None:
    mods = torch_free_modules()
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(L.EXTRA_DISTS), json.dumps(mods)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(edgefed.__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(mods)}"


def test_every_torch_free_module_has_a_layer() -> None:
    undeclared = [m for m in torch_free_modules() if L.layer(m) is None]
    assert not undeclared, f"declare the layer of {undeclared} in edgefed/_layering.py"


def test_imports_follow_the_edge_first_direction() -> None:
    files = module_files()
    known = set(files)
    seams = set(L.LAZY_SEAMS)
    upward, into_coordinator = [], []
    for name, path in files.items():
        if L.coordinator_side(name):
            continue
        mine = L.layer(name)
        for t in imported_modules(name, path, known):
            seam = any(
                (name == a or name.startswith(a + ".")) and (t == b or t.startswith(b + "."))
                for a, b in seams
            )
            if seam:
                continue
            if L.coordinator_side(t):
                into_coordinator.append(f"{name} -> {t}")
            theirs = L.layer(t)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} ({L.LAYERS[mine][0]}) -> {t} ({L.LAYERS[theirs][0]})")
    assert not into_coordinator, into_coordinator
    assert not upward, upward


def test_direction_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a codec module importing the transport is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edgefed.transport import topics\n")
    known = set(module_files())
    got = imported_modules("edgefed.codec.bad", bad, known)
    assert got == {"edgefed.transport.topics"}
    assert L.layer("edgefed.transport.topics") > L.layer("edgefed.codec.bad")  # type: ignore[operator]
    assert L.layer("edgefed.protocol.topics") == L.layer("edgefed.transport")


def test_blocker_really_blocks_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(["torch"]), json.dumps(["torch"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "forbidden import on the device side: torch" in proc.stderr
