"""GRU / LSTM / RNN layers with a hand-written backward through time, for tracing the step.

Why: traced through torch's own decompositions, an ``nn.LSTM`` over 32 steps became ~2,000
tiny ONNX nodes (every gate, every step, forward and autograd's backward unrolled op by op):
onnxruntime ran the step at 0.44x torch eager (per-node overhead, not arithmetic) and the
export took ~30 s. Here each layer is ONE ``torch.autograd.Function`` whose

* forward projects the input for ALL steps with one matmul (``x @ W_ih^T`` over ``[T*N, I]``)
  and loops only the recurrent part (one Gemm + a few gate ops per step);
* backward precomputes every gate derivative for all steps at once, loops only what is truly
  sequential (``dh @ W_hh`` plus a few elementwise ops), then forms ``dW_ih``, ``dW_hh``, the
  biases and ``dx`` as ONE matmul / sum each over the stacked steps.

GRU / RNN: per-step tensors come from one Split (:func:`time_steps`) of a time-major
``[T, N, K]`` tensor and the backward loop is unrolled. LSTM (:func:`_lstm_forward`): every
tensor after the fused node is ``[T, K, N]`` (features before batch), the gates of all steps
come from ONE MatMul of ``[W_ih W_hh b]`` with ``[x; h_prev; 1]``, and both loops (cell
states, backward through time) are ONE ONNX Scan each (:func:`lstm_cells`,
:func:`lstm_bptt`): onnxruntime runs a Scan body cheaper than the same nodes unrolled.

Hooked in by :func:`rnn_mode` (a ``TorchFunctionMode`` catching ``torch.lstm`` / ``gru`` /
``rnn_tanh`` / ``rnn_relu``, which ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` call) while the step
and inference graphs are traced. Packed sequences, LSTM ``proj_size`` and inter-layer dropout in
train mode keep torch's path. The verification gate compares the result with torch's own
autograd like every other graph.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
from onnxscript import FLOAT
from onnxscript import ir as oir
from onnxscript.onnx_opset import opset18 as op
from torch import Tensor
from torch.overrides import TorchFunctionMode

_KINDS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "tanh", torch.rnn_relu: "relu"}


# torch's gate blocks in the order ONNX expects them (ONNX LSTM: i o f c; GRU: z r h)
_ONNX_GATES = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "tanh": [0], "relu": [0]}


@torch.library.custom_op("edgefed::rnn_seq", mutates_args=())
def rnn_seq(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
    kind: str,
    reverse: bool,
) -> Tensor:
    """All hidden states ``[T, N, H]`` of one direction of one layer (``c0``: LSTM only).

    Eager: torch's own kernel. Exported: one ONNX LSTM / GRU / RNN node (:func:`_rnn_seq_onnx`).
    """
    xs = x.flip(0) if reverse else x
    w = [w_ih, w_hh, b_ih, b_hh]
    rest = (True, 1, 0.0, False, False, False)
    with torch._C.DisableTorchFunction():  # never re-enter rnn_mode
        if kind == "lstm":
            y = torch.lstm(xs, (h0[None], c0[None]), w, *rest)[0]
        elif kind == "gru":
            y = torch.gru(xs, h0[None], w, *rest)[0]
        else:
            y = getattr(torch, f"rnn_{kind}")(xs, h0[None], w, *rest)[0]
    return (y.flip(0) if reverse else y).contiguous()


@rnn_seq.register_fake
def _(x: Tensor, h0: Tensor, *args: Any) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], h0.shape[-1])


def _rnn_seq_onnx(
    x: FLOAT,
    h0: FLOAT,
    c0: FLOAT,
    w_ih: FLOAT,
    w_hh: FLOAT,
    b_ih: FLOAT,
    b_hh: FLOAT,
    kind: str,
    reverse: bool,
) -> FLOAT:
    hid = int(w_hh.shape[1])
    rows = np.concatenate([np.arange(k * hid, (k + 1) * hid) for k in _ONNX_GATES[kind]])
    idx = op.Constant(value=oir.tensor(rows.astype(np.int64)))
    axis0 = op.Constant(value=oir.tensor(np.array([0], np.int64)))

    def onnx_order(t: FLOAT) -> FLOAT:
        return op.Gather(t, idx, axis=0)

    w = op.Unsqueeze(onnx_order(w_ih), axis0)
    r = op.Unsqueeze(onnx_order(w_hh), axis0)
    b = op.Unsqueeze(op.Concat(onnx_order(b_ih), onnx_order(b_hh), axis=0), axis0)
    h = op.Unsqueeze(h0, axis0)
    attrs = {"hidden_size": hid, "direction": "reverse" if reverse else "forward"}
    if kind == "lstm":
        y = op.LSTM(x, w, r, b, None, h, op.Unsqueeze(c0, axis0), **attrs)[0]
    elif kind == "gru":
        y = op.GRU(x, w, r, b, None, h, linear_before_reset=1, **attrs)[0]
    else:
        act = "Tanh" if kind == "tanh" else "Relu"
        y = op.RNN(x, w, r, b, None, h, activations=[act], **attrs)[0]
    return op.Squeeze(y, op.Constant(value=oir.tensor(np.array([1], np.int64))))


@torch.library.custom_op("edgefed::time_steps", mutates_args=())
def time_steps(x: Tensor) -> list[Tensor]:
    """``[T, N, K]`` -> T tensors ``[N, K]``.

    Exported as ONE Split of the ``[T*N, K]`` view. Per-step ``select`` became a Gather each,
    which onnxruntime rewrites to Split + one Squeeze per step (6 us each, 1 ms of a 32-step
    LSTM step).
    """
    return [t.clone() for t in x.unbind(0)]


@time_steps.register_fake
def _(x: Tensor) -> list[Tensor]:
    return [x.new_empty(x.shape[1:]) for _ in range(int(x.shape[0]))]


def _time_steps_onnx(x: FLOAT) -> Any:
    steps, rows, k = x.shape[0], x.shape[1], x.shape[2]
    # [T*rows, -1]: exactly one of rows / k is the dynamic batch (time- or feature-major)
    dims = [-1, int(k)] if isinstance(k, int) else [int(steps) * int(rows), -1]
    flat = op.Reshape(x, op.Constant(value=oir.tensor(np.array(dims, np.int64))))
    return op.Split(flat, axis=0, num_outputs=int(steps))


def _steps(x: Tensor) -> list[Tensor]:
    if int(x.shape[0]) == 1:  # a one-output Split is translated as a sequence: plain select
        return [x.select(0, 0)]
    return list(torch.ops.edgefed.time_steps.default(x.contiguous()))


@torch.library.custom_op("edgefed::matmul", mutates_args=())
def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul`` exported as ONE ONNX MatMul (which broadcasts batch dimensions).

    Traced, a batched or broadcast ``torch.matmul`` became Expand (a real copy in
    onnxruntime, 73 us for ``[32, 128, 32]``) + a batched MatMul + reshapes.
    """
    return torch.matmul(a, b).clone()


