"""Scaled dot-product attention with a hand-written backward, for tracing the training step.

Why: traced through torch's math kernel, each attention layer's backward is autograd's op by
op replay: the q/k/v split of the packed in-projection comes back as three
``select_backward`` (a zero-filled ``[3, L, N, E]`` tensor + Where each, summed by Adds),
the safe-softmax guard adds Equal/Not/ReduceMax/Where over every score on the way forward,
and the per-head views cost a Transpose + copy each way. On the zoo's 2-layer encoder
onnxruntime spent more time in those data movements than in the arithmetic.

Here ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` calls with
``need_weights=False``, e.g. inside ``nn.TransformerEncoderLayer``) is ONE
``torch.autograd.Function`` while the step is traced:

* self-attention with the packed in-projection (q, k, v are views of one ``[3, L, N, E]``
  tensor, what ``_in_projection_packed`` makes): the function takes that tensor itself and
  returns its gradient as ONE tensor (the three head gradients stacked: a Concat), so the
  ``select_backward`` sums vanish and one Transpose moves q, k and v to the per-head layout;
* any other q, k, v (cross-attention, separate projections): the same arithmetic on them.

Backward: ``dV = A^T g``, ``dA = g V^T`` (times the dropout mask), softmax backward as
``A * (dA - rowsum(dA * A))``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale``.
Attention dropout draws through ``aten.native_dropout`` exactly where torch's math kernel
draws, so the verification gate feeds both the same noise. Float or boolean masks (key
padding) are added to the scores; rows masked entirely give zero weights as in torch's
safe softmax. ``is_causal``, ``enable_gqa``, masks that need a gradient and nested tensors
keep torch's path.

Hook: a Python ``CompositeImplicitAutograd`` kernel of ``aten.scaled_dot_product_attention``
that only acts while ``make_fx`` traces with a decomposition table holding :func:`sdpa`
(:func:`table`); anywhere else it calls torch's own kernel. The gate compares the result
with torch's autograd like every other graph.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch._C import DispatchKey

aten = torch.ops.aten
_OP = aten.scaled_dot_product_attention.default


def _scores(q: Tensor, k: Tensor, mask: Any, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax weights of (q * scale) k^T + mask and the scaled q; q, k: [B, L, D];
    ``mask``: None or (additive mask broadcastable to [*lead, L, S], lead) with B = prod(lead)."""
    qs = q * scale
    s = torch.bmm(qs, k.transpose(1, 2))
    if mask is None:
        return torch.softmax(s, -1), qs
    m, lead = mask
    s = s.reshape(*lead, *s.shape[-2:]) + m
    a = torch.softmax(s, -1)
    dead = (s == -math.inf).all(-1, keepdim=True)  # torch's safe softmax: 0, not NaN
    a = torch.where(dead, torch.zeros_like(a), a)
    return a.reshape(-1, *a.shape[-2:]), qs


def _forward(
    ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Any, p: float, scale: float
) -> Tensor:
    """q, k, v: [B, L, D] (B = batch x heads). Saves what :func:`_backward` needs."""
    a, qs = _scores(q, k, mask, scale)
    if p > 0:  # on torch's [*lead, L, S] shape: the gate feeds the graph torch's noise
        ad, keep = aten.native_dropout.default(a.reshape(*ctx.lead, *a.shape[-2:]), p, True)
        ad, keep = ad.reshape(a.shape), keep.reshape(a.shape).to(a.dtype) * (1.0 / (1.0 - p))
    else:
        ad, keep = a, None
    ctx.save_for_backward(qs, k, v, a, ad, keep)
    ctx.scale = scale
    return torch.bmm(ad, v)


