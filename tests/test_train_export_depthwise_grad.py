"""The stride-1 depthwise weight gradient's marker and its two ONNX lowerings (issue 13):
the rows form (default-domain step) and the stacked NCHWc convolution (x86 variant), each run
in onnxruntime on odd geometries (non-square maps, asymmetric padding, dilation, rectangular
kernels, batch 1 and 3 through one graph: the batch is dynamic) against torch autograd; and
the exporter's use of them: no marker left in any shipped graph, the variant holds the
stacked form and trains like the default graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgefed.train_export import SGD, depthwise_grad, export_training_step, nchwc

# (channels, height, width, kh, kw, padding, dilation), stride 1
ROWS_GEOMETRIES = [
    (5, 9, 7, 3, 3, (1, 1), (1, 1)),
    (20, 6, 11, 3, 3, (0, 2), (1, 1)),
    (3, 10, 8, 5, 3, (2, 1), (2, 1)),
    (7, 7, 12, 2, 4, (1, 0), (1, 2)),
    (4, 5, 5, 1, 3, (0, 1), (1, 1)),
]
# the stacked form needs channels % 16 == 0 (every NCHWc block size divides 16)
STACKED_GEOMETRIES = [
    (16, 9, 7, 3, 3, (1, 1), (1, 1)),
    (16, 4, 6, 5, 5, (2, 2), (1, 1)),
    (32, 8, 9, 3, 3, (2, 2), (2, 2)),
    (16, 2, 3, 3, 3, (1, 1), (1, 1)),
    (32, 6, 11, 3, 3, (0, 2), (1, 1)),
    (16, 10, 8, 5, 3, (2, 1), (2, 1)),
    (16, 7, 12, 2, 4, (1, 0), (1, 2)),
    (48, 5, 5, 1, 3, (0, 1), (1, 1)),
    (16, 3, 6, 5, 3, (2, 1), (1, 1)),  # a map shorter than its padding
]


def _session(geom: tuple, form: str) -> ort.InferenceSession:
    """A one-gradient graph, lowered to ``form``, with a dynamic batch."""
    c, h, w, kh, kw, p, d = geom
    model = depthwise_grad.standalone(c, h, w, (kh, kw), p, d, form)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _reference(geom: tuple, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c, h, w, kh, kw, p, d = geom
    gen = torch.Generator().manual_seed(sum(geom[:5]) + n)
    x = torch.randn(n, c, h, w, generator=gen) + 2.0
    wt = torch.randn(c, 1, kh, kw, generator=gen, requires_grad=True)
    y = F.conv2d(x, wt, None, 1, p, d, c)
    g = torch.randn(y.shape, generator=gen)
    want = torch.autograd.grad(y, wt, g)[0]
    return g.numpy(), x.numpy(), want.numpy()


@pytest.mark.parametrize(
    ("form", "geom"),
    [("rows", g) for g in ROWS_GEOMETRIES + STACKED_GEOMETRIES]
    + [("stacked", g) for g in STACKED_GEOMETRIES],
)
def test_lowering_matches_autograd(form: str, geom: tuple) -> None:
    sess = _session(geom, form)
    for n in (1, 3):  # one graph, two batch sizes
        g, x, want = _reference(geom, n)
        (got,) = sess.run(None, {"g": g, "x": x})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["rows", "stacked"])
def test_lowering_check_detects_a_wrong_gradient(form: str) -> None:
    """The comparison above can fail: the gradient of a mirrored map gives another result."""
    geom = STACKED_GEOMETRIES[0]
    g, x, want = _reference(geom, 3)
    (got,) = _session(geom, form).run(None, {"g": np.ascontiguousarray(g[..., ::-1]), "x": x})
    assert not np.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_marker_eager_implementation_is_torchs_gradient() -> None:
    geom = STACKED_GEOMETRIES[2]
    _, _, kh, kw, (ph, pw), (dh, dw) = geom[1:]
    g, x, want = _reference(geom, 3)
    got = torch.ops.edgefed.depthwise_weight_grad(
        torch.from_numpy(g), torch.from_numpy(x), kh, kw, ph, pw, dh, dw
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


class UserInvertedResidual(nn.Module):
    """A user's inverted residual block: 16 -> 32 channels, depthwise 3x3 and a dilated 3x5."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.dw2 = nn.Conv2d(32, 32, (3, 5), padding=(1, 4), dilation=(1, 2), groups=32)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn(self.stem(x)))
        h = F.relu6(self.bn2(self.dw2(self.dw(self.expand(h)))))
        return self.head(h.mean(dim=(2, 3)))


def test_exported_step_lowers_every_marker_and_variant_trains_alike() -> None:
    torch.manual_seed(3)
    m = UserInvertedResidual()
    x = torch.randn(4, 3, 10, 12)
    g = export_training_step(m, (x, torch.randint(0, 4, (4,))), optimizer=SGD(momentum=0.9))
    step = onnx.load_from_string(g.onnx)
    alt = nchwc.embedded(g.onnx)
    assert alt is not None, "the variant passed the gate and is embedded"
    for graph in (step, alt, onnx.load_from_string(g.inference_onnx)):
        assert not [n for n in graph.graph.node if depthwise_grad.is_marker(n)]
        assert depthwise_grad.MARKER_DOMAIN not in {o.domain for o in graph.opset_import}
    # the default graph holds the rows form (band MatMuls), the variant one stacked
    # nchwc.Conv per depthwise weight gradient
    assert (
        sum(n.op_type == "Concat" and n.output[0].startswith("dwgrad_") for n in step.graph.node)
        == 2
    )
    nchwc_convs = [n for n in alt.graph.node if n.domain == nchwc.DOMAIN and n.op_type == "Conv"]
    stacked = [n for n in nchwc_convs if not any(a.name == "kernel_shape" for a in n.attribute)]
    assert len(stacked) == 2
