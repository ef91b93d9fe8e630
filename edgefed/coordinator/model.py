"""What the coordinator federates: global tensors plus one or more exported step graphs.

A mixed fleet gets two graphs of ONE model: ``full`` (every parameter trainable) for strong
devices and ``head`` (only the last layers trainable; the body is fed as frozen inputs) for
weak ones. Both update the same global tensors; head-only updates simply carry fewer
tensors and the strategies average per coordinate.

:func:`build_federated_model` needs torch (``edgefed.train_export``); everything else here
is torch-free so saved models can be loaded by a torch-free process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class GraphBundle:
    graph_id: str  # "full" or "head"
    onnx: bytes
    manifest: dict[str, Any]
    inference_onnx: bytes

    @property
    def sha(self) -> str:
        h = hashlib.sha256(self.onnx)
        h.update(json.dumps(self.manifest, sort_keys=True).encode())
        return h.hexdigest()[:16]

    @property
    def updated(self) -> list[str]:
        """Tensors a device trained with this graph sends back (trainable + updated buffers)."""
        return list(self.manifest["trainable"]) + list(self.manifest.get("updated_buffers", []))


@dataclass
class FederatedModel:
    initial: dict[str, np.ndarray]  # every global tensor (parameters and float buffers)
    graphs: dict[str, GraphBundle] = field(default_factory=dict)
    # How to rebuild the torch module (written into the model artefact, see artifact.py):
    # {"factory": "/abs/file.py:func" | "builtin": name, "input_shape": [...],
    #  "input_dtype": ..., "loss": ..., "num_classes": ...}; empty when unknown.
    source: dict[str, Any] = field(default_factory=dict)
    # The coordinator's held-out (x, y), when it has one: the artefact keeps a copy so
    # ``edgefed export --run`` calibrates and measures on the same set (not saved by save()).
    evaluation: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.initial.items()}

    @property
    def num_params(self) -> int:
        return int(sum(v.size for v in self.initial.values()))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "initial.npz", **self.initial)
        for gid, g in self.graphs.items():
            (d / f"{gid}.step.onnx").write_bytes(g.onnx)
            (d / f"{gid}.inference.onnx").write_bytes(g.inference_onnx)
            (d / f"{gid}.manifest.json").write_text(json.dumps(g.manifest))
        if self.source:
            (d / "source.json").write_text(json.dumps(self.source, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> FederatedModel:
        d = Path(directory)
        with np.load(d / "initial.npz", allow_pickle=False) as z:
            initial = {k: z[k].astype(np.float32) for k in z.files}
        graphs = {}
        src = d / "source.json"
        source = json.loads(src.read_text()) if src.is_file() else {}
        for m in sorted(d.glob("*.manifest.json")):
            gid = m.name.split(".")[0]
            graphs[gid] = GraphBundle(
                gid,
                (d / f"{gid}.step.onnx").read_bytes(),
                json.loads(m.read_text()),
                (d / f"{gid}.inference.onnx").read_bytes(),
            )
        return cls(initial, graphs, source)


def last_layer_names(model: Any) -> list[str]:
    """Parameter names of the last module that owns parameters (the classifier head)."""
    owner = None
    for _, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            owner = mod
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in owner.parameters(recurse=False)] if owner else []


def build_federated_model(
    model: Any,
    example_batch: tuple[Any, Any],
    *,
    loss: str = "cross_entropy",
    momentum: float = 0.0,
    head: list[str] | str | None = None,
    fedprox: bool = False,
) -> FederatedModel:
    """Export the full step graph (and a head-only one when ``head`` is given; ``"last"``
    picks the last layer's parameters). Needs torch; each export passes the verification
    gate of :mod:`edgefed.train_export`."""
    import torch  # noqa: F401  (torch side only)

    from edgefed.train_export import SGD, export_training_step

    opt = SGD(momentum=momentum)
    full = export_training_step(model, example_batch, loss=loss, optimizer=opt, fedprox=fedprox)
    graphs = {"full": GraphBundle("full", full.onnx, full.manifest, full.inference_onnx)}
    if head is not None:
        names = last_layer_names(model) if head == "last" else list(head)
        h = export_training_step(
            model, example_batch, loss=loss, optimizer=opt, trainable=names, fedprox=fedprox
        )
        graphs["head"] = GraphBundle("head", h.onnx, h.manifest, h.inference_onnx)
    initial = {k: np.ascontiguousarray(v, np.float32) for k, v in full.initial_params.items()}
    return FederatedModel(initial, graphs)


# ---- the model a coordinator config names ([model] builtin / factory / dir) ----------------

# Built-in demo models: name -> (per-sample input shape, dtype). Their step graphs are traced
# on real digits samples (edgefed.zoo.data), exactly as before factories existed.
BUILTIN_INPUTS: dict[str, tuple[list[int], str]] = {
    "digits_mlp": ([64], "float32"),
    "digits_cnn": ([1, 8, 8], "float32"),
}
LOSSES = ("cross_entropy", "mse")


class ModelConfigError(ValueError):
    """A [model] table that cannot describe a model (one line naming the key)."""


def model_source(model_cfg: Any, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The rebuild recipe of a ``[model]`` table (torch-free): what the artefact records.

    Reads the keys dict-style (``builtin`` or ``factory``, ``input_shape``, ``input_dtype``,
    ``loss``, ``num_classes``); a factory file is made absolute relative to ``base_dir``
    (the config's directory) so the recipe resolves from anywhere.
    """
    from edgefed.usermodel import canonical_spec

    loss = model_cfg.get("loss", "cross_entropy")
    if loss not in LOSSES:
        raise ModelConfigError(f"[model] loss: expected one of {LOSSES}, found {loss!r}")
    src: dict[str, Any] = {"loss": loss}
    if model_cfg.get("factory"):
        shape = model_cfg.get("input_shape")
        if (
            not isinstance(shape, (list, tuple))
            or not shape
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise ModelConfigError(
                f"[model] input_shape: expected the per-sample shape as a list of positive "
                f"ints (no batch axis), e.g. [1, 28, 28], found {shape!r}"
            )
        src["factory"] = canonical_spec(model_cfg["factory"], base_dir)
        src["input_shape"] = list(shape)
        src["input_dtype"] = str(model_cfg.get("input_dtype", "float32"))
    elif model_cfg.get("builtin"):
        name = model_cfg["builtin"]
        if name not in BUILTIN_INPUTS:
            raise ModelConfigError(
                f"[model] builtin: expected one of {sorted(BUILTIN_INPUTS)}, found {name!r}"
            )
        src["builtin"] = name
        src["input_shape"], src["input_dtype"] = list(BUILTIN_INPUTS[name][0]), "float32"
    else:
        raise ModelConfigError("[model] needs factory = 'file.py:function' or builtin = name")
    if model_cfg.get("num_classes") is not None:
        src["num_classes"] = int(model_cfg["num_classes"])
    return src


def build_module(source: dict[str, Any]) -> Any:
    """The torch module of a recipe (fresh weights). Torch side."""
    if "builtin" in source:
        from edgefed.zoo import models

        return models.digits_cnn() if source["builtin"] == "digits_cnn" else models.digits_mlp(64)
    if "factory" in source:
        from edgefed.usermodel import build_user_model

        return build_user_model(source["factory"])
    raise ModelConfigError(f"model recipe names neither a factory nor a builtin: {source}")


def example_batch(source: dict[str, Any], net: Any, n: int = 8) -> tuple[Any, Any]:
    """(x, y) to trace the step graphs with: real digits for builtins, else synthetic data of
    the announced per-sample shape/dtype (tracing needs shapes, not meaningful values)."""
    import torch

    if "builtin" in source:
        from edgefed.zoo.data import load_digits_arrays

        x, y = load_digits_arrays(source["builtin"] == "digits_cnn")
        return torch.from_numpy(x[:n].copy()), torch.from_numpy(y[:n].copy())
    dtype = getattr(torch, source["input_dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ModelConfigError(
            f"[model] input_dtype: expected a torch dtype name such as 'float32' or 'int64', "
            f"found {source['input_dtype']!r}"
        )
    g = torch.Generator().manual_seed(0)
    shape = (n, *source["input_shape"])
    x = (
        torch.randn(shape, generator=g).to(dtype)
        if dtype.is_floating_point
        else torch.randint(0, 2, shape, generator=g).to(dtype)
    )
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as e:
        raise ModelConfigError(
            f"[model] factory {source['factory']}: a batch of shape {list(shape)} "
            f"({source['input_dtype']}) does not go through the model: {type(e).__name__}: {e}"
        ) from e
    if source["loss"] == "mse":
        return x, torch.randn(out.shape, generator=g)
    if out.dim() != 2:
        raise ModelConfigError(
            f"[model] loss = 'cross_entropy': expected logits of shape (batch, classes), "
            f"the model returns {list(out.shape)}"
        )
    k = source.get("num_classes")
    if k is not None and out.shape[1] != k:
        raise ModelConfigError(
            f"[model] num_classes = {k} but the model returns {out.shape[1]} logits"
        )
    return x, torch.randint(0, out.shape[1], (n,), generator=g)


def data_contract(source: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """What every device's data file must hold (README "Your own model")."""
    c: dict[str, Any] = {
        "x_shape": ["batch", *source["input_shape"]],
        "x_dtype": source["input_dtype"],
        "y_dtype": "int64" if source["loss"] == "cross_entropy" else "float32",
    }
    if "num_classes" in manifest:
        c["num_classes"] = manifest["num_classes"]
    return c


def federated_model_from_config(
    model_cfg: Any,
    base_dir: str | Path | None = None,
    *,
    seed: int = 0,
    fedprox: bool = False,
) -> FederatedModel:
    """The coordinator's model from its ``[model]`` table: a saved directory (``dir``), a
    built-in name or the user's factory, whose step graphs are exported here (torch side)."""
    if model_cfg.get("dir"):
        return FederatedModel.load(model_cfg["dir"])
    import torch

    src = model_source(model_cfg, base_dir)
    torch.manual_seed(seed)
    net = build_module(src)
    ex = example_batch(src, net)
    from edgefed.train_export import TrainExportError

    try:
        fm = build_federated_model(
            net,
            ex,
            loss=src["loss"],
            momentum=float(model_cfg.get("momentum", 0.0)),
            head=model_cfg.get("head"),
            fedprox=fedprox,
        )
    except TrainExportError as e:
        what = src.get("factory") or src.get("builtin")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"[model] {what}: its training step cannot be exported: {first}"
        raise ModelConfigError(msg) from None
    full = fm.graphs["full"].manifest
    if "num_classes" in full:
        src.setdefault("num_classes", full["num_classes"])
    for g in fm.graphs.values():
        g.manifest["data_contract"] = data_contract(src, full)
    fm.source = src
    return fm
