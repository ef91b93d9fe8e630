"""Attention with a hand-written backward (edgefed.train_export.attention, issue 13).

Two levels: the autograd functions against torch's own scaled_dot_product_attention (math
kernel) on real tensors, including the packed self-attention views nn.MultiheadAttention
makes; and whole training steps of attention models defined here, exported through the hook
and passed through the exporter's verification gate (ONNX step vs torch autograd +
torch.optim, two batch sizes, dropout noise shared with torch).
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from edgefed.train_export import SGD, export_training_step
from edgefed.train_export import attention as att
from edgefed.train_export.decompositions import decomposition_table

aten = torch.ops.aten


def _packed_views(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: int):
    """q, k, v exactly as nn.MultiheadAttention makes them for self-attention ([L, N, E] x)."""
    seq, n, e = x.shape
    proj = F.linear(x, w, b).unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2)
    proj = proj.squeeze(-2).contiguous()
    d = e // heads
    qkv = [proj[i].view(seq, n * heads, d).transpose(0, 1).view(n, heads, seq, d) for i in range(3)]
    return proj, qkv


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, g))


def _reference(q, k, v, mask=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, mask)


@pytest.mark.parametrize("heads,e", [(2, 8), (3, 12), (1, 5)])
def test_packed_self_attention_matches_torch(heads: int, e: int) -> None:
    g = torch.Generator().manual_seed(heads)
    x = torch.randn(7, 5, e, generator=g)
    w = torch.randn(3 * e, e, generator=g).requires_grad_()
    b = torch.randn(3 * e, generator=g).requires_grad_()
    proj, qkv = _packed_views(x, w, b, heads)
    assert att._packed_source(*qkv) is proj  # the packed path is the one taken
    ours = att.sdpa(*qkv)
    ref = _reference(*_packed_views(x, w, b, heads)[1])
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, r in zip(_grads(ours, [w, b], 0), _grads(ref, [w, b], 0), strict=True):
        assert torch.allclose(a, r, atol=1e-4), (a - r).abs().max()


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "padding_with_dead_row"])
def test_separate_qkv_and_masks_match_torch(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 3, 6, 5, generator=g, requires_grad=True)
    k = torch.randn(4, 3, 9, 5, generator=g, requires_grad=True)
    v = torch.randn(4, 3, 9, 7, generator=g, requires_grad=True)
    mask = None
    if mask_kind == "float":
        mask = torch.randn(6, 9, generator=g)
    elif mask_kind == "bool":
        mask = torch.rand(4, 1, 6, 9, generator=g) > 0.3
        mask[..., 0] = True  # every row attends somewhere
    elif mask_kind == "padding_with_dead_row":  # key padding as MultiheadAttention passes it
        pad = torch.zeros(4, 1, 1, 9)
        pad[1, ..., 4:] = -torch.inf
        pad[2] = -torch.inf  # a sample that is padding only: zero weights, not NaN
        mask = pad
    assert att._packed_source(q, k, v) is None
    ours = att.sdpa(q, k, v, mask)
    ref = _reference(q, k, v, mask)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, r in zip(_grads(ours, [q, k, v], 1), _grads(ref, [q, k, v], 1), strict=True):
        assert torch.allclose(a, r, atol=1e-5), (a - r).abs().max()


def test_double_precision_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: att.sdpa(a, b, c, scale=0.7), (q, k, v))


def test_declined_cases_keep_torchs_path() -> None:
    q = torch.randn(2, 2, 4, 3)
    assert att.sdpa(q, q, q, is_causal=True) is NotImplemented
    assert att.sdpa(q, q, q, torch.zeros(4, 4, requires_grad=True)) is NotImplemented


def _traced_ops(table: dict) -> list:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    names = [n for n, _ in mha.named_parameters()]

    def fn(x: torch.Tensor, *ps: torch.Tensor):
        with torch.enable_grad():
            ps = [p.detach().requires_grad_() for p in ps]
            out = torch.func.functional_call(
                mha, dict(zip(names, ps, strict=True)), (x, x, x), {"need_weights": False}
            )[0]
            return torch.autograd.grad(out.square().sum(), ps)

    with sdpa_kernel(SDPBackend.MATH):
        gm = make_fx(
            fn, decomposition_table=table, tracing_mode="symbolic", _allow_non_fake_inputs=True
        )(torch.randn(3, 5, 8), *[p.detach() for p in mha.parameters()])
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_hook_acts_only_with_its_table_entry() -> None:
    table = decomposition_table()
    hooked = _traced_ops(table)
    plain = _traced_ops(
        {k: v for k, v in table.items() if k is not aten.scaled_dot_product_attention.default}
    )
    # torch's path: select_backward (Where over a zero-filled [3, L, N, E]) + safe softmax
    assert hooked.count(aten.where.self) == 0 < plain.count(aten.where.self)
    assert hooked.count(aten.cat.default) == 1  # dq, dk, dv stacked once
    assert len(hooked) < len(plain)
    # outside tracing torch's own kernel runs (the hook leaves eager code alone)
    q = torch.randn(2, 3, 4, 5)
    with sdpa_kernel(SDPBackend.MATH):
        eager = F.scaled_dot_product_attention(q, q, q)
    qs = q * 5**-0.25  # torch's math kernel: both operands scaled by sqrt(scale)
    assert torch.equal(eager, torch.softmax(qs @ qs.transpose(-1, -2), -1) @ q)


class Encoder(nn.Module):
    """Embedding-free encoder over feature frames: proj -> TransformerEncoderLayer x2 -> mean."""

    def __init__(self, d: int, heads: int, batch_first: bool, norm_first: bool, act: str) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(
            d,
            heads,
            2 * d,
            dropout=0.2,
            batch_first=batch_first,
            norm_first=norm_first,
            activation=act,
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h)
        return self.fc(h.mean(1 if self.batch_first else 0))


class PaddedText(nn.Module):
    """Token ids with 0 = padding: the key padding mask is computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.layer = nn.TransformerEncoderLayer(6, 3, 12, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.emb(x), src_key_padding_mask=x == 0)
        return self.fc(h[:, 0])


