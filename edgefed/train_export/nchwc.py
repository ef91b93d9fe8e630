"""An alternative step graph whose depthwise convolutions run onnxruntime's NCHWc kernels.

Why: onnxruntime's grouped Conv with the weight as a graph INPUT (a training step's weights
always are) runs one im2col + GEMV per sample and channel; its NCHWc depthwise kernel is
only picked by the graph optimizer for CONSTANT weights (1.6 vs 9.9 ms on 32x64x16x16).
The ``com.microsoft.nchwc`` kernels themselves accept non-constant weights when the graph
reorders them: ``ReorderInput(x) -> nchwc.Conv(xb, wb) -> ReorderOutput``, with ``wb`` the
depthwise weight ``[C, 1, kh, kw]`` reshaped ``[C/blk, blk, kh, kw]``, transposed to
``[C/blk, kh, kw, blk]`` and reshaped back. The block size ``blk`` (16 with AVX-512, 8 with
AVX2) is read INSIDE the graph: ``Shape(ReorderInput(zeros[1, 4, 1, 1]))[1]``, so one graph
serves every machine whose onnxruntime has the NCHWc kernels.

Design (one dispatch point, a reference path always there, like MLAS):
* The shipped step graph stays default-domain (any onnxruntime build, arm64 included, runs
  it). This module rewrites a COPY: depthwise forward Convs, stride-1 depthwise
  ConvTransposes (the input gradient, as a Conv with the flipped kernel), group-1 k x k
  forward Convs (k > 1; weight reordered OIhw -> OIhw{blk}i{blk}o the same way) and
  3-channel stems (NCHW input, only the output blocked) become NCHWc nodes, and so do the
  stride-1 depthwise weight gradients the trace left as markers (one stacked depthwise
  ``nchwc.Conv`` each, :func:`.depthwise_grad.lower_stacked`; markers with channels not a
  multiple of 16 get the default graph's rows form); one ReorderInput serves every NCHWc
  consumer of a tensor. 1x1 pointwise convolutions stay:
  reordering their input and output costs more than they gain (see ``KINDS``). The
  exporter's gate checks the copy in the same pass as the step graph, against the same
  torch reference (:func:`.verify.verify_step_variants`), and drops it when it fails or
  onnxruntime here cannot load it.
* The copy travels INSIDE the step graph's bytes, as the model metadata entry
  ``edgefed.alt.nchwc`` (the serialized alternative, zlib + base64): wherever the step goes
  (coordinator task, device state, artefacts) the alternative goes with it, with no new
  message part, file or manifest key to carry. onnxruntime ignores metadata; the torch-free
  trainer reads it through ``InferenceSession.get_modelmeta()`` (no ``onnx`` on the device).
* The trainer (device_agent.trainer) loads the alternative, runs it once against the
  default graph on the first batch, and falls back (logged) to the default graph when the
  alternative does not load, does not run or disagrees.
* Graphs with random nodes (dropout) get no alternative: the one-batch check could not
  compare them.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
import onnx
from onnx import helper

from . import depthwise_grad
from .onnx_builder import NCHWC_DOMAIN, Builder, nchwc_block_size, with_nodes

DOMAIN = NCHWC_DOMAIN
METADATA_KEY = "edgefed.alt.nchwc"
MIN_CHANNELS_MULTIPLE = 16  # every NCHWc block size (8 AVX2, 16 AVX-512) divides it
MIN_BLOCK = 8  # the smallest block size: fewer input channels may stay NCHW
_RANDOM = ("RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Dropout")


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of graph inputs and of Identity chains from them (the weights' aliases)."""
    shapes: dict[str, list[int]] = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[i.name] = [d.dim_value for d in dims]
    for n in model.graph.node:
        if n.op_type == "Identity" and n.input[0] in shapes:
            shapes[n.output[0]] = shapes[n.input[0]]
    return shapes


