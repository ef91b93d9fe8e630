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

    @classmethod
    def load(cls, directory: str | Path) -> FederatedModel:
        d = Path(directory)
        with np.load(d / "initial.npz", allow_pickle=False) as z:
            initial = {k: z[k].astype(np.float32) for k in z.files}
        graphs = {}
        for m in sorted(d.glob("*.manifest.json")):
            gid = m.name.split(".")[0]
            graphs[gid] = GraphBundle(
                gid,
                (d / f"{gid}.step.onnx").read_bytes(),
                json.loads(m.read_text()),
                (d / f"{gid}.inference.onnx").read_bytes(),
            )
        return cls(initial, graphs)


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
