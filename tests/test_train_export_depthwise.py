"""Depthwise 2-D convolution paths of the training-step exporter (issue 13, dw13) against
torch autograd: the strided weight gradient as one grouped Conv (geometries where the
stride does not divide the padded map, dilation, rectangular kernels), and an exported
strided depthwise step trained in the torch-free trainer like torch; the NCHWc alternative
step graph, the trainer's one-batch check and its fallbacks (alternative that cannot load,
that disagrees, graphs that get none)."""

from __future__ import annotations

import base64
import copy
import logging
import zlib

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, decompositions, export_training_step, nchwc

# (channels, height, width, kh, kw, stride, padding, dilation)
DEPTHWISE_2D = [
    (4, 9, 9, 3, 3, (2, 2), (1, 1), (1, 1)),
    (3, 15, 13, 3, 3, (2, 3), (2, 1), (2, 1)),
    (5, 8, 7, 5, 3, (3, 2), (2, 0), (1, 1)),
    (2, 6, 6, 3, 3, (1, 1), (1, 1), (1, 1)),
    (6, 11, 10, 2, 4, (2, 1), (0, 2), (1, 2)),
]


@pytest.mark.parametrize("geom", DEPTHWISE_2D)
def test_depthwise_weight_grad_matches_autograd(geom: tuple) -> None:
    c, h, w, kh, kw, s, p, d = geom
    gen = torch.Generator().manual_seed(sum(geom[:5]))
    x = torch.randn(5, c, h, w, generator=gen)
    wt = torch.randn(c, 1, kh, kw, generator=gen, requires_grad=True)
    y = F.conv2d(x, wt, None, s, p, d, c)
    g = torch.randn(y.shape, generator=gen)
    want = torch.autograd.grad(y, wt, g)[0]
    got = decompositions._weight_grad(g, x, wt.shape, list(s), list(p), list(d), c)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_exported_strided_depthwise_step_trains_like_torch() -> None:
    torch.manual_seed(5)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 3),
    )
    x = torch.randn(6, 3, 9, 9)
    g = export_training_step(m, (x, torch.randint(0, 3, (6,))), optimizer=SGD(momentum=0.9))
    xb = np.random.default_rng(1).standard_normal((8, 3, 9, 9)).astype(np.float32)
    tr = _train(g.onnx, g, m, (xb, np.arange(8) % 3))
    init = m.state_dict()["2.weight"].numpy()
    assert not np.allclose(tr.params["2.weight"], init)  # the depthwise layer learnt


# ----- NCHWc alternative (edgefed.train_export.nchwc) and the trainer's dispatch --------------
class DepthwiseNet(nn.Module):
    """A user's MobileNet-like block: 16 channels (suits every NCHWc block size)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.stem(x))
        h = F.relu6(self.dw(h))
        h = self.dw2(h) + h
        return self.head(h.mean(dim=(2, 3)))


def _exported() -> tuple[nn.Module, object]:
    torch.manual_seed(11)
    m = DepthwiseNet()
    x = torch.randn(6, 3, 7, 7)
    return m, export_training_step(m, (x, torch.randint(0, 4, (6,))), optimizer=SGD(momentum=0.9))


def _batch() -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(2).standard_normal((10, 3, 7, 7)).astype(np.float32), (
        np.arange(10) % 4
    )


def _torch_reference(m: nn.Module, xb: np.ndarray, yb: np.ndarray, steps: int) -> nn.Module:
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(ref(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        opt.step()
    return ref


def _train(
    step: bytes, g: object, m: nn.Module, batch: tuple[np.ndarray, np.ndarray] | None = None
) -> StepTrainer:
    """3 full-batch SGD-momentum steps in the trainer; parameters must match torch's."""
    tr = StepTrainer(step, g.manifest)  # type: ignore[attr-defined]
    tr.set_params({k: v.detach().numpy() for k, v in m.state_dict().items()}, strict=False)
    xb, yb = batch if batch is not None else _batch()
    tr.train_epochs(xb, yb, epochs=3, batch_size=len(xb), lr=0.1, shuffle=False)
    ref = _torch_reference(m, xb, yb, 3)
    for k, v in ref.state_dict().items():
        if k in tr.params:
            np.testing.assert_allclose(tr.params[k], v.detach().numpy(), rtol=1e-4, atol=2e-5)
    return tr


def _alt_of(step: bytes) -> onnx.ModelProto:
    meta = {p.key: p.value for p in onnx.load_from_string(step).metadata_props}
    return onnx.load_from_string(zlib.decompress(base64.b64decode(meta[nchwc.METADATA_KEY])))


