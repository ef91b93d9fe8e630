"""The federated model as an artefact: weights + how to rebuild the module + a manifest.

Why a directory of plain files (docs/model-artifact.md): a user must be able to take the
model a run produced out of edgefed — ``np.load`` the weights, rebuild the ``nn.Module``
from the recorded factory (or built-in name) and ``load_state_dict`` — and ``edgefed export
--run`` must find the teacher, its input signature and the coordinator's evaluation set in
one place. Layout::

    federated-model/
      model.json       manifest: format, run id, round, model version, metrics, rebuild recipe,
                       input signature, tensor shapes, sha256 of weights.npz
      weights.npz      the state dict (parameters + float buffers, float32, state_dict names)
      inference.onnx   the inference graph (weights as inputs, see model.json "inference")
      evaluation.npz   the coordinator's held-out set (x, y), when it has one

Each file is written to a temporary name and renamed; model.json (written last) carries the
sha256 of weights.npz, so a reader never pairs a manifest with other weights. The writer is
torch-free (it runs in the coordinator's checkpoint path); :func:`load_module` is torch side.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.atomic import atomic_write

FORMAT = "edgefed.federated-model/1"
DIRNAME = "federated-model"


class ArtifactError(ValueError):
    """An artefact that cannot be read (one line naming the file and what is wrong)."""


def artifact_dir_for(checkpoint: str | Path) -> Path:
    """Where the coordinator keeps the artefact: beside its checkpoint file."""
    return Path(checkpoint).resolve().parent / DIRNAME


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _same_file(path: Path, data: bytes) -> bool:
    return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data


def write_artifact(
    directory: str | Path,
    params: dict[str, np.ndarray],
    source: dict[str, Any],
    *,
    run_id: str,
    round: int,
    model_version: str,
    metrics: dict[str, Any] | None = None,
    inference: tuple[bytes, dict[str, Any]] | None = None,
    evaluation: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write (or overwrite) the artefact in ``directory``; returns the model.json path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = _npz_bytes({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()})
    atomic_write(d / "weights.npz", weights)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "run_id": run_id,
        "round": int(round),
        "model_version": model_version,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": metrics or {},
        "model": {k: v for k, v in source.items()},
        "input": {
            "name": "x",
            "shape": ["batch", *source.get("input_shape", [])],
            "dtype": source.get("input_dtype", "float32"),
        },
        "tensors": {k: list(v.shape) for k, v in params.items()},
        "weights": {"file": "weights.npz", "sha256": hashlib.sha256(weights).hexdigest()},
    }
    if inference is not None:
        onnx_bytes, graph_manifest = inference
        if not _same_file(d / "inference.onnx", onnx_bytes):
            atomic_write(d / "inference.onnx", onnx_bytes)
        manifest["inference"] = {"file": "inference.onnx", **graph_manifest.get("inference", {})}
    if evaluation is not None:
        x, y = evaluation
        ev = _npz_bytes({"x": np.asarray(x), "y": np.asarray(y)})
        if not _same_file(d / "evaluation.npz", ev):
            atomic_write(d / "evaluation.npz", ev)
        manifest["evaluation"] = {"file": "evaluation.npz", "samples": len(y)}
    path = d / "model.json"
    atomic_write(path, json.dumps(manifest, indent=1).encode())
    return path


def write_engine_artifact(directory: str | Path, engine: Any) -> Path:
    """The coordinator's hook (each checkpoint and the end): the engine's current global
    model, its last round's metrics and the rebuild recipe its FederatedModel carries."""
    d = Path(directory)
    fm = engine.model
    full = fm.graphs.get("full")
    source = dict(fm.source)
    if "input_shape" not in source and full is not None:  # a saved dir without source.json
        x = next((e for e in full.manifest.get("inputs", []) if e.get("role") == "x"), None)
        if x is not None:
            source["input_shape"], source["input_dtype"] = list(x["shape"][1:]), x["dtype"]
    return write_artifact(
        d,
        engine.params,
        source,
        run_id=engine.run_id,  # new at a fresh start, kept across restarts by the checkpoint
        round=engine.round,
        model_version=engine.model_version,
        metrics=engine.history[-1] if engine.history else {},
        inference=(full.inference_onnx, full.manifest) if full is not None else None,
        evaluation=fm.evaluation,
    )


