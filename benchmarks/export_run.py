"""Export quality on a model the coordinator federated: ``edgefed export --run`` vs the fp32
ONNX of the federated model itself.

Per model (a user factory file written here, not a built-in):
1. federate it (coordinator service + in-process agents on the embedded broker, ``edgefed.
   simulate``) over devices holding the 28x28 noisy-digits training set; the coordinator's
   evaluation set is the task's test set; the coordinator writes its model artefact;
2. run ``edgefed export --run <state dir>`` as a process (distill -> prune -> int8, budget
   1 pp), unlabelled extra transfer samples from ``--data``;
3. re-measure batch-1 latency of the federated model's fp32 ONNX against the smallest and the
   fastest in-budget candidates, interleaved and repeated (the machine is noisy).
Done-when: smallest bundle >= 10x smaller, fastest >= 2x lower b1 latency, each within 1 pp.

    python benchmarks/export_run.py [--models cnn,conv1d] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

USER_MODELS = '''
from torch import nn


def digits_cnn():
    """conv 32-64-128 (BN, ReLU, maxpool), FC 128, FC 10 on 1x28x28 (the design note's CNN)."""
    layers, prev = [], 1
    for c in (32, 64, 128):
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                   nn.MaxPool2d(2)]
        prev = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 3 * 3, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def signal_cnn():
    """Conv1d over the 784-sample row-major scan of the image (a 1-D signal model)."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 9, stride=2, padding=4, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 64, 9, stride=2, padding=4, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(64, 128, 5, padding=2, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
        nn.AdaptiveAvgPool1d(8), nn.Flatten(), nn.Linear(128 * 8, 128), nn.ReLU(),
        nn.Linear(128, 10))
'''
MODELS = {"cnn": ("digits_cnn", [1, 28, 28]), "conv1d": ("signal_cnn", [1, 784])}


def one_model(kind: str, work: Path, args: argparse.Namespace, data) -> dict:
    import edgefed
    from edgefed.coordinator.artifact import load_module, read_artifact
    from edgefed.coordinator.model import ModelConfigError, federated_model_from_config
    from edgefed.export.measure import export_onnx, latency_ms, session

    func, shape = MODELS[kind]
    reshape = lambda a: a.reshape(len(a), *shape)  # noqa: E731
    res: dict = {"model": kind, "factory": f"user_models.py:{func}", "input_shape": shape}
    t0 = time.monotonic()
    try:
        fm = federated_model_from_config(
            {"factory": f"user_models:{func}", "input_shape": shape}, work
        )
    except ModelConfigError as e:
        res["status"] = f"not federated: {e}"
        print(f"{kind}: {res['status']}", flush=True)
        return res
    res["step_export_s"] = round(time.monotonic() - t0, 1)
    x_te, y_te = reshape(data.x_test), data.y_test
    fm.evaluation = (x_te, y_te)
    n = args.devices * args.per_device
    x_tr, y_tr = reshape(data.x_train[:n]), data.y_train[:n]
    shards = [(x_tr[i :: args.devices], y_tr[i :: args.devices]) for i in range(args.devices)]
    state = work / f"state-{kind}"
    t0 = time.monotonic()
    hist = edgefed.simulate(
        None, shards, rounds=args.rounds, compression="int8", test_data=(x_te, y_te),
        lr=args.lr, batch_size=32, broker="embedded", work_dir=state, federated_model=fm,
        verbose=True,
    )  # fmt: skip
    res["federate_s"] = round(time.monotonic() - t0, 1)
    res["federated_accuracy_full_eval"] = hist.final_accuracy
    extra = work / f"extra-{kind}.npz"  # unlabelled transfer samples the coordinator holds
    np.savez(extra, x=reshape(data.x_train[n : n + args.extra]))
    cand = work / f"cand-{kind}"
    cmd = [
        sys.executable, "-m", "edgefed", "export", "--run", str(state), "-o",
        str(work / f"{kind}.efb"), "--key", str(work / "key"), "--json",
        str(work / f"{kind}.json"), "--data", str(extra), "--save-candidates", str(cand),
        "--threads", str(args.threads), "--budget", "1.0",
    ]  # fmt: skip
    for flag in ("distill_epochs", "finetune_epochs"):  # default: export's own (>= 3)
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    res["export_s"] = round(time.monotonic() - t0, 1)
    sys.stderr.write(r.stderr[-4000:])
    print(r.stdout, flush=True)
    if r.returncode != 0:
        res["status"] = f"export failed ({r.returncode}): {r.stderr.strip().splitlines()[-1]}"
        return res
    table = json.loads((work / f"{kind}.json").read_text())
    res["table"] = table["stages"]
    stages = [s for s in table["stages"] if s["status"] == "ok"]
    teacher = table["stages"][0]
    smallest = min(stages, key=lambda s: s["bytes"])
    fastest = min(stages, key=lambda s: s["ms_b1"])
    # the reference: the federated model's own fp32 ONNX, exported again from the artefact
    net = load_module(read_artifact(state))
    import torch

    ref = export_onnx(net, torch.from_numpy(x_te[:2].copy()))
    bundle_bytes = (work / f"{kind}.efb").stat().st_size
    sessions = {
        "federated fp32": session(ref, args.threads),
        smallest["name"]: session((cand / (smallest["name"].replace(" ", "_") + ".onnx"))
                                  .read_bytes(), args.threads),
        fastest["name"]: session((cand / (fastest["name"].replace(" ", "_") + ".onnx"))
                                 .read_bytes(), args.threads),
    }  # fmt: skip
    x1 = np.ascontiguousarray(x_te[:1])
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeats):  # interleaved
        for k, s in sessions.items():
            lat[k].append(latency_ms(s, x1[0], 1, runs=args.runs))
    med = {k: statistics.median(v) for k, v in lat.items()}
    res.update(
        status="ok",
        teacher_fp32_onnx_bytes=len(ref),
        teacher_accuracy_heldout=teacher["accuracy"],
        smallest={
            "stage": smallest["name"], "onnx_bytes": smallest["bytes"],
            "bundle_bytes": bundle_bytes, "accuracy": smallest["accuracy"],
            "drop_pp": smallest["drop_pp"], "x_smaller_onnx": len(ref) / smallest["bytes"],
            "x_smaller_bundle": len(ref) / bundle_bytes,
            "shipped_in_bundle": table["chosen"] == smallest["name"],
        },
        fastest={
            "stage": fastest["name"], "accuracy": fastest["accuracy"],
            "drop_pp": fastest["drop_pp"], "ms_b1": med[fastest["name"]],
            "x_faster_b1": med["federated fp32"] / med[fastest["name"]],
        },
        ms_b1_interleaved={k: [round(t, 4) for t in v] for k, v in lat.items()},
        teacher_ms_b1=med["federated fp32"],
    )  # fmt: skip
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,conv1d")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--per-device", type=int, default=2000)
    ap.add_argument("--extra", type=int, default=6000, help="unlabelled transfer samples")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill-epochs", type=int, default=None, help="passed to export")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="passed to export")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", default="benchmarks/out/export_run.json")
    args = ap.parse_args()
    from edgefed.bundle import write_keypair
    from edgefed.zoo.data import noisy_digits

    data = noisy_digits(seed=0)
    out = []
    with tempfile.TemporaryDirectory(prefix="edgefed-export-run-") as d:
        work = Path(d)
        (work / "user_models.py").write_text(USER_MODELS)
        write_keypair(work / "key")
        for kind in args.models.split(","):
            out.append(one_model(kind, work, args, data))
    print("\n| model | stage | bundle/ONNX bytes | vs fp32 | ms b1 | vs fp32 | acc % | drop pp |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in out:
        if r.get("status") != "ok":
            print(f"| {r['model']} | {r.get('status')} | | | | | | |")
            continue
        s, f = r["smallest"], r["fastest"]
        print(
            f"| {r['model']} | federated fp32 | {r['teacher_fp32_onnx_bytes']:,} | 1x "
            f"| {r['teacher_ms_b1']:.4f} | 1x | {100 * r['teacher_accuracy_heldout']:.2f} | 0 |"
        )
        print(
            f"| {r['model']} | smallest: {s['stage']} | {s['bundle_bytes']:,} / "
            f"{s['onnx_bytes']:,} | {s['x_smaller_bundle']:.1f}x / {s['x_smaller_onnx']:.1f}x "
            f"| | | {100 * s['accuracy']:.2f} | {s['drop_pp']:+.2f} |"
        )
        print(
            f"| {r['model']} | fastest: {f['stage']} | | | {f['ms_b1']:.4f} "
            f"| {f['x_faster_b1']:.2f}x | {100 * f['accuracy']:.2f} | {f['drop_pp']:+.2f} |"
        )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor()}",
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "args": vars(args),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "models": out}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
