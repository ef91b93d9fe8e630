"""The speed rewrites of the training-step exporter (issue 13) against torch autograd, at the
points random gate inputs never hit: activation backward exactly at the kink values,
BatchNorm with a large mean offset, and the in-place rewrite on a real traced graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from edgefed.train_export import batch_norm, decompositions
from edgefed.train_export.mutations import remove_inplace

aten = torch.ops.aten


def _autograd(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fn(x), x, g)
    return gx


@pytest.mark.parametrize(
    ("module", "ours", "args"),
    [
        (nn.ReLU6(), decompositions.hardtanh_backward, (0.0, 6.0)),
        (nn.Hardtanh(-2.0, 3.0), decompositions.hardtanh_backward, (-2.0, 3.0)),
        (nn.Hardswish(), decompositions.hardswish_backward, ()),
        (nn.Hardsigmoid(), decompositions.hardsigmoid_backward, ()),
    ],
)
def test_activation_backward_matches_at_the_kinks(module, ours, args) -> None:
    kinks = torch.tensor([-3.0, -2.0, 0.0, 3.0, 6.0])
    x = torch.cat([kinks, kinks.nextafter(kinks + 1), kinks.nextafter(kinks - 1)])
    x = torch.cat([x, torch.linspace(-8, 8, 97)])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    want = _autograd(module, x, g)
    got = ours(g, x, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_batch_norm_backward_matches_with_a_mean_offset(offset: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, 6, 6, generator=gen) * 2 + offset
    w, b = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    rm, rv = torch.zeros(5), torch.ones(5)
    out = nn.functional.batch_norm(xs, rm, rv, ws, bs, training=True, momentum=0.1, eps=1e-5)
    want = torch.autograd.grad(out, (xs, ws, bs), g)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    got = batch_norm.native_batch_norm_backward(
        g, x, w, None, None, mean, torch.rsqrt(var + 1e-5), True, 1e-5, [True, True, True]
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    rm2, rv2 = torch.zeros(5), torch.ones(5)
    y, _, _, nrm, nrv = batch_norm._train_forward(x, w, b, rm2, rv2, 0.1, 1e-5)
    torch.testing.assert_close(y, out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nrm, rm)
    torch.testing.assert_close(nrv, rv)


def test_remove_inplace_keeps_the_values_and_leaves_input_writes() -> None:
    def step(buf: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = buf.clone()
        local.copy_(x * 2)  # write to a tensor made in the step: rewritten
        local.add_(1.0)
        x.mul_(3.0)  # write to a graph input: must stay
        return local, x

    gm = make_fx(step)(torch.zeros(4), torch.ones(4))
    assert remove_inplace(gm) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.copy_.default not in targets and aten.add_.Tensor not in targets
    assert aten.mul_.Tensor in targets
    x = torch.arange(4.0)
    local, xo = gm(torch.zeros(4), x)
    torch.testing.assert_close(local, torch.arange(4.0) * 2 + 1)
    torch.testing.assert_close(xo, torch.arange(4.0) * 3)
