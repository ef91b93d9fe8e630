"""``edgefed export``: teacher -> distill -> prune -> int8, table, signed bundle.

``--run <coordinator config | state dir | model artefact>``: the teacher is the model the
coordinator federated (its artefact, docs/model-artifact.md), any architecture; the
coordinator's evaluation set (kept in the artefact) is split once, seeded: ``--transfer``
of it feeds distillation, fine-tuning and int8 calibration, the rest measures every
candidate — the teacher's fp32 ONNX included, so the table compares like with like.
``--data x.npz`` adds more (unlabelled) transfer samples.

Without ``--run`` the teacher is the built-in 28x28 DigitsCNN, loaded from
``--teacher-state`` (a torch state_dict) or trained here first.
Exit codes: 0 ok, 1 bad input, 2 a forced ``--stage`` broke the accuracy budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from edgefed.atomic import atomic_write


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, help="bundle file to write (.efb)")
    p.add_argument(
        "--run",
        help="teacher = the federated model of this coordinator run: its config (.toml), "
        "its state directory or the federated-model/ artefact directory",
    )
    p.add_argument(
        "--student",
        help="distil into this architecture instead of the pruned teacher: "
        "'file.py:function' or 'package.module:function' returning an nn.Module",
    )
    p.add_argument(
        "--transfer",
        type=float,
        default=0.5,
        help="with --run: share of the evaluation set used for distillation and calibration "
        "(the rest measures accuracy; default 0.5)",
    )
    p.add_argument("--key", help="Ed25519 private key (edgefed keygen); unsigned if omitted")
    p.add_argument("--model-version", help="bundle version (default: the run's, else v1)")
    p.add_argument(
        "--data",
        help="without --run: 'digits28' (built in, default) or an .npz with x_train, x_test, "
        "y_test [, y_train]; with --run: extra transfer samples, an .npz with x [, y]",
    )
    p.add_argument("--no-labels", action="store_true", help="distill from soft targets only")
    p.add_argument(
        "--teacher-state", help="without --run: torch state_dict (.pt) of the built-in teacher"
    )
    p.add_argument("--teacher-width", type=float, default=1.0, help="built-in teacher width")
    p.add_argument("--teacher-epochs", type=int, default=3, help="when no --teacher-state")
    p.add_argument(
        "--objective",
        choices=["size", "latency", "latency1"],
        default="size",
        help="ship the in-budget candidate with the fewest bytes (size), the lowest batch-64 "
        "latency (latency) or batch-1 latency (latency1)",
    )
    p.add_argument("--budget", type=float, default=1.0, help="max accuracy drop, pp")
    p.add_argument("--width", type=float, default=0.5, help="student width vs teacher")
    p.add_argument("--prune", type=float, default=0.5, help="pruning ratio, 0 = off")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss")
    p.add_argument(
        "--distill-epochs", type=int, help="default 3; with --run: >= 3, ~3000 samples seen"
    )
    p.add_argument("--finetune-epochs", type=int, help="KD epochs after pruning (as above)")
    p.add_argument(
        "--quantize",
        choices=["static", "dynamic", "both", "none"],
        default="static",
        help="int8 candidates: onnxruntime static QDQ (calibrated), dynamic, both or none",
    )
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for latency")
    p.add_argument("--stage", help="ship this stage instead of the objective's pick")
    p.add_argument("--train-step", action="store_true", help="add the on-device training step")
    p.add_argument("--json", help="also write the stage table as JSON here")
    p.add_argument(
        "--save-candidates", help="also write every candidate's ONNX into this directory"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds splits, training and pruning")


def run(args: argparse.Namespace) -> int:
    from torch.onnx import OnnxExporterError as TorchExportError

    from edgefed.bundle import BundleError, load_signing_key
    from edgefed.export.pipeline import (
        AccuracyBudgetError,
        ExportConfig,
        make_bundle,
        run_pipeline,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        key = load_signing_key(args.key) if args.key else None
        student = None
        if args.student:
            from edgefed.usermodel import build_user_model

            student = build_user_model(args.student, Path.cwd())
        if args.run:
            teacher, data, version = _from_run(args, log)
        else:
            teacher, data = _builtin_teacher(args, log)
            version = "v1"
        version = args.model_version or version
        n = len(data.x_train)
        auto = max(3, math.ceil(3000 / max(1, n))) if args.run else 3
        cfg = ExportConfig(
            objective=args.objective,
            accuracy_budget_pp=args.budget,
            temperature=args.temperature,
            alpha=args.alpha,
            width=args.width,
            prune_ratio=args.prune,
            distill_epochs=auto if args.distill_epochs is None else args.distill_epochs,
            finetune_epochs=auto if args.finetune_epochs is None else args.finetune_epochs,
            quantize=args.quantize,
            threads=args.threads,
            seed=args.seed,
        )
        result = run_pipeline(teacher, data, cfg, student=student, log=log)
        stage = result.require(args.stage) if args.stage else result.chosen
        bundle = make_bundle(
            result,
            data,
            version,
            signing_key=key,
            stage=stage,
            train_step=args.train_step,
        )
    except AccuracyBudgetError as e:
        print(e.table)
        print(f"REFUSED: {e.reason}", file=sys.stderr)
        return 2
    except (BundleError, ValueError, OSError, RuntimeError, KeyError, TorchExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.table().replace(f"{result.chosen.name} **(chosen)**", result.chosen.name))
    print(
        f"shipping: {stage.name} (accuracy {100 * stage.accuracy:.2f}% on "
        f"{len(data.y_test)} held-out samples, teacher {100 * result.stages[0].accuracy:.2f}%)"
    )
    out = Path(args.out)
    atomic_write(out, bundle, mode=0o644)
    print(f"wrote {out} ({len(bundle):,} bytes, {'signed' if key else 'UNSIGNED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result.metrics(), indent=1))
    if args.save_candidates:
        d = Path(args.save_candidates)
        d.mkdir(parents=True, exist_ok=True)
        for st in result.stages:
            (d / (st.name.replace(" ", "_") + ".onnx")).write_bytes(st.onnx)
    return 0


def _builtin_teacher(args: argparse.Namespace, log: Any) -> tuple[Any, Any]:
    """The 28x28 DigitsCNN (loaded from --teacher-state, or trained here) and its task."""
    import torch

    from edgefed.export.distill import train_supervised
    from edgefed.zoo.data import TaskData, noisy_digits
    from edgefed.zoo.models import DigitsCNN

    src = args.data or "digits28"
    data = noisy_digits(seed=args.seed) if src == "digits28" else TaskData.load_npz(src)
    if args.no_labels:
        data.y_train = None
    shape = data.x_train.shape
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"the built-in teacher needs square NCHW images, got {shape[1:]}")
    torch.manual_seed(args.seed)
    teacher = DigitsCNN(len(data.labels), args.teacher_width, shape[1], shape[2])
    if args.teacher_state:
        teacher.load_state_dict(_torch_state(args.teacher_state))
    elif data.y_train is None:
        raise ValueError("without labels a teacher cannot be trained: pass --teacher-state")
    else:
        train_supervised(teacher, data.x_train, data.y_train, epochs=args.teacher_epochs, log=log)
    return teacher, data


def _torch_state(path: str) -> Any:
    """A torch state_dict file; a coordinator checkpoint gets pointed at --run."""
    import zipfile

    import torch

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "__meta__.npy" in z.namelist():
                raise ValueError(
                    f"--teacher-state {path}: this is a coordinator checkpoint, not a torch "
                    f"state_dict; use: edgefed export --run {Path(path).resolve().parent}"
                )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--teacher-state {path}: not a torch state_dict file ({first})") from e


def _from_run(args: argparse.Namespace, log: Any) -> tuple[Any, Any, str]:
    """Teacher = the run's federated model; data = its evaluation set, split once."""
    import numpy as np
    import torch

    from edgefed.coordinator.artifact import load_module, read_artifact
    from edgefed.zoo.data import TaskData

    art = read_artifact(args.run)
    man = art.manifest
    log(
        f"teacher: {art.directory} (run {man.get('run_id')}, round {man.get('round')}, "
        f"{man['model'].get('factory') or man['model'].get('builtin')})"
    )
    if man["model"].get("loss", "cross_entropy") != "cross_entropy":
        raise ValueError(f"{art.directory}: export distils classifiers (cross_entropy loss)")
    if man["input"]["dtype"] != "float32":
        raise ValueError(
            f"{art.directory}: export needs float32 input, the model takes {man['input']['dtype']}"
        )
    teacher = load_module(art)
    ev = art.evaluation()
    if ev is None:
        raise ValueError(
            f"{art.directory}: no evaluation.npz (the coordinator had no [evaluation] dataset): "
            f"export needs labelled data to measure the candidates"
        )
    x, y = np.ascontiguousarray(ev[0], np.float32), np.asarray(ev[1]).astype(np.int64)
    want = tuple(man["input"]["shape"][1:])
    if x.shape[1:] != want:
        raise ValueError(
            f"{art.directory / 'evaluation.npz'}: x has per-sample shape {list(x.shape[1:])}, "
            f"the model expects {list(want)}"
        )
    if not 0.0 < args.transfer < 1.0:
        raise ValueError(f"--transfer must be in (0, 1), got {args.transfer}")
    perm = np.random.default_rng(args.seed).permutation(len(x))
    k = round(args.transfer * len(x))
    if k < 2 or len(x) - k < 1:
        raise ValueError(f"{art.directory}: evaluation set of {len(x)} samples is too small")
    tr, te = perm[:k], perm[k:]
    x_tr, y_tr = x[tr], y[tr]
    if args.data:
        with np.load(args.data, allow_pickle=False) as z:
            if "x" not in z.files:
                raise ValueError(f"--data {args.data}: expected an array 'x', found {z.files}")
            xe = np.ascontiguousarray(z["x"], np.float32)
            ye = z["y"].astype(np.int64) if "y" in z.files else None
        if xe.shape[1:] != want:
            raise ValueError(
                f"--data {args.data}: x has per-sample shape {list(xe.shape[1:])}, "
                f"the model expects {list(want)}"
            )
        x_tr = np.concatenate([x_tr, xe])
        y_tr = None if ye is None else np.concatenate([y_tr, ye])
    if args.no_labels:
        y_tr = None
    with torch.no_grad():
        k_out = int(teacher(torch.from_numpy(x[:2])).shape[1])
    classes = max(k_out, int(y.max()) + 1)
    data = TaskData(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x[te],
        y_test=y[te],
        labels=[str(i) for i in range(classes)],
        preprocessing={
            "source": f"coordinator evaluation set of run {man.get('run_id')}",
            "input_shape": list(want),
            "dtype": "float32",
        },
    )
    log(f"data: {len(x_tr)} transfer / {len(te)} held-out samples of shape {list(want)}")
    return teacher, data, str(man.get("model_version") or "v1")