def _with_metadata(step: bytes, value: str | onnx.ModelProto) -> bytes:
    if isinstance(value, onnx.ModelProto):  # packed as the exporter packs it
        value = base64.b64encode(zlib.compress(value.SerializeToString())).decode()
    model = onnx.load_from_string(step)
    (entry,) = [p for p in model.metadata_props if p.key == nchwc.METADATA_KEY]
    entry.value = value
    return model.SerializeToString()


def test_nchwc_alternative_is_embedded_verified_and_used_by_the_trainer(caplog) -> None:
    m, g = _exported()
    main = onnx.load_from_string(g.onnx)
    assert all(n.domain in ("", "ai.onnx") for n in main.graph.node)  # shipped graph: default
    alt_meta = g.manifest["alternatives"]["nchwc"]
    assert alt_meta["verification"]["batches"]
    alt = _alt_of(g.onnx)
    convs = [n for n in alt.graph.node if n.domain == nchwc.DOMAIN and n.op_type == "Conv"]
    groups = sorted(
        onnx.helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "group"
    )
    # the 3-channel stem; 2 depthwise forwards, 2 input and 2 (stacked) weight gradients
    assert groups == [1, 16, 16, 16, 16, 16, 16]
    with caplog.at_level(logging.INFO, logger="device_agent.trainer"):
        tr = _train(g.onnx, g, m)
    assert tr.kernel_path == "nchwc", tr.dispatch_note
    assert "agrees" in caplog.text


def test_trainer_falls_back_when_the_alternative_cannot_load(caplog) -> None:
    m, g = _exported()
    alt = _alt_of(g.onnx)
    for n in alt.graph.node:
        if n.domain == nchwc.DOMAIN and n.op_type == "Conv":
            n.op_type = "ConvNoSuchKernel"  # what an onnxruntime build without NCHWc meets
    broken = _with_metadata(g.onnx, alt)
    with caplog.at_level(logging.WARNING, logger="device_agent.trainer"):
        tr = _train(broken, g, m)
    assert tr.kernel_path == "default"
    assert "does not load" in tr.dispatch_note and "does not load" in caplog.text
    for bad in ("not base64 at all!", base64.b64encode(b"not zlib").decode()):
        assert _train(_with_metadata(g.onnx, bad), g, m).kernel_path == "default"
    # a zlib bomb: 64 MiB of zeros in a few KB; inflating stops at the bound, nothing is built
    bomb = base64.b64encode(zlib.compress(bytes(64 << 20), 9)).decode()
    tr = _train(_with_metadata(g.onnx, bomb), g, m)
    assert tr.kernel_path == "default" and "larger than" in tr.dispatch_note


def test_trainer_self_check_rejects_an_alternative_that_disagrees(caplog) -> None:
    m, g = _exported()
    alt = _alt_of(g.onnx)
    for n in alt.graph.node:  # a wrong weight layout: loads and runs, computes nonsense
        if n.op_type == "Transpose" and n.output[0].startswith("nchwc_"):
            perm = list(onnx.helper.get_attribute_value(n.attribute[0]))
            if len(perm) < 5:  # the stacked weight gradient's block moves, not a reorder
                continue
            perm[2], perm[3] = perm[3], perm[2]  # the kernel's axes swapped: same size
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("perm", perm))
    wrong = _with_metadata(g.onnx, alt)
    with caplog.at_level(logging.WARNING, logger="device_agent.trainer"):
        tr = _train(wrong, g, m)  # trains like torch: the default graph took over
    assert tr.kernel_path == "default"
    assert "disagrees" in tr.dispatch_note and "disagrees" in caplog.text


def test_random_graphs_and_unsuited_channels_get_no_alternative() -> None:
    torch.manual_seed(4)
    odd = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Flatten(), nn.Linear(6 * 25, 2))
    x = torch.randn(4, 3, 5, 5)
    g = export_training_step(odd, (x, torch.randint(0, 2, (4,))))
    assert "alternatives" not in g.manifest
    drop = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Dropout(0.2), nn.Flatten(),
        nn.Linear(16 * 9, 2),
    )  # fmt: skip
    g = export_training_step(drop, (torch.randn(4, 16, 3, 3), torch.randint(0, 2, (4,))))
    assert "alternatives" not in g.manifest
    assert StepTrainer(g.onnx, g.manifest).dispatch_note == "no alternative graph in the step"
