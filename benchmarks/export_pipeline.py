"""Export pipeline numbers: teacher fp32/int8 -> distilled half width -> pruned, int8 of each.

One command (`PYTHONPATH=. python benchmarks/export_pipeline.py`), all baselines in the same
run: every ratio is against the float teacher's ONNX measured here with onnxruntime and the
same fixed thread count. Targets (issue 6), each at accuracy drop <= 1 pp vs the teacher:
smallest bundle >= 20x smaller; fastest >= 4x lower latency at batch 64 and >= 2x at batch 1.

The teacher stands in for the federated global model: ``--teacher-state`` loads any
DigitsCNN state_dict (what the coordinator checkpoints). Otherwise it is trained here with
plain torch and cached in benchmarks/out/ so re-runs measure the export pipeline only
(``--retrain`` ignores the cache). Writes benchmarks/out/export.json and
benchmarks/results/export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from edgefed.bundle import build_bundle, generate_keypair, install_bundle, verify_bytes
from edgefed.export.distill import train_supervised
from edgefed.export.measure import latency_ms, session
from edgefed.export.pipeline import ExportConfig, manifest_for, pick_stage, run_pipeline
from edgefed.zoo.data import noisy_digits
from edgefed.zoo.models import DigitsCNN

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}"
    )


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-state", help="DigitsCNN state_dict, e.g. from federated training")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached teacher")
    ap.add_argument("--train-per-digit", type=int, default=10, help="placements per train digit")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--distill-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    OUT.mkdir(exist_ok=True)
    t_start = time.perf_counter()

    data = noisy_digits(train_per_digit=args.train_per_digit)
    teacher = DigitsCNN()
    cache = OUT / f"teacher_digits28_n{args.train_per_digit}_e{args.teacher_epochs}.pt"
    t0 = time.perf_counter()
    if args.teacher_state:
        teacher.load_state_dict(torch.load(args.teacher_state, weights_only=True))
        teacher_src = f"state_dict {args.teacher_state}"
    elif cache.exists() and not args.retrain:
        teacher.load_state_dict(torch.load(cache, weights_only=True))
        teacher_src = f"cached {cache.name}"
    else:
        torch.manual_seed(0)
        train_supervised(teacher, data.x_train, data.y_train, epochs=args.teacher_epochs, log=log)
        torch.save(teacher.state_dict(), cache)
        teacher_src = f"trained here, {args.teacher_epochs} epochs"
    teacher_s = time.perf_counter() - t0
    log(f"teacher: {teacher_src} ({teacher_s:.0f} s)")

    cfg = ExportConfig(
        accuracy_budget_pp=args.budget,
        distill_epochs=args.distill_epochs,
        finetune_epochs=args.finetune_epochs,
        threads=args.threads,
        latency_runs=40,
    )
    t0 = time.perf_counter()
    result = run_pipeline(teacher, data, cfg, log=log)
    pipeline_s = time.perf_counter() - t0

    sk, vk = generate_keypair()
    base = result.stages[0]
    picks = {
        "smallest": pick_stage(result.stages, "size"),
        "fastest b64": pick_stage(result.stages, "latency"),
        "fastest b1": pick_stage(result.stages, "latency1"),
    }
    summary = {}
    for label, st in picks.items():
        blob = build_bundle(st.onnx, manifest_for(result, data, "bench", st), signing_key=sk)
        verify_bytes(blob, vk)
        summary[label] = {
            "stage": st.name,
            "bundle_bytes": len(blob),
            "size_x": base.bytes / len(blob),
            "b64_x": base.ms_b64 / st.ms_b64,
            "b1_x": base.ms_b1 / st.ms_b1,
            "drop_pp": st.drop_pp,
        }
    # What a device sees: install the smallest bundle (verify + load check + swap), then
    # time the installed model exactly as the agent would (1 thread and the bench threads).
    inst_dir = OUT / "export_install"
    bpath = OUT / "export_smallest.efb"
    bpath.write_bytes(
        build_bundle(
            picks["smallest"].onnx,
            manifest_for(result, data, "bench", picks["smallest"]),
            signing_key=sk,
        )
    )
    inst = install_bundle(bpath, vk, inst_dir)
    dev_sess = session(inst.model_path.read_bytes(), 1)
    installed_ms_b1 = latency_ms(dev_sess, data.x_test[0], 1, runs=200)

    targets = {
        "size >= 20x": summary["smallest"]["size_x"] >= 20 and summary["smallest"]["drop_pp"] <= 1,
        "b64 >= 4x": summary["fastest b64"]["b64_x"] >= 4
        and summary["fastest b64"]["drop_pp"] <= 1,
        "b1 >= 2x": summary["fastest b1"]["b1_x"] >= 2 and summary["fastest b1"]["drop_pp"] <= 1,
    }
    total_s = time.perf_counter() - t_start
    table = result.table().replace(" **(chosen)**", "")
    lines = [
        table,
        "",
        "| pick (within budget) | stage | bundle bytes | smaller vs teacher ONNX "
        "| b64 speed-up | b1 speed-up | drop pp |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['stage']} | {s['bundle_bytes']:,} | {s['size_x']:.1f}x | "
            f"{s['b64_x']:.2f}x | {s['b1_x']:.2f}x | {s['drop_pp']:+.2f} |"
        )
    lines += [
        "",
        "targets: " + ", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in targets.items()),
        f"installed smallest bundle, 1 thread, batch 1: {installed_ms_b1:.3f} ms",
        f"teacher {teacher_src}; pipeline {pipeline_s:.0f} s; total {total_s:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    report = {
        "machine": machine(),
        "config": {k: v for k, v in vars(cfg).items()},
        "teacher": teacher_src,
        "stages": result.metrics()["stages"],
        "picks": summary,
        "targets": targets,
        "installed_smallest_ms_b1_1thread": installed_ms_b1,
        "seconds": {"teacher": teacher_s, "pipeline": pipeline_s, "total": total_s},
        "data": {"train": len(data.x_train), "test": len(data.x_test)},
    }
    (OUT / "export.json").write_text(json.dumps(report, indent=1))
    md = (
        "# Export pipeline (issue 6)\n\n"
        "Command: `PYTHONPATH=. python benchmarks/export_pipeline.py` "
        f"(JSON: benchmarks/out/export.json)\n\nMachine: {machine()}\n\n"
        f"Task: 28x28 noisy digits, {len(data.x_train):,} train / {len(data.x_test):,} test; "
        f"onnxruntime intra-op threads {cfg.threads}, medians; accuracy of the ONNX model on the "
        f"test set; budget {cfg.accuracy_budget_pp} pp vs the teacher.\n\n{text}\n"
    )
    (HERE / "results" / "export.md").write_text(md)


if __name__ == "__main__":
    main()