@dataclass
class Artifact:
    directory: Path
    manifest: dict[str, Any]
    params: dict[str, np.ndarray]

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest.get("model", {})

    def evaluation(self) -> tuple[np.ndarray, np.ndarray] | None:
        p = self.directory / "evaluation.npz"
        if "evaluation" not in self.manifest or not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return z["x"], z["y"]


def find_artifact(path: str | Path) -> Path:
    """The artefact directory for an artefact dir, a state dir holding ``federated-model/``,
    a model.json, or a coordinator config (its ``[coordinator] checkpoint``'s directory)."""
    p = Path(path)
    if p.is_file() and p.name == "model.json":
        return p.parent
    if p.is_dir():
        for cand in (p, p / DIRNAME):
            if (cand / "model.json").is_file():
                return cand
        raise ArtifactError(f"{p}: no model.json here nor in {p / DIRNAME}")
    if p.is_file() and p.suffix == ".toml":
        from edgefed.coordinator.config import CoordinatorConfig

        cfg = CoordinatorConfig.load(p)
        base = artifact_dir_for(cfg.checkpoint) if cfg.checkpoint else p.resolve().parent / DIRNAME
        if not (base / "model.json").is_file():
            raise ArtifactError(
                f"{p}: the coordinator's model artefact {base / 'model.json'} does not exist "
                f"(has the coordinator finished a round?)"
            )
        return base
    raise ArtifactError(
        f"{p}: expected a coordinator config (.toml), a state directory or a model artefact"
    )


def read_artifact(path: str | Path) -> Artifact:
    """Read and check an artefact (torch-free); ArtifactError names the file."""
    d = find_artifact(path)
    mpath = d / "model.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath}: unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{mpath}: expected format {FORMAT!r}, found {found!r}")
    wpath = d / manifest["weights"]["file"]
    try:
        raw = wpath.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{wpath}: {e}") from e
    if hashlib.sha256(raw).hexdigest() != manifest["weights"]["sha256"]:
        raise ArtifactError(f"{wpath}: sha256 differs from {mpath} (weights of another round?)")
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        params = {k: z[k] for k in z.files}
    return Artifact(d, manifest, params)


def load_module(path: str | Path | Artifact) -> Any:
    """Rebuild the federated ``nn.Module`` (recipe in model.json) with its weights. Torch side."""
    import torch

    from edgefed.coordinator.model import build_module

    art = path if isinstance(path, Artifact) else read_artifact(path)
    if not art.source.get("factory") and not art.source.get("builtin"):
        raise ArtifactError(
            f"{art.directory / 'model.json'}: no rebuild recipe (the model came from a saved "
            f"directory without source.json); load weights.npz into your module yourself"
        )
    net = build_module(art.source)
    state = net.state_dict()
    missing = [k for k in art.params if k not in state]
    if missing:
        raise ArtifactError(
            f"{art.directory}: weights {missing[:3]} are not in the module "
            f"{art.source.get('factory') or art.source.get('builtin')} builds"
        )
    lacking = [k for k, v in state.items() if k not in art.params and v.is_floating_point()]
    if lacking:
        raise ArtifactError(f"{art.directory}: weights.npz lacks {lacking[:3]}")
    for k, v in art.params.items():
        if tuple(state[k].shape) != v.shape:
            raise ArtifactError(
                f"{art.directory}: {k} has shape {list(v.shape)} in weights.npz, "
                f"{list(state[k].shape)} in the module"
            )
        state[k] = torch.from_numpy(np.array(v, dtype=np.float32))
    net.load_state_dict(state)
    return net.eval()
