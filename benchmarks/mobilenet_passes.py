"""MobileNet-style step: candidate formulations of its elementwise-heavy pieces, side by side
(issue 13, branch mbgrad13).

Why: onnxruntime runs every elementwise node as one pass over the whole map, so on the
MobileNet-style step the depthwise weight gradient (per-offset Slice + Mul + ReduceSum) and
the BatchNorm / ReLU6 backward passes dominate, not the convolutions. Each form below is a
torch function of (x, g) exported alone with ``torch.onnx.export(dynamo=True)`` or, for the
depthwise weight gradient's two lowerings, the graph ``depthwise_grad.standalone`` builds;
each is checked against the first form, and timed in onnxruntime (1 thread) in
interleaved rounds as the CPU time of the calling thread (with one intra-op thread
onnxruntime runs every kernel on the caller's thread; on this shared 2-core machine wall
time doubles under load while the thread's CPU time does not). Main's form comes first in every row.
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
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from _util import machine, write_json  # noqa: E402

from edgefed.train_export import batch_norm, decompositions, depthwise_grad  # noqa: E402

# (N, C, H, W) of the zoo MobileNet's three depthwise layers at scale 'bench', batch 32
SHAPES = [(32, 64, 16, 16), (32, 128, 8, 8), (32, 96, 8, 8)]


def _dw_slices(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The per-offset Slice + Mul + ReduceSum form (what wide maps keep): the exporter's
    depthwise 3x3 weight gradient traced with the marker's width limit at 0."""
    old, depthwise_grad.ROWS_MAX_WIDTH = depthwise_grad.ROWS_MAX_WIDTH, 0
    try:
        c = int(x.shape[1])
        return decompositions._weight_grad(g, x, (c, 1, 3, 3), [1, 1], [1, 1], [1, 1], c)
    finally:
        depthwise_grad.ROWS_MAX_WIDTH = old


def _dw_lowered(form: str) -> Callable[[tuple[int, ...]], onnx.ModelProto]:
    """The marker's lowering ``form`` (depthwise_grad.py) for a (N, C, H, W) shape."""
    return lambda s: depthwise_grad.standalone(s[1], s[2], s[3], (3, 3), (1, 1), (1, 1), form)


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


Form = Callable[..., torch.Tensor] | Callable[[tuple[int, ...]], onnx.ModelProto]


def session(fn: Form, args: tuple[torch.Tensor, ...], lowered: bool) -> Any:
    """``fn`` exported alone, or (``lowered``) the ONNX graph ``fn`` builds for the shape."""
    if lowered:
        model = fn(tuple(args[0].shape))
    else:
        with torch.no_grad():
            model = torch.onnx.export(_Fn(fn), args, dynamo=True, verbose=False).model_proto
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare(
    forms: dict[str, Form],
    args: tuple[torch.Tensor, ...],
    rounds: int,
    reps: int,
    lowered: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Median ms per form (see :func:`compare_rounds`)."""
    rounds_ms = compare_rounds(forms, args, rounds, reps, lowered)
    return {k: float(np.median(v)) for k, v in rounds_ms.items()}


def compare_rounds(
    forms: dict[str, Form],
    args: tuple[torch.Tensor, ...],
    rounds: int,
    reps: int,
    lowered: frozenset[str] = frozenset(),
) -> dict[str, list[float]]:
    """Per form, the thread-CPU ms of each interleaved round (outputs checked equal first).
    ``lowered``: the forms that build an ONNX graph (inputs g, x) instead of a function of
    (x, g, ...)."""
    sess = {k: session(f, args, k in lowered) for k, f in forms.items()}
    feeds = {
        k: {"g": args[1].numpy(), "x": args[0].numpy()}
        if k in lowered
        else {i.name: a.numpy() for i, a in zip(s.get_inputs(), args, strict=True)}
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
            {
                "slices": _dw_slices,
                "rows (default graph)": _dw_lowered("rows"),
                "stacked nchwc.Conv (NCHWc variant)": _dw_lowered("stacked"),
            },
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
            lowered = frozenset(k for k in forms if k.startswith(("rows", "stacked")))
            ms = compare(forms, make(shape), a.rounds, a.reps, lowered)
            rows.append({"piece": piece, "shape": list(shape), **ms})
            print(f"{piece} {shape}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    print("load", os.getloadavg())
    write_json("mobilenet_passes", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
