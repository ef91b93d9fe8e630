"""Stride-1 depthwise 2-D weight gradient: one marker node in the trace, two ONNX lowerings.

``dW[c, i, j] = sum_{n,h,w} xp[n, c, h + i*dh, w + j*dw] * g[n, c, h, w]`` (``xp``: the
layer input padded). The fastest ONNX form depends on the kernels of the onnxruntime that
runs the step, yet the step graph and its NCHWc variant (:mod:`.nchwc`) come from ONE trace
(tracing is most of the export time). So the trace keeps the gradient as one node,
``edgefed.marker::DepthwiseWeightGrad`` (the custom op :func:`depthwise_weight_grad`), and
the exported graph is lowered twice; no marker ever leaves the exporter:

* **rows** (:func:`lower_rows`, the default-domain step every onnxruntime runs, arm64
  included): per kernel row i ONE batched MatMul (batch = channels) of the row-shifted,
  channel-major padded input ``[C, Wp, N*Ho]`` by the gradient ``[C, N*Ho, Wo]``; the kernel
  columns are the diagonals ``w' = w + j*dw`` of that ``[C, Wp, Wo]`` product, read by one
  MatMul with a constant 0/1 band matrix. 8.8 -> 4.8 ms on 32x64x16x16 against per-offset
  Slice + Mul + ReduceSum (mbgrad13). The GEMM does ``Wp / kw`` times the direct
  multiply-adds, so wider maps keep the per-offset form (``ROWS_MAX_WIDTH``).
* **stacked** (:func:`lower_stacked`, the NCHWc variant on x86): ONE depthwise
  ``nchwc.Conv``. The batch is stacked along the height, every image padded to the pitch
  ``Hp``: input ``X[c, n*Hp + r, :] = xp[n, c, r, :]`` and kernel ``K[c, n*Hp + h, :] =
  g[n, c, h, :]`` (zero for ``h >= Ho``), so ``conv(X, K)`` with stride ``(dh, dw)`` sums
  exactly the products above and nothing across images. Both are built straight in the
  blocked layout (ReorderInput shared with the layer's other NCHWc convolutions, a Transpose
  of whole ``H x W x blk`` blocks, a Pad of the rows), and the kernel shape is read from the
  weight at run time, so the batch stays dynamic. Microbenchmark (1 thread, profiled, the
  MobileNet step's shapes): 32x64x16x16 3.6 -> 2.4 ms, 32x128x8x8 2.6 -> 1.1 ms without the
  shared reorders. Why not batch x channels as groups (``[1, N*C, H, W]``, faster still):
  the group count would fix the batch size, and the step's batch is dynamic.

The eager implementation calls torch's own convolution backward: the verification gate
compares every lowered graph with torch autograd, so a mistake in a lowering cannot ship.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from onnx.defs import OpSchema
from onnxscript import FLOAT, values
from torch import Tensor

from .onnx_builder import NCHWC_DOMAIN, Builder, nchwc_block_size, with_nodes

aten = torch.ops.aten

MARKER_DOMAIN = "edgefed.marker"
MARKER_OP = "DepthwiseWeightGrad"
ROWS_MAX_WIDTH = 64  # wider padded rows keep the per-offset form: the GEMM does ~Wp / kw times
# the direct multiply-adds; 15.3 -> 10.1 ms at width 28, 38.2 -> 23.6 at 56, 13.8 vs 14.4 at 112
_GEOMETRY = ("kh", "kw", "ph", "pw", "dh", "dw", "c", "h", "w", "ho", "wo")


def applies(x: Tensor, stride: Any, padding: Any) -> bool:
    """Whether a depthwise layer's weight gradient takes the marker (stride 1, narrow map)."""
    return list(stride) == [1, 1] and int(x.shape[3]) + 2 * int(padding[1]) <= ROWS_MAX_WIDTH


@torch.library.custom_op("edgefed::depthwise_weight_grad", mutates_args=())
def depthwise_weight_grad(
    grad_out: Tensor, x: Tensor, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int
) -> Tensor:
    """Eager: torch's own convolution backward (stride 1, groups = channels)."""
    c = int(x.shape[1])
    w = x.new_empty(c, 1, kh, kw)
    return aten.convolution_backward.default(
        grad_out, x, w, None, [1, 1], [ph, pw], [dh, dw], False, [0, 0], c, [False, True, False]
    )[1]


