"""The whole MobileNet-style training step (zoo 'bench' scale, batch 32) exported by a base
git ref's train_export (default: main) and by this checkout's, trained side by side with
torch eager in ONE process, interleaved rounds (issue 13, branch wgrad13).

Why in one process: on this shared 2-core machine two separate train_zoo.py runs minutes
apart differ by more than the change being measured; interleaving both graphs and torch
round by round, and reading each round's calling-thread CPU time, compares them under the
same load. Each side is exported in its own subprocess: the base by a copy of the installed
edgefed package with ``edgefed/train_export/*.py`` replaced by the base ref's files (the
branch: by this checkout's).
Both sides are timed as a device runs them (StepTrainer, kernel dispatch: the NCHWc
alternative when it passes the one-batch check) and as the default-domain graph alone.
Run: PYTHONPATH=. python benchmarks/conv_backward_step.py [--base main] [--rounds 9]
Writes benchmarks/out/conv_backward_step.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from _util import machine, write_json  # noqa: E402
from train_export_zoo import zoo  # noqa: E402
from train_step import _interleaved_rounds, torch_sgd_step  # noqa: E402

import edgefed  # noqa: E402
from device_agent.trainer import StepTrainer  # noqa: E402

MODEL = "mobilenet"
BATCH = 32
EXPORT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from train_export_zoo import zoo
from edgefed.train_export import export_training_step
e = zoo("bench")[sys.argv[3]]
torch.manual_seed(0)
m = e.build()
x, y = e.data(8, torch.Generator().manual_seed(0))
export_training_step(m, (x, y), **e.kwargs).save(sys.argv[1])
"""


def _package(ref: str | None, into: Path) -> Path:
    """A copy of the installed edgefed (its built core) whose train_export sources are
    ``ref``'s, or this checkout's working tree when ``ref`` is None."""
    pkg = into / "edgefed"
    shutil.copytree(Path(edgefed.__file__).parent, pkg)
    if ref is None:
        for f in (ROOT / "edgefed" / "train_export").glob("*.py"):
            shutil.copy(f, pkg / "train_export" / f.name)
        return into
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{ref}:edgefed/train_export"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in names:
        if name.endswith(".py"):
            src = subprocess.run(
                ["git", "show", f"{ref}:edgefed/train_export/{name}"],
                cwd=ROOT, check=True, capture_output=True,
            ).stdout  # fmt: skip
            (pkg / "train_export" / name).write_bytes(src)
    return into


def _export(pythonpath: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    subprocess.run(
        [sys.executable, "-c", EXPORT, str(out), str(ROOT / "tests"), MODEL],
        env=env, check=True, cwd=out.parent, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="main", help="git ref of the baseline train_export")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    print(machine(), "load", os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        _export(_package(a.base, tmp / "base"), tmp / "base_step")
        _export(_package(None, tmp / "branch"), tmp / "branch_step")
        e = zoo("bench")[MODEL]
        torch.manual_seed(0)
        model = e.build()
        x, y = e.data(BATCH, torch.Generator().manual_seed(1))
        xn, yn = x.numpy(), y.numpy()
        torch.set_num_threads(1)
        fns = {"torch eager": torch_sgd_step(model, x, y)}
        for side in ("base", "branch"):
            d = tmp / f"{side}_step"
            for alternative in (True, False):
                tr = StepTrainer(d / "step.onnx", d / "manifest.json", alternative=alternative)
                tr.set_params({k: v.detach().numpy() for k, v in model.state_dict().items()})
                tr._scalars["lr"][()] = 0.01
                tr._step(xn, yn)  # the first step decides the kernel path
                label = f"{side} {tr.kernel_path if alternative else 'default graph'}"
                fns[label] = lambda tr=tr: tr._step(xn, yn)
        runs = _interleaved_rounds(list(fns.values()), a.steps, a.rounds)
    res = dict(zip(fns, runs, strict=True))
    med = statistics.median
    t_cpu = med(res["torch eager"]["cpu"])
    print(f"{'':28} {'wall ms':>8} {'cpu ms':>8} {'cpu range':>15} {'torch/x cpu':>11}")
    for k, r in res.items():
        c = r["cpu"]
        rng = f"{min(c):.1f}-{max(c):.1f}"
        print(f"{k:28} {med(r['wall']):8.2f} {med(c):8.2f} {rng:>15} {t_cpu / med(c):10.3f}x")
    # paired per-round ratios: both sides ran within the same few seconds of every round
    paired = {}
    for kind in ("nchwc", "default graph"):
        b = next((k for k in res if k.startswith("base") and k.endswith(kind)), None)
        n = next((k for k in res if k.startswith("branch") and k.endswith(kind)), None)
        if b and n:
            r = sorted(x / y for x, y in zip(res[b]["cpu"], res[n]["cpu"], strict=True))
            paired[kind] = {"min": r[0], "median": med(r), "max": r[-1]}
            print(f"base/branch cpu, {kind}: median {med(r):.3f}x (rounds {r[0]:.3f}-{r[-1]:.3f})")
    print("load", os.getloadavg())
    res["paired_base_over_branch_cpu"] = paired  # type: ignore[assignment]
    write_json("conv_backward_step", {"machine": machine(), "base": a.base, "runs": res})


if __name__ == "__main__":
    main()
