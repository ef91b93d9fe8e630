"""Digits (sklearn, offline): test accuracy of onnxruntime-trained vs torch-trained models.

Same initial weights, same batch order (device_agent.dataset.batch_order), 5 epochs of SGD
(momentum 0.9, lr 0.05, batch 32). Target (issue 4): accuracies equal within 0.5 pp.
Run: PYTHONPATH=. python benchmarks/train_accuracy.py   -> benchmarks/out/train_accuracy.json
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from device_agent.dataset import batch_order
from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, export_training_step
from edgefed.zoo.models import digits_cnn, digits_mlp

OUT = Path(__file__).parent / "out"
EPOCHS, BATCH, LR, SEED = 5, 32, 0.05, 0


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def run(name: str, make, shape: tuple[int, ...]) -> dict:
    xtr, ytr, xte, yte = data()
    xtr, xte = xtr.reshape(-1, *shape), xte.reshape(-1, *shape)
    torch.manual_seed(0)
    model = make()
    init = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    g = export_training_step(
        model, (torch.from_numpy(xtr[:8]), torch.from_numpy(ytr[:8])), optimizer=SGD(momentum=0.9)
    )
    export_s = time.perf_counter() - t0

    tr = StepTrainer(g.onnx, g.manifest, inference_onnx=g.inference_onnx)
    tr.set_params(init)
    t0 = time.perf_counter()
    tr.train_epochs(xtr, ytr, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=SEED)
    ort_s = time.perf_counter() - t0
    ort_acc = tr.accuracy(xte, yte)

    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    t0 = time.perf_counter()
    for _, idx in batch_order(len(xtr), EPOCHS, BATCH, SEED):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            ref(torch.from_numpy(xtr[idx])), torch.from_numpy(ytr[idx])
        )
        loss.backward()
        opt.step()
    torch_s = time.perf_counter() - t0
    with torch.no_grad():
        torch_acc = float((ref.eval()(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    p = tr.params
    diff = max(float(np.abs(p[k] - v.numpy()).max()) for k, v in ref.state_dict().items())
    res = {
        "model": name,
        "ort_acc": ort_acc,
        "torch_acc": torch_acc,
        "diff_pp": abs(ort_acc - torch_acc) * 100,
        "param_max_abs_diff": diff,
        "ort_train_s": ort_s,
        "torch_train_s": torch_s,
        "export_s": export_s,
    }
    print(
        f"{name:12s} ORT acc {ort_acc:.4f}  torch acc {torch_acc:.4f}  diff {res['diff_pp']:.2f} pp"
        f"  param max|diff| {diff:.2e}  train s ORT {ort_s:.2f} / torch {torch_s:.2f}",
        flush=True,
    )
    return res


def main() -> None:
    torch.set_num_threads(1)  # both sides single-threaded: training time is informational
    rows = [run("digits MLP", digits_mlp, (64,)), run("digits CNN", digits_cnn, (1, 8, 8))]
    print("\n| model | ORT test acc | torch test acc | diff (pp) | param max abs diff | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['ort_acc']:.4f} | {r['torch_acc']:.4f} | {r['diff_pp']:.2f} | "
            f"{r['param_max_abs_diff']:.2e} | <= 0.5 pp |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "train_accuracy.json").write_text(
        json.dumps({"epochs": EPOCHS, "batch": BATCH, "lr": LR, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
