"""MobileNet-style step: the non-depthwise convolution backward, candidate ONNX forms side by
side (issue 13, branch wgrad13).

Why: after the depthwise weight gradient, the step's convolution backward time is in the
strided k x k weight gradients (im2col: kh*kw strided Slices, copied element by element by
onnxruntime), the 1x1 weight and input gradients and the strided input gradient
(ConvTranspose). Each form is a torch function exported alone (dynamo), checked equal to
the first form of its row (main's), and timed in onnxruntime at 1 thread in interleaved
rounds as the calling thread's CPU time (``mobilenet_passes.compare_rounds``). Shapes are
the zoo MobileNet's at scale 'bench', batch 32. Forms marked "rejected" lost and are kept
here so the record can be re-measured.
Run: PYTHONPATH=. python benchmarks/conv_backward_forms.py [--rounds 9] [--reps 5]
Writes benchmarks/out/conv_backward_forms.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from _util import machine, write_json  # noqa: E402
from mobilenet_passes import compare_rounds  # noqa: E402

from edgefed.train_export import conv_grads, decompositions  # noqa: E402

aten = torch.ops.aten
Form = Callable[..., torch.Tensor]
BATCH = 32
# (c_in, c_out, k, stride, padding, input size): the stem and the 16 -> 32 downsampling conv
STRIDED = [(3, 16, 3, 2, 1, 32), (16, 32, 3, 2, 1, 16)]
# (c_in, c_out, map size): the 1x1 expand / project layers and the SE convs (1x1 maps)
POINTWISE = [(16, 64, 16), (64, 16, 16), (32, 128, 8), (128, 32, 8), (32, 96, 8), (96, 32, 8)]
SE = [(96, 24, 1), (24, 96, 1)]


def _no_s2d(*_: object) -> list[torch.Tensor]:
    return []


def wg_im2col(geom: tuple[int, ...], s2d: bool) -> Form:
    """The exporter's strided weight gradient (s2d False: main's strided slices)."""
    ci, co, k, s, p, _ = geom

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        old = conv_grads.strided_patches
        if not s2d:
            conv_grads.strided_patches = _no_s2d  # type: ignore[assignment]
        try:
            return decompositions._weight_grad(g, x, (co, ci, k, k), [s, s], [p, p], [1, 1], 1)
        finally:
            conv_grads.strided_patches = old

    return fn


def wg_batch_as_channels(geom: tuple[int, ...]) -> Form:
    """Rejected: one Conv of x [C, N, H, W] by g [O, N, Ho, Wo] (stride/dilation swapped)."""
    _, _, k, s, p, _ = geom

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        xt, gt = x.transpose(0, 1), g.transpose(0, 1)
        out = aten.convolution.default(xt, gt, None, [1, 1], [p, p], [s, s], False, [0, 0], 1)
        return out[:, :, :k, :k].transpose(0, 1)

    return fn


def wg_s2d_per_tap_gemm(geom: tuple[int, ...]) -> Form:
    """Rejected: the space-to-depth windows, one GEMM per kernel offset (no Concat)."""
    ci, co, k, s, p, _ = geom

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ho, wo = int(g.shape[2]), int(g.shape[3])
        cols = conv_grads.strided_patches(x, (ho, wo), (k, k), [s, s], [p, p], [1, 1])
        gm = g.transpose(0, 1).reshape(co, -1)
        outs = [torch.mm(gm, c.reshape(ci, -1).t()) for c in cols]
        return torch.stack(outs, 2).reshape(co, ci, k, k)

    return fn


def pw_wg_bmm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """main's 1x1 weight gradient: per-sample bmm, then ReduceSum over the batch."""
    n, co, ci = x.shape[0], int(g.shape[1]), int(x.shape[1])
    out = torch.bmm(g.reshape(n, co, -1), x.reshape(n, ci, -1).transpose(1, 2)).sum(0)
    return out.reshape(co, ci, 1, 1)


def pw_wg_exporter(ci: int, co: int) -> Form:
    """This checkout's exporter (its dispatch: bmm + ReduceSum, one GEMM on 1x1 maps)."""

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return decompositions._weight_grad(g, x, (co, ci, 1, 1), [1, 1], [0, 0], [1, 1], 1)

    return fn


def pw_wg_channel_major(ci: int, co: int) -> Form:
    """Rejected: one GEMM over channel-major transposed operands."""

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        go, xs = g.transpose(0, 1).reshape(co, -1), x.transpose(0, 1).reshape(ci, -1)
        return torch.mm(go, xs.t()).reshape(co, ci, 1, 1)

    return fn


