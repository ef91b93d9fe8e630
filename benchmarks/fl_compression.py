"""Federated digits with compressed uplinks: accuracy vs uplink bytes per codec.

Issue 5 numbers: sklearn digits (1,400 train / 397 held out), 20 devices, Dirichlet label
skew alpha 0.5, every device every round, 1 local epoch SGD lr 0.05 batch 16, 100 rounds,
3 seeds, an MLP 64-128-10 and a small CNN (2 conv): uplink float32 (``none``) vs ``int8``
vs ``topk:0.1+int8`` vs ``topk:0.01+int8``, error feedback on. Downlink float32 so only the
uplink codec differs (the runtime's default int8 downlink is measured in the demo).

Runs through ``edgefed.simulate``'s in-process path: the real exported ONNX step graphs in
onnxruntime, the real codec bytes, the real round engine and FedAvg - only the broker is
skipped. Byte ratios compare with float32 (``none``) sent through the same codec (wire
format v2) and the same update message; accuracy reference: the plain-torch simulation
in shared/baselines.md (same setup).

    python benchmarks/fl_compression.py                      # full: ~20-40 min on 2 cores
    python benchmarks/fl_compression.py --rounds 30 --seeds 1 --models mlp   # quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

SPECS = ["none", "int8", "topk:0.1+int8", "topk:0.01+int8"]
TARGETS = {  # spec -> (max pp lost vs float32, min uplink reduction) per model
    "int8": {"mlp": (0.3, 3.9), "cnn": (0.3, 3.9)},
    "topk:0.01+int8": {"mlp": (1.5, 50.0), "cnn": (1.5, 25.0)},
}
BASELINE = {  # plain-torch reference, 100 rounds (shared/baselines.md), pp vs float32
    "mlp": {"none": 93.1, "int8": -0.1, "topk:0.1+int8": -0.3, "topk:0.01+int8": -0.9},
    "cnn": {"none": 94.4, "int8": 0.0, "topk:0.1+int8": -0.7, "topk:0.01+int8": -1.8},
}


def make_model(kind: str):
    from torch import nn

    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _cache_file(
    cache: str, kind: str, seed: int, rounds: int, devices: int, alpha: float, spec: str
):
    name = (
        f"{kind}-s{seed}-r{rounds}-d{devices}-a{alpha}-{spec.replace(':', '_').replace('+', '_')}"
    )
    return Path(cache) / f"{name}.json"


def one_job(job: tuple[str, int, int, int, float, list[str], str]) -> list[dict]:
    kind, seed, rounds, devices, alpha, specs, cache = job
    todo = [
        s for s in specs if not _cache_file(cache, kind, seed, rounds, devices, alpha, s).exists()
    ]
    if not todo:
        return [
            json.loads(_cache_file(cache, kind, seed, rounds, devices, alpha, s).read_text())
            for s in specs
        ]
    import torch

    torch.set_num_threads(1)
    from edgefed.coordinator.model import build_federated_model
    from edgefed.simulation import simulate
    from edgefed.zoo.data import digits_federated

    devs, test = digits_federated(devices, alpha, seed, image=kind == "cnn")
    torch.manual_seed(seed)
    net = make_model(kind)
    ex = (torch.from_numpy(devs[0][0][:8].copy()), torch.from_numpy(devs[0][1][:8].copy()))
    fm = build_federated_model(net, ex)
    for spec in todo:
        t0 = time.time()
        h = simulate(
            net,
            devs,
            rounds=rounds,
            compression=spec,
            downlink="none",
            test_data=test,
            lr=0.05,
            batch_size=16,
            local_epochs=1,
            seed=seed,
            federated_model=fm,
        )
        res = {
            "model": kind,
            "seed": seed,
            "spec": spec,
            "seconds": time.time() - t0,
            "accuracy": [r["accuracy"] for r in h],
            "cum_bytes_up": [r["cum_bytes_up"] for r in h],
            "cum_payload_up": np.cumsum([r["payload_up"] for r in h]).tolist(),
            "params": fm.num_params,
        }
        _cache_file(cache, kind, seed, rounds, devices, alpha, spec).write_text(json.dumps(res))
        print(
            f"  {kind} seed {seed} {spec:<16} acc {100 * h[-1]['accuracy']:.1f}% "
            f"up {h[-1]['cum_bytes_up']:,} B ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return [
        json.loads(_cache_file(cache, kind, seed, rounds, devices, alpha, s).read_text())
        for s in specs
    ]


def summarise(results: list[dict], models: list[str], specs: list[str]) -> list[dict]:
    rows = []
    for kind in models:
        ref = [r for r in results if r["model"] == kind and r["spec"] == "none"]
        ref_acc = np.mean([r["accuracy"][-1] for r in ref]) if ref else None
        ref_bytes = np.mean([r["cum_bytes_up"][-1] for r in ref]) if ref else None
        ref_pay = np.mean([r["cum_payload_up"][-1] for r in ref]) if ref else None
        for spec in specs:
            rs = [r for r in results if r["model"] == kind and r["spec"] == spec]
            if not rs:
                continue
            acc = float(np.mean([r["accuracy"][-1] for r in rs]))
            last5 = float(np.mean([np.mean(r["accuracy"][-5:]) for r in rs]))
            up = float(np.mean([r["cum_bytes_up"][-1] for r in rs]))
            pay = float(np.mean([r["cum_payload_up"][-1] for r in rs]))
            row = {
                "model": kind,
                "spec": spec,
                "seeds": len(rs),
                "rounds": len(rs[0]["accuracy"]),
                "final_acc": acc,
                "last5_acc": last5,
                "uplink_bytes": up,
                "pp_vs_float32": None if ref_acc is None else 100 * (acc - ref_acc),
                "reduction": None if ref_bytes is None else ref_bytes / up,
                "payload_bytes": pay,
                "payload_reduction": None if ref_pay is None else ref_pay / pay,
                "baseline_pp": BASELINE[kind].get(spec),
            }
            t = TARGETS.get(spec, {}).get(kind)
            if t and row["pp_vs_float32"] is not None:
                row["target"] = f"<= {t[0]} pp lost, >= {t[1]}x"
                row["meets_target"] = bool(
                    -row["pp_vs_float32"] <= t[0] and row["reduction"] >= t[1]
                )
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--fresh", action="store_true", help="ignore results cached by earlier runs")
    a = ap.parse_args()
    cache = Path(a.out) / "fl_compression_cache"
    if a.fresh and cache.exists():
        for f in cache.glob("*.json"):
            f.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    models = a.models.split(",")
    specs = a.specs.split(",")
    jobs = [
        (m, s, a.rounds, a.devices, a.alpha, specs, str(cache))
        for m in models
        for s in range(a.seeds)
    ]
    t0 = time.time()
    results: list[dict] = []
    # Each finished (model, seed, codec) run is cached, so a crashed worker costs one run:
    # the pool is rebuilt and only what is missing runs again.
    for attempt in range(3):
        try:
            with ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn")) as ex:
                for r in ex.map(one_job, jobs):
                    results.extend(r)
            break
        except BrokenProcessPool:
            print(f"a worker died (attempt {attempt + 1}); resuming from the cache", flush=True)
            results = []
    else:
        raise RuntimeError("workers kept dying")
    rows = summarise(results, models, specs)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"\nFederated digits: {a.devices} devices, alpha {a.alpha}, {a.rounds} rounds, "
        f"{a.seeds} seeds, EF on ({machine}; {time.time() - t0:.0f}s)"
    )
    print(
        f"{'model':<5} {'uplink':<16} {'final acc':>9} {'last5':>7} {'vs f32':>8} "
        f"{'bytes up':>13} {'fewer':>7} {'torch ref':>9}  target"
    )
    for r in rows:
        pp = "" if r["pp_vs_float32"] is None else f"{r['pp_vs_float32']:+.2f}pp"
        red = "" if r["reduction"] is None else f"{r['reduction']:.1f}x"
        base = "" if r["baseline_pp"] is None else f"{r['baseline_pp']:+.1f}"
        pred = "" if r["payload_reduction"] is None else f"{r['payload_reduction']:.1f}x"
        tgt = r.get("target", "")
        if tgt:
            tgt += "  " + ("MET" if r["meets_target"] else "MISSED")
        print(
            f"{r['model']:<5} {r['spec']:<16} {100 * r['final_acc']:8.2f}% "
            f"{100 * r['last5_acc']:6.2f}% {pp:>8} {r['uplink_bytes']:>13,.0f} {red:>7} "
            f"{pred:>10} {base:>9}  {tgt}"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fl_compression.json").write_text(
        json.dumps({"args": vars(a), "machine": machine, "rows": rows, "runs": results})
    )
    from edgefed.apps.plot import plot_runs

    for kind in models:
        runs = {}
        for spec in specs:
            rs = [r for r in results if r["model"] == kind and r["spec"] == spec]
            if rs:
                acc = np.mean([r["accuracy"] for r in rs], axis=0)
                up = np.mean([r["cum_bytes_up"] for r in rs], axis=0)
                runs[spec] = [
                    {"round": i + 1, "accuracy": float(x), "cum_bytes_up": float(b)}
                    for i, (x, b) in enumerate(zip(acc, up, strict=True))
                ]
        plot_runs(
            runs, out / f"fl_compression_{kind}.png", f"digits {kind}, mean of {a.seeds} seeds"
        )
    print(f"wrote {out}/fl_compression.json and fl_compression_<model>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
