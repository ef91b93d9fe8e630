"""The NCHWc variant's regular convolutions and its one-pass gate (issue 13, nchwc13b).

The variant (edgefed.train_export.nchwc) now also moves group-1 k x k convolutions (input and
output channels % 16 == 0, any stride) and 3-channel stems (NCHW input) to onnxruntime's
NCHWc kernels; 1x1 pointwise convolutions, channel counts that are not multiples of 16 and
strided depthwise input gradients keep the default ops. The exporter's gate checks the
variant against the SAME torch reference as the step graph in one pass
(verify.verify_step_variants). Models are defined here, outside the package, as a user would.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgefed.train_export import SGD, export_training_step, nchwc
from edgefed.train_export.errors import VerificationError
from edgefed.train_export.export import _attach_nchwc, _loss_fn
from edgefed.train_export.verify import verify_step_variants


class OddNet(nn.Module):
    """Every convolution form the variant meets, on odd image sizes (11 x 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)  # -> 6 x 5, NCHW input
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise, stride 1
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # regular -> 3 x 3
        self.dw_s2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)  # strided depthwise
        self.pw = nn.Conv2d(32, 12, 1)  # pointwise: keeps the default op
        self.dw12 = nn.Conv2d(12, 12, 3, padding=1, groups=12)  # 12 channels: default op
        self.reg12 = nn.Conv2d(12, 16, 3, padding=1)  # 12 input channels: default op
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn(self.stem(x)))
        h = F.relu6(self.dw(h)) + h
        h = self.dw_s2(F.relu6(self.down(h)))
        h = self.reg12(F.relu6(self.dw12(self.pw(h))))
        return self.head(h.mean(dim=(2, 3)))


def _export() -> tuple[nn.Module, torch.Tensor, torch.Tensor, object]:
    torch.manual_seed(3)
    m = OddNet()
    x, y = torch.randn(6, 3, 11, 9), torch.randint(0, 5, (6,))
    return m, x, y, export_training_step(m, (x, y), optimizer=SGD(momentum=0.9))


def _alt_of(step: bytes) -> onnx.ModelProto:
    alt = nchwc.embedded(step)
    assert alt is not None, "no NCHWc variant embedded"
    return alt


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feed(manifest: dict, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for e in manifest["inputs"]:
        shape = [batch if s == "batch" else int(s) for s in e["shape"]]
        if e["role"] == "y":
            feed[e["name"]] = rng.integers(0, 5, shape).astype(np.int64)
        elif e["name"].endswith("running_var"):
            feed[e["name"]] = (rng.random(shape) + 0.5).astype(np.float32)
        elif e["role"] == "lr":
            feed[e["name"]] = np.array(0.05, np.float32)
        else:
            feed[e["name"]] = np.asarray(rng.standard_normal(shape) * 0.3, np.float32)
    return feed


def _attr(node: onnx.NodeProto, name: str) -> object:
    value = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)
    return tuple(value) if isinstance(value, list) else value


def test_variant_moves_only_the_suited_convolutions() -> None:
    _, _, _, g = _export()
    alt = _alt_of(g.onnx)  # type: ignore[attr-defined]
    moved = [
        (_attr(n, "strides"), _attr(n, "group"))
        for n in alt.graph.node
        if n.domain == nchwc.DOMAIN and n.op_type == "Conv"
    ]
    # the stem and the 16->32 3x3 (stride 2, group 1), the depthwise 16 layer (forward, input
    # gradient and the stacked weight gradient, stride 1), the strided depthwise 32 forward
    assert sorted(moved) == [
        ((1, 1), 16),
        ((1, 1), 16),
        ((1, 1), 16),
        ((2, 2), 1),
        ((2, 2), 1),
        ((2, 2), 32),
    ]
    kept = sorted(
        (n.op_type, _attr(n, "group"), _attr(n, "strides"))
        for n in alt.graph.node
        if n.op_type in ("Conv", "ConvTranspose") and n.domain == ""
    )
    assert kept == [
        ("Conv", 1, (1, 1)),  # pointwise 32 -> 12 (1x1 loses on NCHWc)
        ("Conv", 1, (1, 1)),  # 12 -> 16 3x3: 12 input channels
        ("Conv", 1, (1, 1)),  # input gradient of the pointwise (a 1x1 Conv by W^T)
        ("Conv", 12, (1, 1)),  # depthwise, 12 channels
        ("Conv", 32, (1, 1)),  # the strided depthwise weight gradient (its kernel is data)
        ("ConvTranspose", 1, (1, 1)),  # input gradient of the 12 -> 16 3x3
        ("ConvTranspose", 1, (2, 2)),  # input gradient of the strided 16 -> 32 3x3
        ("ConvTranspose", 12, (1, 1)),  # depthwise 12 input gradient
        ("ConvTranspose", 32, (2, 2)),  # strided depthwise input gradient
    ], kept


@pytest.mark.parametrize("batch", [1, 3])
def test_variant_outputs_equal_the_default_graph(batch: int) -> None:
    _, _, _, g = _export()
    default = onnx.load_from_string(g.onnx)  # type: ignore[attr-defined]
    alt = _alt_of(g.onnx)  # type: ignore[attr-defined]
    feed = _feed(g.manifest, batch, seed=batch)  # type: ignore[attr-defined]
    want = _session(default).run(None, feed)
    got = _session(alt).run(None, feed)
    names = [o.name for o in default.graph.output]
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(np.max(np.abs(got[0]))) > 0  # a real loss came out


def test_gate_checks_variants_against_the_same_torch_reference() -> None:
    m, x, y, g = _export()
    good = _alt_of(g.onnx)  # type: ignore[attr-defined]
    wrong = onnx.ModelProto()
    wrong.CopyFrom(good)
    for n in wrong.graph.node:  # the kernel's axes swapped in the weight reorder: runs, wrong
        if n.op_type == "Transpose" and n.output[0].startswith("nchwc_"):
            perm = list(onnx.helper.get_attribute_value(n.attribute[0]))
            if len(perm) < 5:  # the stacked weight gradient's block moves, not a reorder
                continue
            perm[2], perm[3] = perm[3], perm[2]
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("perm", perm))
    broken = onnx.ModelProto()
    broken.CopyFrom(good)
    for n in broken.graph.node:
        if n.domain == nchwc.DOMAIN and n.op_type == "Conv":
            n.op_type = "ConvNoSuchKernel"  # an onnxruntime build without the kernel
    variants = {
        k: v.SerializeToString() for k, v in (("good", good), ("wrong", wrong), ("broken", broken))
    }
    loss_fn = _loss_fn("cross_entropy")[1]
    worst, results = verify_step_variants(
        g,  # type: ignore[arg-type]
        m,
        loss_fn,
        SGD(momentum=0.9),
        x,
        y,
        False,
        variants=variants,
    )
    assert set(worst) >= {"loss", "param"}
    ok = results["good"]
    assert isinstance(ok, dict) and ok["loss"] < 1e-4 and ok["param"] < 1e-4
    assert isinstance(results["wrong"], VerificationError)
    assert "variant wrong disagrees" in str(results["wrong"])
    assert isinstance(results["broken"], Exception)
    assert "ConvNoSuchKernel" in str(results["broken"])
    # the exporter drops a failed variant with a warning and keeps the step graph as it was
    before = g.onnx  # type: ignore[attr-defined]
    g.manifest.pop("alternatives")  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="NCHWc step variant dropped: variant wrong"):
        _attach_nchwc(g, variants["wrong"], results["wrong"])  # type: ignore[arg-type]
    assert g.onnx is before and "alternatives" not in g.manifest  # type: ignore[attr-defined]
