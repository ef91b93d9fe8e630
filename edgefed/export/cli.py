"""``edgefed export``: teacher -> distill -> prune -> int8, table, signed bundle.

The teacher is the built-in DigitsCNN; ``--teacher-state`` loads its weights from a
state_dict file — the hook for a federated-trained global model (the coordinator saves
``model.state_dict()``). Without it a teacher is trained here with plain torch.
Exit codes: 0 ok, 1 bad input, 2 a forced ``--stage`` broke the accuracy budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgefed.atomic import atomic_write


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, help="bundle file to write (.efb)")
    p.add_argument("--key", help="Ed25519 private key (edgefed keygen); unsigned if omitted")
    p.add_argument("--model-version", default="v1")
    p.add_argument("--data", default="digits28", help="'digits28' (built in) or an .npz file")
    p.add_argument("--no-labels", action="store_true", help="distill from soft targets only")
    p.add_argument("--teacher-state", help="state_dict (.pt) of the teacher, e.g. federated")
    p.add_argument("--teacher-width", type=float, default=1.0)
    p.add_argument("--teacher-epochs", type=int, default=3, help="when no --teacher-state")
    p.add_argument("--objective", choices=["size", "latency", "latency1"], default="size")
    p.add_argument("--budget", type=float, default=1.0, help="max accuracy drop, pp")
    p.add_argument("--width", type=float, default=0.5, help="student width vs teacher")
    p.add_argument("--prune", type=float, default=0.5, help="pruning ratio, 0 = off")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--distill-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--quantize", choices=["static", "dynamic", "both", "none"], default="static")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for latency")
    p.add_argument("--stage", help="ship this stage instead of the objective's pick")
    p.add_argument("--train-step", action="store_true", help="add the on-device training step")
    p.add_argument("--json", help="also write the stage table as JSON here")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from edgefed.bundle import BundleError, load_signing_key
    from edgefed.export.distill import train_supervised
    from edgefed.export.pipeline import (
        AccuracyBudgetError,
        ExportConfig,
        make_bundle,
        run_pipeline,
    )
    from edgefed.zoo.data import TaskData, noisy_digits
    from edgefed.zoo.models import DigitsCNN

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        key = load_signing_key(args.key) if args.key else None
        data = (
            noisy_digits(seed=args.seed)
            if args.data == "digits28"
            else TaskData.load_npz(args.data)
        )
        if args.no_labels:
            data.y_train = None
        cfg = ExportConfig(
            objective=args.objective,
            accuracy_budget_pp=args.budget,
            temperature=args.temperature,
            alpha=args.alpha,
            width=args.width,
            prune_ratio=args.prune,
            distill_epochs=args.distill_epochs,
            finetune_epochs=args.finetune_epochs,
            quantize=args.quantize,
            threads=args.threads,
            seed=args.seed,
        )
        shape = data.x_train.shape
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"the built-in teacher needs square NCHW images, got {shape[1:]}")
        torch.manual_seed(args.seed)
        teacher = DigitsCNN(len(data.labels), args.teacher_width, shape[1], shape[2])
        if args.teacher_state:
            state = torch.load(args.teacher_state, map_location="cpu", weights_only=True)
            teacher.load_state_dict(state)
        elif data.y_train is None:
            raise ValueError("without labels a teacher cannot be trained: pass --teacher-state")
        else:
            train_supervised(
                teacher, data.x_train, data.y_train, epochs=args.teacher_epochs, log=log
            )
        result = run_pipeline(teacher, data, cfg, log=log)
        stage = result.require(args.stage) if args.stage else result.chosen
        bundle = make_bundle(
            result,
            data,
            args.model_version,
            signing_key=key,
            stage=stage,
            train_step=args.train_step,
        )
    except AccuracyBudgetError as e:
        print(e.table)
        print(f"REFUSED: {e.reason}", file=sys.stderr)
        return 2
    except (BundleError, ValueError, OSError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.table().replace(f"{result.chosen.name} **(chosen)**", result.chosen.name))
    print(f"shipping: {stage.name}")
    out = Path(args.out)
    atomic_write(out, bundle, mode=0o644)
    print(f"wrote {out} ({len(bundle):,} bytes, {'signed' if key else 'UNSIGNED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result.metrics(), indent=1))
    return 0