class CrossAttention(nn.Module):
    """Queries from one projection, keys/values of another width: the non-packed path."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(3, 5)
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.2, kdim=5, vdim=5, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(self.a(x), self.b(x), self.b(x), need_weights=False)
        return self.fc(out.mean(1))


def _export_and_count(model: nn.Module, x: torch.Tensor, classes: int) -> onnx.ModelProto:
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    g = export_training_step(model, (x, y), optimizer=SGD(momentum=0.9))  # gate inside
    proto = onnx.load_from_string(g.onnx)
    assert g.manifest["verification"]["batches"]
    return proto


def _random_nodes(proto: onnx.ModelProto) -> int:
    return sum(n.op_type == "RandomUniformLike" for n in proto.graph.node)


@pytest.mark.parametrize(
    "heads,batch_first,norm_first,act",
    [
        (2, True, False, "relu"),
        (2, False, True, "gelu"),
        (3, True, True, "relu"),
        (1, False, False, "gelu"),
    ],
)
def test_encoder_steps_pass_the_gate(
    heads: int, batch_first: bool, norm_first: bool, act: str
) -> None:
    torch.manual_seed(heads)
    model = Encoder(6 * heads, heads, batch_first, norm_first, act)
    x = torch.randn(5, 7, 3)
    proto = _export_and_count(model, x, 4)
    # every dropout of the 2 layers (attention weights inside sdpa, 2 in the block, 1 in the
    # feed-forward) is a random node the gate fed torch's noise to
    assert _random_nodes(proto) == 2 * 4
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 2


def test_key_padding_mask_step_passes_the_gate() -> None:
    torch.manual_seed(0)
    x = torch.randint(1, 20, (6, 9))
    x[:, 6:] = 0
    proto = _export_and_count(PaddedText(), x, 3)
    assert _random_nodes(proto) == 4


def test_cross_attention_step_passes_the_gate() -> None:
    torch.manual_seed(0)
    proto = _export_and_count(CrossAttention(), torch.randn(4, 6, 3), 2)
    assert _random_nodes(proto) == 1


def test_other_exports_keep_sdpa_after_the_hook_is_installed() -> None:
    decomposition_table()  # installs the Python kernel (idempotent)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    ep = torch.export.export(layer, (torch.randn(2, 5, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert aten.scaled_dot_product_attention.default in targets  # not our decomposition