def _backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv ([B, L, D] each) of :func:`_forward`'s output gradient ``g``."""
    qs, k, v, a, ad, keep = ctx.saved_tensors
    dv = torch.bmm(ad.transpose(1, 2), g)
    da = torch.bmm(g, v.transpose(1, 2))
    if keep is not None:
        da = da * keep
    ds = a * (da - (da * a).sum(-1, keepdim=True))
    dq = torch.bmm(ds, k) * ctx.scale
    dk = torch.bmm(ds.transpose(1, 2), qs)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    """Attention on separate q, k, v of shape [..., L, D]."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Any, p: float, scale: float):
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.lead = tuple(q.shape[:-2])
        d = q.shape[-1]
        out = _forward(
            ctx,
            q.reshape(-1, q.shape[-2], d),
            k.reshape(-1, k.shape[-2], d),
            v.reshape(-1, v.shape[-2], v.shape[-1]),
            _batched_mask(mask, q.shape[:-2]),
            p,
            scale,
        )
        return out.reshape(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        qsh, ksh, vsh = ctx.shapes
        g3 = g.reshape(-1, g.shape[-2], g.shape[-1])
        dq, dk, dv = _backward(ctx, g3)
        return dq.reshape(qsh), dk.reshape(ksh), dv.reshape(vsh), None, None, None


class _PackedAttention(torch.autograd.Function):
    """Self-attention on the packed projection ``proj`` [3, L, N, E] (q, k, v = proj[i]
    seen as [N, H, L, E / H]); returns [N, H, L, E / H] and ONE gradient for ``proj``."""

    @staticmethod
    def forward(ctx: Any, proj: Tensor, heads: int, mask: Any, p: float, scale: float):
        _, seq, n, e = proj.shape
        d = e // heads
        # back to the projection's own [L, N, 3, E] order (onnxruntime cancels that against
        # MultiheadAttention's transpose), then ONE Transpose to [3, N*H, L, D] for q, k, v
        t = proj.permute(1, 2, 0, 3).reshape(seq, -1, 3, heads, d).permute(2, 1, 3, 0, 4)
        t = t.reshape(3, -1, seq, d)
        ctx.dims = (seq, e, heads)
        ctx.lead = (n, heads)
        out = _forward(ctx, t[0], t[1], t[2], _batched_mask(mask, (n, heads)), p, scale)
        return out.reshape(-1, heads, seq, d)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        seq, e, heads = ctx.dims
        d = e // heads
        dq, dk, dv = _backward(ctx, g.reshape(-1, seq, d))
        dt = torch.stack([dq, dk, dv]).reshape(3, -1, heads, seq, d)  # [3, N, H, L, D]
        # the projection's [L, N, 3, E] order in ONE Transpose; returned as the [3, L, N, E]
        # view whose transpose back (in MultiheadAttention's backward) onnxruntime cancels
        dproj = dt.permute(3, 1, 0, 2, 4).reshape(seq, -1, 3, e)
        return dproj.permute(2, 0, 1, 3), None, None, None, None


def _batched_mask(mask: Tensor | None, lead: Any) -> Any:
    """(additive float mask, lead) for :func:`_scores` (boolean masks: True = attend)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, -math.inf)
    return mask, tuple(lead)


def _packed_source(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """The packed [3, L, N, E] projection when q, k, v are exactly MultiheadAttention's
    views of it (``proj[i].view(L, N*H, D).transpose(0, 1).view(N, H, L, D)``), else None."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or base.dim() != 4:
        return None
    if not base.is_contiguous() or q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return None
    three, seq, n, e = base.shape
    nb, heads, lq, d = q.shape
    if three != 3 or nb != n or lq != seq or heads * d != e:
        return None
    stride = (e, d, n * e, 1)
    off = base.storage_offset()
    for i, t in enumerate((q, k, v)):
        strides = zip(t.stride(), stride, t.shape, strict=True)
        if any(a != b and size != 1 for a, b, size in strides):  # size-1 strides are free
            return None
        if t.storage_offset() != off + i * seq * n * e:
            return None
    return base


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """``scaled_dot_product_attention`` through :class:`_Attention` / :class:`_PackedAttention`;
    NotImplemented where torch's own path must run."""
    if is_causal or enable_gqa or q.is_nested or q.dim() < 3:
        return NotImplemented
    if attn_mask is not None and (attn_mask.requires_grad or attn_mask.dtype not in _MASKS):
        return NotImplemented
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(float(q.shape[-1]))
    p = float(dropout_p)
    base = _packed_source(q, k, v)
    if base is not None:
        return _PackedAttention.apply(base, int(q.shape[1]), attn_mask, p, sc)
    return _Attention.apply(q, k, v, attn_mask, p, sc)


_MASKS = (torch.bool, torch.float32)


def _kernel(*args: Any, **kwargs: Any) -> Any:
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is not None and getattr(mode, "decomposition_table", {}).get(_OP) is sdpa:
        res = sdpa(*args, **kwargs)
        if res is not NotImplemented:
            return res
    return _OP._op_dk(DispatchKey.CompositeImplicitAutograd, *args, **kwargs)


@functools.cache
def _install() -> None:
    _OP.py_impl(DispatchKey.CompositeImplicitAutograd)(_kernel)


def table() -> dict[Any, Any]:
    """Decomposition-table entries that route attention through this module while traced."""
    _install()
    return {_OP: sdpa}


__all__ = ["sdpa", "table"]
