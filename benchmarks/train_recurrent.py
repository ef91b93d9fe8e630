"""Recurrent step rewrite (issue 13, point 3): torch's unrolled decomposition vs recurrent.py.

For each recurrent zoo model (tests/train_export_zoo.py, scale 'bench': 32 steps, batch 32,
SGD momentum 0.9) the step is exported twice in this process: "before" with the
hand-written layer switched off (torch's per-step decompositions, as on main) and "after"
(``edgefed/train_export/recurrent.py``). Prints export seconds, ONNX node counts and ms/step
of torch eager, ORT before and ORT after, interleaved and repeated (the machine is shared).
Run: PYTHONPATH=. python benchmarks/train_recurrent.py [--models ...] [--threads 1 2]
Writes benchmarks/out/train_recurrent.json.

``--save-dir DIR`` writes each "after" graph as ``DIR/<model>.onnx`` + ``.json``;
``--before-dir DIR`` takes "before" from such files (e.g. saved on main) instead of exporting
with the rewrite off: ORT-before vs ORT-after in one process is the comparison that survives a
loaded machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import onnx
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _util import machine, write_json  # noqa: E402
from train_export_zoo import zoo  # noqa: E402
from train_step import _interleaved_ms, torch_sgd_step  # noqa: E402

import edgefed.train_export.export as export_mod  # noqa: E402
from device_agent.trainer import StepTrainer  # noqa: E402
from edgefed.train_export import export_training_step  # noqa: E402

BATCH = 32
ZOO = zoo("bench")
RECURRENT = ["lstm_sensor", "gru_sensor"]


def _export(name: str, rewrite: bool):
    e = ZOO[name]
    torch.manual_seed(0)
    model = e.build()
    x, y = e.data(8, torch.Generator().manual_seed(0))
    saved = export_mod.rnn_mode
    if not rewrite:
        export_mod.rnn_mode = contextlib.nullcontext  # torch's own decompositions (main)
    try:
        t0 = time.perf_counter()
        g = export_training_step(model, (x, y), **e.kwargs)
        secs = time.perf_counter() - t0
    finally:
        export_mod.rnn_mode = saved
    nodes = len(onnx.load_from_string(g.onnx).graph.node)
    return model, g, secs, nodes


class _Saved:
    """A step graph + manifest saved by ``--save-dir`` (same interface as the exporter's)."""

    def __init__(self, base: Path) -> None:
        self.onnx = base.with_suffix(".onnx").read_bytes()
        self.manifest = json.loads(base.with_suffix(".json").read_text())


def _save(g, base: Path) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".onnx").write_bytes(g.onnx)
    base.with_suffix(".json").write_text(json.dumps(g.manifest))


def bench(name: str, model, graphs, threads: int, steps: int, repeats: int) -> list[float]:
    x, y = ZOO[name].data(BATCH, torch.Generator().manual_seed(1))
    xn, yn = x.numpy(), y.numpy()
    torch.set_num_threads(threads)
    fns = [torch_sgd_step(model, x, y)]
    for g in graphs:
        tr = StepTrainer(g.onnx, g.manifest, threads=threads)
        tr.set_params({k: v.detach().numpy() for k, v in model.state_dict().items()})
        tr._scalars["lr"][()] = 0.01
        fns.append(lambda tr=tr: tr._step(xn, yn))  # the per-step path of train_epochs
    return _interleaved_ms(fns, steps, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=RECURRENT)
    ap.add_argument("--threads", nargs="*", type=int, default=[1])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--before-dir", type=Path, help="'before' graphs saved by --save-dir")
    ap.add_argument("--save-dir", type=Path, help="save the 'after' graphs here")
    args = ap.parse_args()
    load_start = os.getloadavg()
    print(f"load average at the start {load_start}", flush=True)
    rows = []
    for name in args.models:
        row: dict = {"model": name}
        graphs = []
        for tag, rewrite in (("before", False), ("after", True)):
            if tag == "before" and args.before_dir:
                g = _Saved(args.before_dir / name)
                secs, nodes = float("nan"), len(onnx.load_from_string(g.onnx).graph.node)
                graphs.append(g)
                row[f"{tag}_export_s"], row[f"{tag}_nodes"] = secs, nodes
                continue
            model, g, secs, nodes = _export(name, rewrite)
            graphs.append(g)
            if tag == "after" and args.save_dir:
                _save(g, args.save_dir / name)
            row[f"{tag}_export_s"], row[f"{tag}_nodes"] = secs, nodes
            print(f"{name:12s} {tag:6s} export {secs:6.1f} s  {nodes:5d} nodes", flush=True)
        row["runs"] = []
        for t in args.threads:
            t_ms, b_ms, a_ms = bench(name, model, graphs, t, 30, args.repeats)
            row["runs"].append(
                {"threads": t, "torch_ms": t_ms, "before_ms": b_ms, "after_ms": a_ms}
            )
            print(
                f"{name:12s} thr={t} torch {t_ms:7.3f}  before {b_ms:7.3f} ({t_ms / b_ms:.2f}x)"
                f"  after {a_ms:7.3f} ({t_ms / a_ms:.2f}x)",
                flush=True,
            )
        rows.append(row)
    print(
        "\n| model | export s before -> after | nodes before -> after | threads | torch ms "
        "| ORT ms before -> after | speedup vs torch before -> after |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for run in r["runs"]:
            t, b, a = run["torch_ms"], run["before_ms"], run["after_ms"]
            print(
                f"| {r['model']} | {r['before_export_s']:.1f} -> {r['after_export_s']:.1f} | "
                f"{r['before_nodes']} -> {r['after_nodes']} | {run['threads']} | {t:.3f} | "
                f"{b:.3f} -> {a:.3f} | {t / b:.2f}x -> {t / a:.2f}x |"
            )
    load_end = os.getloadavg()
    print(f"machine: {machine()}; load average at the end {load_end}")
    write_json(
        "train_recurrent",
        {
            "machine": machine(),
            "batch": BATCH,
            "load_avg_start": load_start,
            "load_avg_end": load_end,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
