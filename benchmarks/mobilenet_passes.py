"""MobileNet-style step: candidate formulations of its elementwise-heavy pieces, side by side
(issue 13, branch mbgrad13).

Why: onnxruntime runs every elementwise node as one pass over the whole map, so on the
MobileNet-style step the depthwise weight gradient (per-offset Slice + Mul + ReduceSum) and
the BatchNorm / ReLU6 backward passes dominate, not the convolutions. Each form below is a
torch function of (x, g) exported alone with ``torch.onnx.export(dynamo=True)``, checked
against the first form, and timed in onnxruntime (1 thread) in interleaved rounds as the
CPU time of the calling thread (with one intra-op thread onnxruntime runs every kernel on
the caller's thread; on this shared 2-core machine wall time doubles under load while the
thread's CPU time does not). Main's form comes first in every row.
Run: PYTHONPATH=. python benchmarks/mobilenet_passes.py [--rounds 9]
Writes benchmarks/out/mobilenet_passes.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from _util import machine, write_json  # noqa: E402

from edgefed.train_export import batch_norm, conv_grads, decompositions  # noqa: E402

# (N, C, H, W) of the zoo MobileNet's three depthwise layers at scale 'bench', batch 32
SHAPES = [(32, 64, 16, 16), (32, 128, 8, 8), (32, 96, 8, 8)]


def _dw(rows_limit: int) -> Callable[..., torch.Tensor]:
    """The exporter's depthwise 3x3 weight gradient with ``ROWS_MAX_WIDTH`` set for the trace
    (0: main's per-offset Slice + Mul + ReduceSum form)."""

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        old, conv_grads.ROWS_MAX_WIDTH = conv_grads.ROWS_MAX_WIDTH, rows_limit
        try:
            c = int(x.shape[1])
            return decompositions._weight_grad(g, x, (c, 1, 3, 3), [1, 1], [1, 1], [1, 1], c)
        finally:
            conv_grads.ROWS_MAX_WIDTH = old

    return fn


def affine_mul_add(xc: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return xc * b.reshape(1, -1, 1, 1) + c.reshape(1, -1, 1, 1)


def affine_bn(xc: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return batch_norm._affine(xc, b, c)


def hardswish_decomposed(x: torch.Tensor) -> torch.Tensor:
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def hardswish_op(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.hardswish(x)


class _Fn(nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *a: torch.Tensor) -> torch.Tensor:
        return self.fn(*a)


def session(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        prog = torch.onnx.export(_Fn(fn), args, dynamo=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(
        prog.model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def compare(
    forms: dict[str, Callable[..., torch.Tensor]],
    args: tuple[torch.Tensor, ...],
    rounds: int,
    reps: int,
) -> dict[str, float]:
    """Median ms per form (see :func:`compare_rounds`)."""
    return {k: float(np.median(v)) for k, v in compare_rounds(forms, args, rounds, reps).items()}


def compare_rounds(
    forms: dict[str, Callable[..., torch.Tensor]],
    args: tuple[torch.Tensor, ...],
    rounds: int,
    reps: int,
) -> dict[str, list[float]]:
    """Per form, the thread-CPU ms of each interleaved round (outputs checked equal first)."""
    sess = {k: session(f, args) for k, f in forms.items()}
    feeds = {
        k: {i.name: a.numpy() for i, a in zip(s.get_inputs(), args, strict=True)}
        for k, s in sess.items()
    }
    ref = None
    for k, s in sess.items():
        out = s.run(None, feeds[k])[0]
        ref = out if ref is None else ref
        err = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-30))
        if err > 1e-4:
            raise SystemExit(f"form {k}: relative difference {err:.2e} from the first form")
    times: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            t = time.thread_time()  # 1 intra-op thread: kernels run on this thread
            for _ in range(reps):
                s.run(None, feeds[k])
            times[k].append((time.thread_time() - t) / reps * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rows = []
    print(machine(), "load", os.getloadavg())
    gen = torch.Generator().manual_seed(0)
    pieces: list[tuple[str, dict[str, Callable[..., torch.Tensor]], Callable[..., tuple]]] = [
        (
            "dw_weight_grad",
            {"slices (main)": _dw(0), "rows (mbgrad13)": _dw(conv_grads.ROWS_MAX_WIDTH)},
            lambda s: (torch.randn(*s, generator=gen) + 3.0, torch.randn(*s, generator=gen)),
        ),
        (
            "bn_affine",
            {"Mul+Add (main)": affine_mul_add, "BatchNormalization (mbgrad13)": affine_bn},
            lambda s: (
                torch.randn(*s, generator=gen),
                torch.randn(s[1], generator=gen),
                torch.randn(s[1], generator=gen),
            ),
        ),
        (
            "hardswish_fwd",
            {"decomposed (main)": hardswish_decomposed, "HardSwish (mbgrad13)": hardswish_op},
            lambda s: (torch.randn(*s, generator=gen) * 3.0,),
        ),
    ]
    for piece, forms, make in pieces:
        for shape in SHAPES:
            ms = compare(forms, make(shape), a.rounds, a.reps)
            rows.append({"piece": piece, "shape": list(shape), **ms})
            print(f"{piece} {shape}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    print("load", os.getloadavg())
    write_json("mobilenet_passes", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