@matmul.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def _matmul_onnx(a: FLOAT, b: FLOAT) -> FLOAT:
    return op.MatMul(a, b)


@torch.library.custom_op("edgefed::lstm_cells", mutates_args=())
def lstm_cells(f: Tensor, u: Tensor, c0: Tensor, reverse: bool) -> Tensor:
    """Cell states ``c_t = f_t * c_{t-1} + u_t`` for all steps (``f``, ``u``: ``[T, H, N]``).

    Exported as ONE ONNX Scan (body Mul + Add) + one Add. Unrolled, the 2 nodes a step plus
    the Splits and the Concat cost 230 us for 32 steps; the Scan 180 us (microbenchmark, 1
    thread).
    """
    steps = int(f.shape[0])
    c, cs = c0, [None] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        c = f[t] * c + u[t]
        cs[t] = c
    return torch.stack(cs, 0)


@lstm_cells.register_fake
def _(f: Tensor, u: Tensor, c0: Tensor, reverse: bool) -> Tensor:
    return torch.empty_like(f)


@torch.library.custom_op("edgefed::lstm_bptt", mutates_args=())
def lstm_bptt(
    dh: Tensor,
    dc: Tensor,
    q: Tensor,
    bc: Tensor,
    f: Tensor,
    dnext: Tensor,
    xh: Tensor,
    w_hh: Tensor,
    want_dg: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM backward recurrence, feature-major: per step (against the direction)
    ``e = dc + dh * bc``, ``dg = [e; e; e; dh] * q``, ``dW += dg xh``,
    ``dh = W_hh^T dg + dnext``, ``dc = e * f``.

    Time-major: ``q [T, 4H, N]``, ``bc``, ``f``, ``dnext`` ``[T, H, N]`` (empty: no output
    gradient after the first step), ``xh [T, N, K]``.
    Returns ``(dg [T, 4H, N] (empty unless want_dg), dh, dc, dW [4H, K])``. Exported as ONE
    ONNX Scan: unrolled, the 6 nodes a step (+ Splits, Concat) took 1.9 ms for 32 steps, the
    Scan 1.35 ms (microbenchmark). ``dW`` accumulates in the loop (one small Gemm a step):
    the stacked ``dg`` then only has to exist when ``dx`` is wanted, and the batched MatMul
    + ReduceSum over ``[T, 4H, K]`` it replaces cost more than the 32 Gemms (microbenchmark).
    """
    steps = int(q.shape[0])
    dgs: list[Any] = [None] * steps
    dw = q.new_zeros(q.shape[1], xh.shape[2])
    for t in range(steps) if reverse else range(steps - 1, -1, -1):
        e = dc + dh * bc[t]
        dg = torch.cat([e, e, e, dh], 0) * q[t]
        dgs[t] = dg
        dw = torch.addmm(dw, dg, xh[t])
        dh = w_hh.t() @ dg if dnext.numel() == 0 else torch.addmm(dnext[t], w_hh.t(), dg)
        dc = e * f[t]
    return torch.stack(dgs, 0) if want_dg else q.new_empty(0), dh, dc, dw


@lstm_bptt.register_fake
def _(dh: Tensor, dc: Tensor, q: Tensor, *rest: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xh, want_dg = rest[3], rest[5]  # (bc, f, dnext, xh, w_hh, want_dg, reverse)
    dg = torch.empty_like(q) if want_dg else q.new_empty(0)
    return dg, torch.empty_like(dh), torch.empty_like(dc), q.new_empty(q.shape[1], xh.shape[2])


_SCAN_IDS = itertools.count()


def _scan(
    states: list[Any],
    scans: list[Any],
    nodes: list[onnx.NodeProto],
    body_io: tuple,
    reverse: bool,
    outer: dict[str, Any] | None = None,
) -> list[Any]:
    """One ONNX Scan node (outputs: final states, then the stacked scan outputs).

    onnxscript's ``op.Scan`` would declare ONE output (its output list is variadic), so the
    node is built directly and recorded by the exporter's current evaluator. ``outer``:
    {body name: value of the enclosing graph} read inside the body (a loop-invariant weight:
    as a Scan state it cost an Identity copy a step).
    """
    from onnxscript import evaluator
    from torch.onnx._internal.exporter._tensors import SymbolicTensor

    # body names must be unique in the whole model (SSA reaches into subgraphs)
    pre = f"scan{next(_SCAN_IDS)}_"
    nodes = [
        onnx.helper.make_node(
            n.op_type,
            [pre + i for i in n.input],
            [pre + o for o in n.output],
            **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
        )
        for n in nodes
    ]
    ins, outs = ([pre + n for n in names] for names in body_io)
    elem = int(scans[0].dtype) if scans[0].dtype is not None else onnx.TensorProto.FLOAT
    body = onnx.helper.make_graph(
        nodes,
        "body",
        [onnx.helper.make_tensor_value_info(n, elem, None) for n in ins],
        [onnx.helper.make_tensor_value_info(n, elem, None) for n in outs],
    )
    serde_log = logging.getLogger(oir.serde.__name__)
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # the outer names are unknown to the body alone
    try:
        graph = oir.serde.deserialize_graph(body)
    finally:
        serde_log.setLevel(level)
    for name, value in (outer or {}).items():
        # the body names it; deserialised alone it is a dangling placeholder: point every
        # use at the outer value itself (its final name is assigned by the exporter later)
        for bnode in graph:
            for i, v in enumerate(bnode.inputs):
                if v is not None and v.name == pre + name:
                    bnode.replace_input_with(i, value)
    rec = evaluator.default()
    n_out = len(outs)
    direction = [1 if reverse else 0]
    node = oir.Node(
        "",
        "Scan",
        inputs=[*states, *scans],
        attributes=[
            oir.AttrGraph("body", graph),
            oir.AttrInt64("num_scan_inputs", len(scans)),
            oir.AttrInt64s("scan_input_directions", direction * len(scans)),
            oir.AttrInt64s("scan_output_directions", direction * (n_out - len(states))),
        ],
        outputs=[SymbolicTensor(rec.opset) for _ in range(n_out)],
        version=16,
    )
    rec.nodes.append(node)
    return list(node.outputs)


def _lstm_cells_onnx(f: FLOAT, u: FLOAT, c0: FLOAT, reverse: bool) -> FLOAT:
    mk = onnx.helper.make_node
    nodes = [mk("Mul", ["f", "c"], ["fc"]), mk("Add", ["fc", "u"], ["c2"])]
    # the loop hands out f * c_{t-1} and the cells are ONE batched Add after it: the state
    # itself as a scan output needed an Identity copy a step
    fc = _scan([c0], [f, u], nodes, (["c", "f", "u"], ["c2", "fc"]), reverse)[1]
    return op.Add(fc, u)


def _lstm_bptt_onnx(
    dh: FLOAT,
    dc: FLOAT,
    q: FLOAT,
    bc: FLOAT,
    f: FLOAT,
    dnext: FLOAT,
    xh: FLOAT,
    w_hh: FLOAT,
    want_dg: bool,
    reverse: bool,
) -> Any:
    mk = onnx.helper.make_node
    nodes = [
        mk("Mul", ["dh", "bc"], ["hb"]),
        mk("Add", ["dc", "hb"], ["e"]),
        mk("Concat", ["e", "e", "e", "dh"], ["x"], axis=0),
        mk("Mul", ["x", "q"], ["dg"]),
        mk("Gemm", ["dg", "xh", "dw"], ["dw2"]),
        mk("Mul", ["e", "f"], ["dc2"]),
    ]
    has_dn = not (isinstance(dnext.shape[0], int) and int(dnext.shape[0]) == 0)
    nodes.append(mk("Gemm", ["w", "dg", "dn"] if has_dn else ["w", "dg"], ["dh2"], transA=1))
    outs = ["dh2", "dc2", "dw2"] + (["dg"] if want_dg else [])
    scans = [q, bc, f, dnext, xh] if has_dn else [q, bc, f, xh]
    io = (["dh", "dc", "dw", "q", "bc", "f"] + (["dn"] if has_dn else []) + ["xh"], outs)
    hid4, feat = int(q.shape[1]), int(xh.shape[2])
    dtype = q.dtype.numpy() if q.dtype is not None else np.float32
    dw0 = op.Constant(value=oir.tensor(np.zeros((hid4, feat), dtype)))
    # the backward runs against the direction of the forward
    res = _scan([dh, dc, dw0], scans, nodes, io, not reverse, {"w": w_hh})
    dg = res[3] if want_dg else op.Constant(value=oir.tensor(np.zeros((0,), dtype)))
    return dg, res[0], res[1], res[2]


def onnx_translations() -> dict[Any, Any]:
    """{custom op: onnxscript function} for the exporter's registry."""
    return {
        torch.ops.edgefed.rnn_seq.default: _rnn_seq_onnx,
        torch.ops.edgefed.time_steps.default: _time_steps_onnx,
        torch.ops.edgefed.lstm_cells.default: _lstm_cells_onnx,
        torch.ops.edgefed.matmul.default: _matmul_onnx,
        torch.ops.edgefed.lstm_bptt.default: _lstm_bptt_onnx,
    }


def _cat_time(parts: Sequence[Tensor], steps: int) -> Tensor:
    """Per-step ``[N, ...]`` tensors (time order) -> ``[T, N, ...]``: one Concat + one Reshape."""
    return torch.cat(list(parts), 0).reshape(steps, -1, *parts[0].shape[1:])


def _mm_sum(d: Tensor, x: Tensor) -> Tensor:
    """``d^T @ x`` over all steps: ``[T, N, G]``, ``[T, N, K]`` -> ``[G, K]`` (one MatMul).

    As ``(x^T @ d)^T``: the big ``[T*N, G]`` gradient is shared by ``dW_ih`` and ``dW_hh``, so
    onnxruntime materialised its transpose; transposing the small ``[K, G]`` result is cheap.
    """
    return (x.reshape(-1, x.shape[-1]).t() @ d.reshape(-1, d.shape[-1])).t()


def _next_dh(dg: Tensor, w_hh: Tensor, dout: list[Tensor] | None, nxt: int | None) -> Tensor:
    """dh of the step before: ``dg @ W_hh`` plus that step's output gradient, ONE Gemm."""
    return dg @ w_hh if nxt is None or dout is None else torch.addmm(dout[nxt], dg, w_hh)


def _input_grads(dgx: Tensor, x: Tensor, w_ih: Tensor, needs: Sequence[bool]) -> tuple:
    dx = (dgx.reshape(-1, dgx.shape[-1]) @ w_ih).reshape(x.shape) if needs[0] else None
    dw_ih = _mm_sum(dgx, x) if needs[3] else None
    db_ih = dgx.sum((0, 1)) if needs[5] else None
    return dx, dw_ih, db_ih


def _rnn_out(x, h, c, w_ih, w_hh, b_ih, b_hh, kind: str, reverse: bool) -> Tensor:
    """All hidden states ``[T, N, H]``: ONE ONNX LSTM / GRU / RNN node once exported."""
    zeros = w_hh.new_zeros(w_hh.shape[0])
    return torch.ops.edgefed.rnn_seq.default(
        x,
        h,
        h if c is None else c,
        w_ih,
        w_hh,
        zeros if b_ih is None else b_ih,
        zeros if b_hh is None else b_hh,
        kind,
        reverse,
    )


def _shifted(seq: Tensor, first: Tensor, reverse: bool, dim: int = 0) -> Tensor:
    """The previous step's value for every step along time axis ``dim``: ``first`` then
    ``seq`` without its last step (in the direction of the recurrence)."""
    steps = int(seq.shape[dim])
    if reverse:
        return torch.cat([seq.narrow(dim, 1, steps - 1), first], dim)
    return torch.cat([first, seq.narrow(dim, 0, steps - 1)], dim)


def _lstm_forward(ctx: Any, x, h, c, w_ih, w_hh, b_ih, b_hh, reverse: bool) -> Any:
    """LSTM forward; after the fused node the gate tensors are FEATURE-major ``[T, K, N]``.

    Why that layout: the gates of all steps come from ONE MatMul of ``[W_ih W_hh b]``
    ``[4H, I+H+1]`` with the stacked ``[x, h_prev, 1]`` (read transposed); the backward
    loop's ``[e; e; e; dh]`` stacks whole ``[H, N]`` blocks (on the last axis it copied N rows
    of H floats: the gate derivative Concat cost 138 us, each per-step one ~9 us); the two
    loops are ONNX Scans over axis 0 (:func:`lstm_cells`, :func:`lstm_bptt`). tanh(z) is
    taken as ``2 sigmoid(2 z) - 1`` (the factor 2 folded into the g rows of the weights) so
    that ONE Sigmoid covers all four gates. Only the last layer's ``h_n`` / ``c_n`` and the
    output that are used get a gradient (set_materialize_grads(False)).
    """
    steps, hid, feat = int(x.shape[0]), int(w_hh.shape[1]), int(x.shape[2])
    out = _rnn_out(x, h, c, w_ih, w_hh, b_ih, b_hh, "lstm", reverse)
    # [x, h_prev, 1] [T, N, I+H+1] (batch-major: no transpose of the output; the gate MatMul
    # reads it transposed, which onnxruntime fuses, and the loop's dW Gemm takes it as it is)
    # and [W_ih W_hh b] [4H, I+H+1]: the bias rides in the product (and its gradient comes
    # out of the weight-gradient product)
    parts = [x, _shifted(out, h.unsqueeze(0), reverse)]
    ws = [w_ih, w_hh]
    if b_ih is not None:
        parts.append(torch.ones_like(x.narrow(2, 0, 1)))
        ws.append((b_ih + b_hh).unsqueeze(1))
    xh = torch.cat(parts, 2)
    two = torch.tensor([[1.0]] * (2 * hid) + [[2.0]] * hid + [[1.0]] * hid, dtype=x.dtype)
    w = torch.cat(ws, 1) * two
    # [T, 4, H, N] (i f g' o), time-major: the Scans need time as axis 0 (over axis 1
    # onnxruntime's Scan moved the data per element: +550 us for the backward loop)
    s = torch.sigmoid(torch.ops.edgefed.matmul.default(w, xh.transpose(1, 2)))
    s = s.view(steps, 4, hid, -1)
    g = 2 * s[:, 2:3] - 1  # tanh of the g gate, [T, 1, H, N]; the backward needs it too
    c0 = c.t()
    cs = torch.ops.edgefed.lstm_cells.default(
        s[:, 1], s[:, 0] * g.squeeze(1), c0, reverse
    )  # [T, H, N]
    ctx.kind, ctx.reverse, ctx.feat = "lstm", reverse, feat
    ctx.set_materialize_grads(False)  # _lstm_backward takes None for unused outputs
    ctx.save_for_backward(w_ih, w_hh, xh, s, g, cs, c0)
    last = 0 if reverse else steps - 1
    return out, out.select(0, last), cs[last].t()


def _lstm_backward(ctx: Any, dout_all: Tensor, dh: Tensor, dc: Tensor) -> Any:
    """Backward through time of :func:`_lstm_forward` (feature-major ``[T, K, N]``).

    Every gate derivative is precomputed at once as ``q`` ``[4H, T, N]``; the loop
    (:func:`lstm_bptt`, one Scan) keeps ``e = dc + dh * bc``, ``dg = [e; e; e; dh] * q``,
    ``dh = W_hh^T dg + dout`` (one Gemm) and ``dc = e * f``.
    """
    w_ih, w_hh, xh, s, g, cs, c0 = ctx.saved_tensors
    steps, hid, feat = int(s.shape[0]), int(s.shape[2]), ctx.feat
    needs = ctx.needs_input_grad
    tc = torch.tanh(cs)
    cprev = _shifted(cs, c0.unsqueeze(0), ctx.reverse)
    # d gate / d pre = s (1 - s); for g = 2 s(2z) - 1 it is 4 s (1 - s): the 4 goes on i
    other = torch.cat([g, cprev.unsqueeze(1), 4 * s[:, 0:1], tc.unsqueeze(1)], 1)  # [T, 4, H, N]
    q = ((s - s * s) * other).view(steps, 4 * hid, -1)
    # grads are None for unused outputs (set_materialize_grads(False)): e.g. only h_n used,
    # or out[:, -1], which _RecurrentMode reads from h_n (no zero-filled [T, N, H] gradient)
    dh = torch.zeros_like(c0) if dh is None else dh.t()
    dc = torch.zeros_like(c0) if dc is None else dc.t()
    dnext = c0.new_empty(0)
    if dout_all is not None:
        # [T, H, N]: from torch's [T, N, H] or batch-first [N, T, H] ONE axis moves
        # (onnxruntime's fast transpose); [H, T, N] from [N, T, H] took the per-element path
        dout = dout_all.transpose(1, 2)
        first = 0 if ctx.reverse else steps - 1  # the first step the backward meets
        dh = dout.select(0, first) + dh
        dnext = _shifted(dout, torch.zeros_like(dout.narrow(0, 0, 1)), ctx.reverse)
    dgs, dh, dc, dw = torch.ops.edgefed.lstm_bptt.default(
        dh,
        dc,
        q,
        s[:, 3] * (1 - tc * tc),
        s[:, 1],
        dnext,  # added after each step
        xh,
        w_hh,
        bool(needs[0]),
        ctx.reverse,
    )  # ONE Scan
    db = dw.select(1, feat + hid) if needs[5] or needs[6] else None
    dx = None
    if needs[0]:
        dx = torch.ops.edgefed.matmul.default(w_ih.t(), dgs).transpose(1, 2)
    return (
        dx,
        dh.t(),
        dc.t(),
        dw.narrow(1, 0, feat) if needs[3] else None,
        dw.narrow(1, feat, hid) if needs[4] else None,
        db if needs[5] else None,
        db if needs[6] else None,
        None,
        None,
    )


class _Layer(torch.autograd.Function):
    """One direction of one layer over a time-major ``x`` ``[T, N, I]``.

    Inputs ``(x, h0, c0, w_ih, w_hh, b_ih, b_hh, kind, reverse)`` (``c0`` only for LSTM,
    biases may be None); outputs ``(out [T, N, H], h_n)`` and ``c_n`` for LSTM.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Any:
        x, h, c, w_ih, w_hh, b_ih, b_hh, kind, reverse = args
        steps, hid = int(x.shape[0]), int(w_hh.shape[1])
        if kind == "lstm":
            return _lstm_forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh, reverse)
        out = _rnn_out(x, h, c, w_ih, w_hh, b_ih, b_hh, kind, reverse)
        # ONE ONNX GRU / RNN node; the GRU gates are recomputed below, batched
        hprev = _shifted(out, h.unsqueeze(0), reverse)
        h = out.select(0, 0 if reverse else steps - 1)
        saved: dict[str, Tensor] = {}
        if kind == "gru":  # b_hn sits inside r * (.): b_ih with x, b_hh with h
            x2 = x.reshape(-1, x.shape[-1])
            gx = (x2 @ w_ih.t() if b_ih is None else torch.addmm(b_ih, x2, w_ih.t())).reshape(
                steps, -1, w_ih.shape[0]
            )
            gh = (hprev.reshape(-1, hid) @ w_hh.t()).reshape(steps, -1, w_hh.shape[0])
            if b_hh is not None:
                gh = gh + b_hh
            rz = torch.sigmoid(
                (gx.narrow(2, 0, 2 * hid) + gh.narrow(2, 0, 2 * hid)).reshape(steps, -1, 2, hid)
            )
            ghn = gh.narrow(2, 2 * hid, hid)
            n = torch.tanh(gx.narrow(2, 2 * hid, hid) + rz.select(2, 0) * ghn)
            saved = {"rz": rz, "n": n, "ghn": ghn}
        ctx.kind, ctx.reverse, ctx.hid, ctx.steps = kind, reverse, hid, steps
        ctx.set_materialize_grads(False)  # backward takes None for unused outputs
        names = sorted(saved)
        ctx.names = names
        ctx.save_for_backward(x, w_ih, w_hh, out, hprev, *(saved[k] for k in names))
        return out, h

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        if ctx.kind == "lstm":
            return _lstm_backward(ctx, *grads)
        x, w_ih, w_hh, out, hprev, *rest = ctx.saved_tensors
        st = dict(zip(ctx.names, rest, strict=True))
        kind, hid, steps = ctx.kind, ctx.hid, ctx.steps
        order = list(range(steps)) if ctx.reverse else list(range(steps - 1, -1, -1))
        # None for an unused output (set_materialize_grads(False)), e.g. out[:, -1] read from h_n
        dout = None if grads[0] is None else _steps(grads[0])
        dh = torch.zeros_like(out[0]) if grads[1] is None else grads[1]
        needs = ctx.needs_input_grad
        per: list[Any] = [None] * steps
        if kind == "gru":
            rz, n, ghn = st["rz"], st["n"], st["ghn"]
            r, z = rz.select(2, 0), rz.select(2, 1)
            pn = (1 - z) * (1 - n * n)
            pr = pn * ghn * r * (1 - r)
            qh = _steps(torch.cat([pr, (hprev - n) * z * (1 - z), pn * r], -1))
            zs = _steps(z)
            dhs: list[Any] = [None] * steps
            for t in order:
                dh = dh if dout is None else dout[t] + dh
                dhs[t] = dh
                dg = torch.cat([dh, dh, dh], 1) * qh[t]
                per[t] = dg
                dh = torch.addmm(dh * zs[t], dg, w_hh)
            dgh = _cat_time(per, steps)
            dgx = torch.cat([dgh.narrow(2, 0, 2 * hid), _cat_time(dhs, steps) * pn], -1)
            dc0 = None
        else:
            deriv = _steps(1 - out * out if kind == "tanh" else (out > 0).to(out.dtype))
            dh = dh if dout is None else dout[order[0]] + dh
            for t, nxt in zip(order, [*order[1:], None], strict=True):
                dp = dh * deriv[t]
                per[t] = dp
                dh = _next_dh(dp, w_hh, dout, nxt)
            dgx = dgh = _cat_time(per, steps)
            dc0 = None
        dx, dw_ih, db_ih = _input_grads(dgx, x, w_ih, needs)
        dw_hh = _mm_sum(dgh, hprev) if needs[4] else None
        db_hh = dgh.sum((0, 1)) if needs[6] else None
        return dx, dh, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None


def _run(kind: str, args: tuple[Any, ...]) -> Any:
    """torch.{lstm,gru,rnn_*}(input, hx, weights, has_biases, layers, dropout, train, bidi,
    batch_first) through :class:`_Layer`: (torch's result, :class:`_LastLayer` or None); None:
    not handled here (torch's path)."""
    x, hx, weights, has_biases, layers, dropout, train, bidi, batch_first = args
    dirs = 2 if bidi else 1
    per = 4 if has_biases else 2
    if len(weights) != per * layers * dirs or (dropout and train and layers > 1):
        return None  # LSTM proj_size (extra weight) / inter-layer dropout: torch's path
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1)
        h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
    elif batch_first:
        x = x.transpose(0, 1)
    hn: list[Tensor] = []
    cn: list[Tensor] = []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(weights[k * per : (k + 1) * per]) + [None] * (4 - per)
            res = _Layer.apply(
                x.contiguous(), h0[k], None if c0 is None else c0[k], *w, kind, d == 1
            )
            outs.append(res[0])
            hn.append(res[1])
            if kind == "lstm":
                cn.append(res[2])
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
    last = None
    if unbatched:
        out, h_n = x.squeeze(1), torch.stack(hn, 0).squeeze(1)
        c_n = torch.stack(cn, 0).squeeze(1) if cn else None
    else:
        out = x.transpose(0, 1) if batch_first else x
        h_n, c_n = torch.stack(hn, 0), torch.stack(cn, 0) if cn else None
        last = _LastLayer(int(batch_first), int(x.shape[0]), outs, hn[-dirs:])
    return ((out, h_n, c_n) if kind == "lstm" else (out, h_n)), last


class _LastLayer(NamedTuple):
    """The last layer of one GRU / LSTM / RNN call, to read its first / last time step from
    the final states.

    Why: ``out[:, -1]`` (classify from the last step) made autograd build a zero-filled
    ``[N, T, H]`` output gradient (Expand + Where + ScatterND, ~150 us profiled) which the
    backward then transposed and shifted; the same values read from ``h_n`` leave the output
    gradient unused (None): the backward starts from ``dh`` alone.
    """

    time_dim: int  # in the returned output: 1 batch-first, 0 time-major
    steps: int
    outs: list[Tensor]  # per direction, time-major [T, N, H]
    hs: list[Tensor]  # per direction, the final state [N, H] (reverse: the state at t = 0)

    def step(self, t: int) -> Tensor:
        """``out.select(time_dim, t)`` for ``t`` the first or last step (exact same values)."""
        parts = []
        for d, (o, h) in enumerate(zip(self.outs, self.hs, strict=True)):
            ends_here = t == (0 if d == 1 else self.steps - 1)
            parts.append(h if ends_here else o.select(0, t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def match(self, func: Any, args: tuple, kwargs: Any) -> int | None:
        """The time step ``func(out, ...)`` selects if it is ``out[:, t]`` / ``out[t]`` /
        ``out.select(time_dim, t)`` with ``t`` the first or last step, else None."""
        if kwargs:
            return None
        if func is Tensor.select and len(args) == 3:
            dim, t = args[1], args[2]
            if not isinstance(dim, int) or dim % 3 != self.time_dim:
                return None
        elif func is Tensor.__getitem__ and len(args) == 2:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            full = slice(None)
            while len(idx) > self.time_dim + 1 and idx[-1] == full:
                idx = idx[:-1]
            if len(idx) != self.time_dim + 1 or any(i != full for i in idx[:-1]):
                return None
            t = idx[-1]
        else:
            return None
        if not isinstance(t, int) or isinstance(t, bool) or not -self.steps <= t < self.steps:
            return None
        t %= self.steps
        return t if t in (0, self.steps - 1) else None


class _RecurrentMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        # id(returned output) -> (weak reference to it, its last layer): see _LastLayer
        self._lasts: dict[int, tuple[weakref.ref, _LastLayer]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = _KINDS.get(func)
        # packed sequences call (data, batch_sizes, hx, weights, ...): weights 4th, not 3rd
        if kind is not None and not kwargs and len(args) == 9 and isinstance(args[2], list | tuple):
            res = _run(kind, tuple(args))
            if res is not None:
                out, last = res
                if last is not None:
                    self._lasts[id(out[0])] = (weakref.ref(out[0]), last)
                return out
        if args and isinstance(args[0], Tensor) and id(args[0]) in self._lasts:
            ref, last = self._lasts[id(args[0])]
            t = last.match(func, tuple(args), kwargs) if ref() is args[0] else None
            if t is not None:
                return last.step(t)
        return func(*args, **(kwargs or {}))


@contextmanager
def rnn_mode() -> Iterator[None]:
    """Inside: nn.LSTM / nn.GRU / nn.RNN run through :class:`_Layer` (see module docstring)."""
    with _RecurrentMode():
        yield


__all__ = ["onnx_translations", "rnn_mode", "rnn_seq"]
