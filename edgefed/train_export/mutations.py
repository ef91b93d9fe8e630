"""Rewrite the in-place ops left in a traced step into out-of-place ones.

Why: ``make_fx`` keeps BatchNorm's ``running_mean.copy_(new)`` and ``num_batches_tracked
.add_(1)``. torchlib has no translation for in-place ops, so the exporter fell back to
torch.onnx's full ``run_decompositions`` (a re-trace of the whole program, ~30 s of a
75 s MobileNet-style export) just to functionalize them. Our graph's mutations are simple:
the target is a tensor made inside the step (a clone of a buffer input) or a baked
constant, never a graph input and never read through a view after the write. Then
``y = op_(t, ...)`` is ``t2 = op(t, ...)`` with every later use of ``t`` reading ``t2``.
Anything else is left alone (the exporter's full path still handles it).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_VIEWS = {
    aten.alias.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.as_strided.default,
    aten.detach.default,
}


def _out_of_place(node: fx.Node) -> torch._ops.OpOverload | None:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return None
    name = t._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, t._overloadname, None) if packet is not None else None


def _same_meta(a: object, b: object) -> bool:
    va = a.meta.get("val") if isinstance(a, fx.Node) else None
    vb = b.meta.get("val") if isinstance(b, fx.Node) else None
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def remove_inplace(gm: fx.GraphModule) -> int:
    """Replace safe in-place ops by out-of-place ones; returns how many were rewritten."""
    g = gm.graph
    done = 0
    for node in list(g.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        dst = node.args[0]
        if dst.op == "placeholder" or dst.target in _VIEWS:
            continue  # graph inputs must keep the write; a view's base would need it too
        if node.target == aten.copy_.default:
            src = node.args[1]
            if node.kwargs or not _same_meta(dst, src):
                continue
            new: fx.Node = src
        else:
            op = _out_of_place(node)
            if op is None:
                continue
            with g.inserting_after(node):
                new = g.call_function(op, node.args, dict(node.kwargs))
            new.meta = dict(node.meta)
        order = {n: i for i, n in enumerate(g.nodes)}
        earlier_views = [u for u in dst.users if u.target in _VIEWS and order[u] < order[node]]
        if any(order[v] > order[node] for w in earlier_views for v in w.users):
            if new is not node.args[1]:
                g.erase_node(new)
            continue  # a view taken before the write is read after it
        for u in list(dst.users):
            if u is not node and u is not new and order[u] > order[node]:
                u.replace_input_with(dst, new)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        done += 1
    if done:
        g.lint()
        gm.recompile()
    return done


__all__ = ["remove_inplace"]