@depthwise_weight_grad.register_fake
def _(grad_out: Tensor, x: Tensor, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int) -> Tensor:
    return x.new_empty(int(x.shape[1]), 1, kh, kw)


@functools.cache
def _marker() -> Any:
    schema = OpSchema(
        MARKER_OP,
        MARKER_DOMAIN,
        1,
        inputs=[OpSchema.FormalParameter("grad_out", "T"), OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("grad_weight", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in _GEOMETRY],
    )
    return values.Op(values.Opset(MARKER_DOMAIN, 1), MARKER_OP, schema)


@functools.cache
def onnx_translations() -> dict[Any, Any]:
    """{custom op: onnxscript function} for the exporter's registry: the marker node, with
    the layer's static geometry as attributes (the lowerings need no shape inference)."""

    def marker(g: FLOAT, x: FLOAT, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int) -> FLOAT:
        c, h, w = (int(d) for d in x.shape[1:])
        ho, wo = (int(d) for d in g.shape[2:])
        geometry = dict(kh=kh, kw=kw, ph=ph, pw=pw, dh=dh, dw=dw, c=c, h=h, w=w, ho=ho, wo=wo)
        return _marker()(g, x, **geometry)

    return {torch.ops.edgefed.depthwise_weight_grad.default: marker}


def geometry(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: int(a.i) for a in node.attribute}


def is_marker(node: onnx.NodeProto) -> bool:
    return node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP


def _band(wp: int, wo: int, kw: int, dil: int) -> np.ndarray:
    """B (wp * wo, kw): B[(w + j * dil) * wo + w, j] = 1, the j-th diagonal of a (wp, wo) map."""
    b = np.zeros((wp * wo, kw), np.float32)
    for j in range(kw):
        for w in range(wo):
            b[(w + j * dil) * wo + w, j] = 1.0
    return b


def lower_rows(b: Builder, node: onnx.NodeProto) -> None:
    """The default-domain form (module docstring): kh batched GEMMs + one band MatMul."""
    g, x = node.input[0], node.input[1]
    d = geometry(node)
    c, kh, kw, ho, wo, dh = d["c"], d["kh"], d["kw"], d["ho"], d["wo"], d["dh"]
    wp = d["w"] + 2 * d["pw"]
    xt = b.node("Transpose", [x], perm=[1, 0, 2, 3])  # C, N, H, W
    if d["ph"] or d["pw"]:
        pads = [0, 0, d["ph"], d["pw"], 0, 0, d["ph"], d["pw"]]
        xt = b.node("Pad", [xt, b.ints("pads", pads)])  # C, N, Hp, Wp
    gt = b.node("Transpose", [g], perm=[1, 0, 2, 3])
    gt = b.node("Reshape", [gt, b.ints("shape", [c, -1, wo])])  # C, N*Ho, Wo
    rows_shape, flat = b.ints("shape", [c, -1, wp]), b.ints("shape", [c, 1, wp * wo])
    rows = []
    for i in range(kh):
        xi = b.node(
            "Slice", [xt, b.ints("st", [i * dh]), b.ints("en", [i * dh + ho]), b.ints("ax", [2])]
        )
        xi = b.node(
            "Transpose", [b.node("Reshape", [xi, rows_shape])], perm=[0, 2, 1]
        )  # C, Wp, N*Ho
        rows.append(b.node("Reshape", [b.node("MatMul", [xi, gt]), flat]))  # C, 1, Wp*Wo
    m = b.node("Concat", rows, axis=1) if kh > 1 else rows[0]  # C, kh, Wp*Wo
    prod = b.node("MatMul", [m, b.const("band", _band(wp, wo, kw, d["dw"]))])
    b.node_to("Reshape", [prod, b.ints("shape", [c, 1, kh, kw])], node.output[0])


def stacked_applies(node: onnx.NodeProto, channels_multiple: int) -> bool:
    return geometry(node)["c"] % channels_multiple == 0


def lower_stacked(b: Builder, node: onnx.NodeProto, blk: str, blocked: dict[str, str]) -> None:
    """The NCHWc form (module docstring): ONE depthwise ``nchwc.Conv`` over the batch stacked
    along the height, in the blocked layout. ``blk``: the graph's int64 [1] block-size
    tensor; ``blocked``: NCHW tensor -> its ReorderInput output, shared with other nodes."""
    g, x = node.input[0], node.input[1]
    d = geometry(node)
    c, kh, dh = d["c"], d["kh"], d["dh"]
    hp = d["h"] + 2 * d["ph"]
    c_blocks = b.node("Div", [b.ints("c", [c]), blk])

    def stack(
        t: str, rows: int, width: int, pad_top: int, pad_bottom: int, shape: list[int]
    ) -> str:
        if t not in blocked:
            blocked[t] = b.node("ReorderInput", [t], NCHWC_DOMAIN)
        w_blk = b.node("Mul", [b.ints("w", [width]), blk])
        s = b.node("Concat", [b.ints("m1", [-1]), c_blocks, b.ints("r", [rows]), w_blk], axis=0)
        # [N, C/blk, rows, width*blk] -> [C/blk, N, rows, width*blk]: whole blocks move
        t = b.node("Transpose", [b.node("Reshape", [blocked[t], s])], perm=[1, 0, 2, 3])
        if pad_top or pad_bottom:
            t = b.node("Pad", [t, b.ints("pads", [0, 0, pad_top, 0, 0, 0, pad_bottom, 0])])
        return b.node("Reshape", [t, b.ints("shape", shape)])  # rows stacked, still blocked

    xs = stack(x, d["h"], d["w"], d["ph"], d["ph"], [1, c, -1, d["w"]])  # 1, C, N*Hp, W
    ks = stack(g, d["ho"], d["wo"], 0, hp - d["ho"], [c, 1, -1, d["wo"]])  # OIHWBo, I = 1
    pads = [0, d["pw"], (kh - 1) * dh, d["pw"]]
    y = b.node("Conv", [xs, ks], NCHWC_DOMAIN, group=c, pads=pads, strides=[dh, d["dw"]])
    y = b.node("ReorderOutput", [y], NCHWC_DOMAIN, channels=c)  # 1, C, kh, kw
    b.node_to("Reshape", [y, b.ints("shape", [c, 1, kh, d["kw"]])], node.output[0])


def lower_all(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every marker in the rows form (the default-domain step graph)."""
    if not any(is_marker(n) for n in model.graph.node):
        return model
    b = Builder("dwgrad")
    nodes: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if not is_marker(n):
            nodes.append(n)
            continue
        b.nodes = []
        lower_rows(b, n)
        nodes.extend(b.nodes)
    out = with_nodes(model, nodes, b.inits)
    drop_marker_opset(out)
    return out


def standalone(
    c: int, h: int, w: int, kernel: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], form: str,
) -> onnx.ModelProto:  # fmt: skip
    """One weight gradient alone, lowered to ``form`` ("rows" or "stacked"), as a graph
    ``(g [n, c, ho, wo], x [n, c, h, w]) -> dw [c, 1, kh, kw]`` with a dynamic batch: what
    the tests and ``benchmarks/mobilenet_passes.py`` run."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    geom = dict(kh=kh, kw=kw, ph=ph, pw=pw, dh=dh, dw=dw, c=c, h=h, w=w, ho=ho, wo=wo)
    node = helper.make_node(MARKER_OP, ["g", "x"], ["dw"], domain=MARKER_DOMAIN, **geom)
    b = Builder("dwgrad")
    if form == "rows":
        lower_rows(b, node)
    elif form == "stacked":
        lower_stacked(b, node, nchwc_block_size(b), {})
    else:
        raise ValueError(f"form {form!r}: expected 'rows' or 'stacked'")
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        b.nodes,
        "depthwise_weight_grad",
        [
            helper.make_tensor_value_info("g", f32, ["n", c, ho, wo]),
            helper.make_tensor_value_info("x", f32, ["n", c, h, w]),
        ],
        [helper.make_tensor_value_info("dw", f32, [c, 1, kh, kw])],
        b.inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(NCHWC_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def drop_marker_opset(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


__all__ = [
    "MARKER_DOMAIN",
    "ROWS_MAX_WIDTH",
    "applies",
    "depthwise_weight_grad",
    "drop_marker_opset",
    "is_marker",
    "lower_all",
    "lower_rows",
    "lower_stacked",
    "onnx_translations",
    "stacked_applies",
    "standalone",
]
