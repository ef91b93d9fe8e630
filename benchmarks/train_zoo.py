"""Training-step zoo (issue 13): per family export seconds, ORT vs torch eager ms/step at 1 and
2 threads (interleaved in one process, as train_step.py does), device-process peak RSS.

Models: tests/train_export_zoo.py at scale 'bench' (MobileNet-style CNN 32x32, keyword-spotting
Conv1d over 10x49 MFCCs, Conv1d/ConvTranspose1d autoencoder over 3x64 windows, GRU/LSTM over
32 sensor steps, 2-layer transformer, bag-of-embeddings text, regression MLP), batch 32, SGD
momentum 0.9.
Run: PYTHONPATH=. python benchmarks/train_zoo.py [--quick] [--models ...]
Writes benchmarks/out/train_zoo.json. ORT ms is the StepTrainer as a device runs it (kernel
dispatch: the step's NCHWc alternative when it passes the one-batch check); the default-domain
graph alone is timed in the same interleaved rounds: 9 rounds x 20 steps, medians. Also
printed: the range of the per-round torch/ORT ratios (how far one figure can be trusted on a
shared machine) and the ratio of the calling thread's CPU time (at 1 thread all the work of
both runtimes; time descheduled behind other processes is not in it).
Targets: >= 1.0x torch at 1 thread for every model, >= 1.3x median, export <= 30 s,
device RSS (MobileNet-style, batch 32) < 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _util import machine, write_json  # noqa: E402
from train_export_zoo import zoo  # noqa: E402
from train_step import _interleaved_rounds, torch_sgd_step  # noqa: E402

from device_agent.trainer import StepTrainer  # noqa: E402
from edgefed.train_export import export_training_step  # noqa: E402
from edgefed.train_export.export import _loss_fn  # noqa: E402

BATCH = 32
ZOO = zoo("bench")

RSS_CHILD = r"""
import sys, json
sys.modules["torch"] = None  # any torch import fails loudly
import numpy as np
from device_agent.trainer import StepTrainer
d = sys.argv[1]
tr = StepTrainer(d + "/step.onnx", d + "/manifest.json", threads=1, low_memory=sys.argv[2] == "1")
tr.set_params(dict(np.load(d + "/params.npz")))
data = np.load(d + "/data.npz")
tr.train_epochs(data["x"], data["y"], epochs=1, batch_size=32, lr=0.01)
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(st[k].split()[0])
print(json.dumps({"max_rss_mb": kb("VmHWM") / 1024, "rss_mb": kb("VmRSS") / 1024}))
"""


def _export(name: str):
    e = ZOO[name]
    torch.manual_seed(0)
    model = e.build()
    x, y = e.data(8, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    g = export_training_step(model, (x, y), **e.kwargs)
    return model, g, time.perf_counter() - t0


def bench(name: str, model, g, threads: int, steps: int, repeats: int) -> dict:
    e = ZOO[name]
    x, y = e.data(BATCH, torch.Generator().manual_seed(1))
    xn, yn = x.numpy(), y.numpy()
    loss_fn = _loss_fn(e.kwargs.get("loss", "cross_entropy"))[1]
    torch.set_num_threads(threads)
    torch_step = torch_sgd_step(model, x, y, loss_fn)

    # What a device runs (kernel dispatch: the step's NCHWc alternative when it loads and
    # passes the trainer's one-batch check) and the default-domain graph alone, side by side.
    trainers = []
    for alternative in (True, False):
        tr = StepTrainer(g.onnx, g.manifest, threads=threads, alternative=alternative)
        tr.set_params({k: v.detach().numpy() for k, v in model.state_dict().items()})
        tr._scalars["lr"][()] = 0.01
        tr._step(xn, yn)  # the first step decides the kernel path
        trainers.append(tr)
    dispatch, default = trainers

    t, o, d = _interleaved_rounds(
        [torch_step, lambda: dispatch._step(xn, yn), lambda: default._step(xn, yn)],
        steps,
        repeats,
    )  # _step: the per-step path of train_epochs
    med = statistics.median
    # Each round's torch / ORT ratio compares two measurements taken seconds apart: their
    # spread over the rounds says how far one figure can be trusted on this machine.
    per_round = sorted(tw / ow for tw, ow in zip(t["wall"], o["wall"], strict=True))
    return {
        "threads": threads,
        "ort_ms": med(o["wall"]),
        "torch_ms": med(t["wall"]),
        "speedup": med(t["wall"]) / med(o["wall"]),
        "speedup_rounds": {"min": per_round[0], "median": med(per_round), "max": per_round[-1]},
        "ort_cpu_ms": med(o["cpu"]),
        "torch_cpu_ms": med(t["cpu"]),
        "speedup_cpu": med(t["cpu"]) / med(o["cpu"]),
        "kernel_path": dispatch.kernel_path,
        "default_graph_ms": med(d["wall"]),
        "rounds": {"torch": t, "ort": o, "default_graph": d},
    }


def device_rss(name: str, model, g) -> dict:
    """Peak RSS of a fresh torch-free process training ``name`` for one epoch of 512 samples."""
    res: dict = {}
    x, y = ZOO[name].data(512, torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as d:
        g.save(d)
        keep = g.manifest["params"]
        sd = model.state_dict()
        np.savez(Path(d) / "params.npz", **{k: sd[k].numpy() for k in keep})
        np.savez(Path(d) / "data.npz", x=x.numpy(), y=y.numpy())
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        for low, key in ((0, "default"), (1, "low_memory")):
            cmd = [sys.executable, "-c", RSS_CHILD, d, str(low)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            res[key] = json.loads(out.stdout.splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    ap.add_argument("--models", nargs="*", default=list(ZOO))
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    args = ap.parse_args()
    steps, repeats = (10, 3) if args.quick else (20, 9)
    load_start = os.getloadavg()[0]  # the machine is shared: record how busy it was
    print(f"load average at the start {load_start:.1f}", flush=True)
    rows = []
    for name in args.models:
        model, g, export_s = _export(name)
        print(f"{name:15s} export {export_s:6.1f} s  graph {len(g.onnx) / 1e3:8.0f} KB", flush=True)
        row: dict = {"model": name, "export_s": export_s, "graph_kb": len(g.onnx) / 1e3}
        row["params"] = sum(p.numel() for p in model.parameters())
        row["runs"] = [bench(name, model, g, t, steps, repeats) for t in args.threads]
        for r in row["runs"]:
            sr = r["speedup_rounds"]
            print(
                f"{name:15s} thr={r['threads']} ort {r['ort_ms']:8.3f} ms "
                f"({r['kernel_path']}; default graph {r['default_graph_ms']:8.3f} ms)  torch "
                f"{r['torch_ms']:8.3f} ms  x{r['speedup']:5.2f} (rounds {sr['min']:.2f}-"
                f"{sr['max']:.2f}; CPU time x{r['speedup_cpu']:5.2f})",
                flush=True,
            )
        row["rss"] = device_rss(name, model, g)
        print(
            f"{name:15s} device peak RSS {row['rss']['default']['max_rss_mb']:.1f} MB "
            f"(low_memory {row['rss']['low_memory']['max_rss_mb']:.1f} MB)",
            flush=True,
        )
        rows.append(row)
    first = [r["runs"][0] for r in rows if r["runs"][0]["threads"] == 1]
    one = [run["speedup"] for run in first]
    print(
        "\n| model | params | export s | threads | ORT ms (kernels) | default graph ms | torch ms "
        "| speedup | per-round range | speedup, CPU time | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for run in r["runs"]:
            print(
                f"| {r['model']} | {r['params']:,} | {r['export_s']:.1f} | {run['threads']} | "
                f"{run['ort_ms']:.3f} ({run['kernel_path']}) | {run['default_graph_ms']:.3f} | "
                f"{run['torch_ms']:.3f} | {run['speedup']:.2f}x | "
                f"{run['speedup_rounds']['min']:.2f}-{run['speedup_rounds']['max']:.2f}x | "
                f"{run['speedup_cpu']:.2f}x | {r['rss']['default']['max_rss_mb']:.0f} |"
            )
    if one:
        cpu = statistics.median(run["speedup_cpu"] for run in first)
        print(
            f"\nmedian speedup at 1 thread: {statistics.median(one):.2f}x wall, {cpu:.2f}x CPU "
            "time (target >= 1.3x)"
        )
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; load average at the end {load:.1f}")
    write_json(
        "train_zoo",
        {
            "machine": machine(),
            "batch": BATCH,
            "load_avg_start": load_start,
            "load_avg_end": load,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