def pw_wg_nhwc(ci: int, co: int) -> Form:
    """Rejected: one GEMM over channels-last operands."""

    def fn(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        go, xs = g.permute(0, 2, 3, 1).reshape(-1, co), x.permute(0, 2, 3, 1).reshape(-1, ci)
        return torch.mm(go.t(), xs).reshape(co, ci, 1, 1)

    return fn


def pw_ig_bmm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """main's 1x1 input gradient: bmm by the weight expanded per sample."""
    n, o = g.shape[0], int(w.shape[0])
    wt = w.reshape(o, -1).t()
    out = torch.bmm(wt.expand(n, *wt.shape), g.reshape(n, o, -1))
    return out.reshape(n, -1, int(g.shape[2]), int(g.shape[3]))


def pw_ig_conv(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return conv_grads.pointwise_input_grad(g, w)


def ig_conv_transpose(
    g: torch.Tensor, w: torch.Tensor, stride: int = 1, pad: int = 0
) -> torch.Tensor:
    return aten.convolution.default(
        g, w, None, [stride] * 2, [pad] * 2, [1, 1], True, [1, 1] if stride > 1 else [0, 0], 1
    )


def ig_strided_main(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ig_conv_transpose(g, w, 2, 1)


def ig_subpixel(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rejected: the stride-2 3x3 (padding 1) input gradient as one stride-1 2x2 Conv to
    4x the channels (phase kernels gathered from w) + depth-to-space."""
    o, c = int(w.shape[0]), int(w.shape[1])
    # phase r of each axis: taps (window offset 0, 1) read kernel rows (1, -) and (2, 0)
    idx = np.full((2, 2, 2, 2), 9, np.int64)
    taps = {(0, 0): 1, (1, 0): 2, (1, 1): 0}
    for (r, e), i in taps.items():
        for (rc, f), j in taps.items():
            idx[r, rc, e, f] = i * 3 + j
    wz = torch.cat([w.transpose(0, 1).reshape(c, o, 9), torch.zeros(c, o, 1)], 2)
    kc = wz[:, :, torch.tensor(idx.reshape(-1).tolist())].reshape(c, o, 2, 2, 2, 2)
    kc = kc.permute(2, 3, 0, 1, 4, 5).reshape(4 * c, o, 2, 2)
    out = aten.convolution.default(
        torch.nn.functional.pad(g, [0, 1, 0, 1]),
        kc,
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
    )
    n, ha = g.shape[0], int(g.shape[2])
    return out.reshape(n, 2, 2, c, ha, ha).permute(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * ha, 2 * ha)


def pieces(gen: torch.Generator) -> list[tuple[str, list, dict[str, Form], tuple]]:
    rows: list[tuple[str, list, dict[str, Form], tuple]] = []
    for geom in STRIDED:
        ci, co, k, s, p, hw = geom
        ho = (hw + 2 * p - k) // s + 1
        args = (
            torch.randn(BATCH, ci, hw, hw, generator=gen),
            torch.randn(BATCH, co, ho, ho, generator=gen),
        )
        forms = {
            "strided slices (main)": wg_im2col(geom, False),
            "space-to-depth (wgrad13)": wg_im2col(geom, True),
            "s2d + GEMM per offset (rejected)": wg_s2d_per_tap_gemm(geom),
            "batch-as-channels Conv (rejected)": wg_batch_as_channels(geom),
        }
        rows.append(("strided_weight_grad", list(geom), forms, args))
        w = torch.randn(co, ci, k, k, generator=gen)
        if geom[0] > 3:  # the stem's input needs no gradient
            forms = {
                "ConvTranspose (main)": ig_strided_main,
                "sub-pixel Conv (rejected)": ig_subpixel,
            }
            rows.append(("strided_input_grad", list(geom), forms, (args[1], w)))
    for ci, co, hw in POINTWISE:
        x = torch.randn(BATCH, ci, hw, hw, generator=gen)
        g = torch.randn(BATCH, co, hw, hw, generator=gen)
        forms = {
            "bmm + ReduceSum (main)": pw_wg_bmm,
            "channel-major GEMM (rejected)": pw_wg_channel_major(ci, co),
            "channels-last GEMM (rejected)": pw_wg_nhwc(ci, co),
        }
        rows.append(("pointwise_weight_grad", [ci, co, hw], forms, (x, g)))
        forms = {"bmm, expanded W (main)": pw_ig_bmm, "1x1 Conv by W^T (wgrad13)": pw_ig_conv}
        rows.append(
            (
                "pointwise_input_grad",
                [ci, co, hw],
                forms,
                (g, torch.randn(co, ci, 1, 1, generator=gen)),
            )
        )
    for ci, co, hw in SE:
        x = torch.randn(BATCH, ci, hw, hw, generator=gen)
        g = torch.randn(BATCH, co, hw, hw, generator=gen)
        forms = {
            "bmm + ReduceSum (main)": pw_wg_bmm,
            "one GEMM (1x1 map, wgrad13)": pw_wg_exporter(ci, co),
        }
        rows.append(("se_weight_grad", [ci, co, hw], forms, (x, g)))
        forms = {"ConvTranspose (main)": ig_conv_transpose, "1x1 Conv by W^T (wgrad13)": pw_ig_conv}
        rows.append(
            ("se_input_grad", [ci, co, hw], forms, (g, torch.randn(co, ci, 1, 1, generator=gen)))
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated piece names")
    a = ap.parse_args()
    print(machine(), "load", os.getloadavg())
    only = {s for s in a.only.split(",") if s}
    out = []
    print(f"{'piece':24} {'shape':22} {'form':36} {'median ms':>9} {'range ms':>15}")
    for piece, shape, forms, args in pieces(torch.Generator().manual_seed(0)):
        if only and piece not in only:
            continue
        times = compare_rounds(forms, args, a.rounds, a.reps)
        for k, v in times.items():
            med, lo, hi = float(np.median(v)), min(v), max(v)
            out.append(
                {
                    "piece": piece,
                    "shape": shape,
                    "form": k,
                    "median_ms": med,
                    "min_ms": lo,
                    "max_ms": hi,
                }
            )
            print(f"{piece:24} {shape!s:22} {k:36} {med:9.3f} {lo:7.3f}-{hi:7.3f}", flush=True)
    print("load", os.getloadavg())
    write_json("conv_backward_forms", {"machine": machine(), "batch": BATCH, "rows": out})


if __name__ == "__main__":
    main()