def _kind(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> str | None:
    """Which NCHWc form suits a 2-D Conv/ConvTranspose, or None (it keeps the default op).

    ``depthwise``: group == channels, channels % 16 == 0 (forward Conv, or a stride-1
    ConvTranspose = the input gradient, run as a Conv with the kernel flipped).
    ``regular``: group 1 forward k x k Conv (k > 1, any stride), input and output channels
    % 16 == 0; ``pointwise``: the same with a 1x1 kernel. ``nchw``: group 1 forward Conv whose
    few input channels (< 8, a stem on an image) stay in NCHW: the kernel reads them
    directly, only the output is blocked. ConvTranspose with group 1 (here only tiny SE
    layers and strided input gradients) keeps the default op.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose"):
        return None
    a = _attrs(node)
    w = shapes.get(node.input[1])
    g = int(a.get("group", 1))  # type: ignore[call-overload]
    if w is None or len(w) != 4 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if node.op_type == "Conv" and g == 1 and w[0] % MIN_CHANNELS_MULTIPLE == 0:
        if w[1] % MIN_CHANNELS_MULTIPLE == 0:
            return "pointwise" if w[2:] == [1, 1] else "regular"
        return "nchw" if w[1] < MIN_BLOCK else None
    if g <= 1 or w[0] != g or w[1] != 1 or g % MIN_CHANNELS_MULTIPLE:
        return None
    if node.op_type == "ConvTranspose":
        k, d = w[2:], list(a.get("dilations", [1, 1]))  # type: ignore[call-overload]
        pads = list(a.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        if (
            list(a.get("strides", [1, 1])) != [1, 1]  # type: ignore[call-overload]
            or any(a.get("output_padding", [0, 0]))  # type: ignore[arg-type]
            or "output_shape" in a
            or any(p > d[i % 2] * (k[i % 2] - 1) for i, p in enumerate(pads))
        ):
            return None
    return "depthwise"


def _blocked_weight(b: Builder, w: str, shape: list[int], blk: str, kind: str, flip: bool) -> str:
    """The weight in the layout the NCHWc kernel reads, reordered in the graph.

    ``regular``: OIhw -> [O/blk, I/blk, kh, kw, blk_i, blk_o] (MLAS's OIHWBiBo);
    ``depthwise`` and ``nchw``: OIhw -> [O/blk, I, kh, kw, blk_o] (OIHWBo). Both are
    reshaped back to the 4-D [O, I, kh, kw] the kernel's shape inference expects.
    """
    _, i, kh, kw = shape
    if flip:  # ConvTranspose(stride 1) == Conv with the kernel turned by 180 degrees
        big = np.iinfo(np.int64).max
        w = b.node(
            "Slice",
            [
                w,
                b.const("st", np.array([-1, -1], np.int64)),
                b.const("en", np.array([-big, -big], np.int64)),
                b.const("ax", np.array([2, 3], np.int64)),
                b.const("sp", np.array([-1, -1], np.int64)),
            ],
        )
    m1, k = b.const("m1", np.array([-1], np.int64)), b.const("k", np.array([kh, kw], np.int64))
    if kind == "regular":
        i_blocks = b.node("Div", [b.const("i", np.array([i], np.int64)), blk])
        s1 = b.node("Concat", [m1, blk, i_blocks, blk, k], axis=0)
        perm = [0, 2, 4, 5, 3, 1]
    else:
        s1 = b.node("Concat", [m1, blk, b.const("i", np.array([i], np.int64)), k], axis=0)
        perm = [0, 2, 3, 4, 1]
    t = b.node("Transpose", [b.node("Reshape", [w, s1])], perm=perm)
    return b.node("Reshape", [t, b.const("wshape", np.array(shape, np.int64))])


# What the variant moves by default. Single-op microbenchmark (ORT 1 thread, batch 32, the
# MobileNet-style step's shapes, reorders included): depthwise 3x3 4.14 -> 1.05 ms, the
# strided 3x3 16->32 0.81 -> 0.41 ms, the 3-channel stem (NCHW input) 0.53 -> 0.28 ms; 1x1
# pointwise LOSES (0.38 -> 0.67, 0.46 -> 0.71 ms: reordering the input and output costs
# more than the GEMM it replaces), so "pointwise" is left out. "weight_grad": the stacked
# depthwise weight gradient, 2.4-2.6x faster than the rows form (depthwise_grad.py).
KINDS = frozenset({"depthwise", "regular", "nchw", "weight_grad"})


def nchwc_alternative(
    model: onnx.ModelProto, kinds: frozenset[str] = KINDS
) -> onnx.ModelProto | None:
    """The NCHWc variant of a step graph, or None when it has nothing to gain or is random.

    ``model``: the traced step, whose depthwise weight-gradient markers are lowered here
    (:mod:`.depthwise_grad`), or an already lowered one. ``kinds``: which convolution forms
    (see :func:`_kind`, and "weight_grad" for the markers) to move; all by default.
    """
    if any(n.op_type in _RANDOM for n in model.graph.node):
        return None
    shapes = _static_shapes(model)
    nodes = list(model.graph.node)
    targets = {i: k for i, n in enumerate(nodes) if (k := _kind(n, shapes)) in kinds}
    for i, n in enumerate(nodes):  # depthwise weight gradients traced as markers
        if depthwise_grad.is_marker(n):
            stacked = depthwise_grad.stacked_applies(n, MIN_CHANNELS_MULTIPLE)
            targets[i] = "weight_grad" if stacked and "weight_grad" in kinds else "rows"
    if not any(k != "rows" for k in targets.values()):
        return None
    b = Builder("nchwc")
    blk = nchwc_block_size(b)
    head = list(b.nodes)
    out_nodes: list[onnx.NodeProto] = []
    blocked: dict[str, str] = {}  # NCHW tensor -> its ReorderInput output (shared)
    for idx, n in enumerate(nodes):
        kind = targets.get(idx)
        if kind is None:
            out_nodes.append(n)
            continue
        b.nodes = []
        if kind in ("weight_grad", "rows"):
            if kind == "rows":
                depthwise_grad.lower_rows(b, n)
            else:
                depthwise_grad.lower_stacked(b, n, blk, blocked)
            out_nodes.extend(b.nodes)
            continue
        a = _attrs(n)
        w_shape = shapes[n.input[1]]
        c_out, kh, kw = w_shape[0], w_shape[2], w_shape[3]
        dil = list(a.get("dilations", [1, 1]))  # type: ignore[call-overload]
        pads = list(a.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        strides = list(a.get("strides", [1, 1]))  # type: ignore[call-overload]
        flip = n.op_type == "ConvTranspose"
        if flip:  # full correlation of the gradient: pads d*(k-1) - p on every side
            pads = [dil[i % 2] * ((kh, kw)[i % 2] - 1) - p for i, p in enumerate(pads)]
        wb = _blocked_weight(b, n.input[1], w_shape, blk, kind, flip)
        if kind == "nchw":
            xb = n.input[0]
        else:
            if n.input[0] not in blocked:
                blocked[n.input[0]] = b.node("ReorderInput", [n.input[0]], DOMAIN)
            xb = blocked[n.input[0]]
        ins = [xb, wb] + ([n.input[2]] if len(n.input) > 2 and n.input[2] else [])
        yb = b.node(
            "Conv", ins, DOMAIN, group=c_out if kind == "depthwise" else 1,
            kernel_shape=[kh, kw], pads=pads, strides=strides, dilations=dil,
        )  # fmt: skip
        b.nodes.append(
            helper.make_node("ReorderOutput", [yb], [n.output[0]], domain=DOMAIN, channels=c_out)
        )
        out_nodes.extend(b.nodes)
    alt = with_nodes(model, head + out_nodes, b.inits)
    del alt.metadata_props[:]
    depthwise_grad.drop_marker_opset(alt)
    alt.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return alt


def embed(step: bytes, alt: bytes) -> bytes:
    """The step graph with ``alt`` stored in its metadata: zlib-compressed (the variant
    repeats the step: 1.99 MB -> 100 KB for the MobileNet-style step) and base64-encoded
    (metadata values are strings)."""
    model = onnx.load_from_string(step)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = base64.b64encode(zlib.compress(alt, 9)).decode("ascii")
    return model.SerializeToString()


def embedded(step: bytes) -> onnx.ModelProto | None:
    """The alternative :func:`embed` stored in ``step``, or None (for tools and tests; the
    torch-free trainer reads it through onnxruntime's model metadata instead)."""
    meta = {p.key: p.value for p in onnx.load_from_string(step).metadata_props}
    if METADATA_KEY not in meta:
        return None
    return onnx.load_from_string(zlib.decompress(base64.b64decode(meta[METADATA_KEY])))


__all__ = ["DOMAIN", "METADATA_KEY", "embed", "embedded", "nchwc_alternative"]
