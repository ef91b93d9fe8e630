"""Atomic coordinator checkpoints: one ``.npz`` with every array and a JSON metadata blob.

Written to a temporary file in the same directory, fsynced, then ``os.replace``d over the
previous checkpoint and the directory fsynced: a coordinator killed at any instant leaves
either the old or the new checkpoint, never a torn one, and a finished round is never lost.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.atomic import atomic_write

FORMAT = "edgefed.coordinator-checkpoint/1"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    round: int  # number of finished rounds
    model_version: str
    params: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # device stats, history, config hash
    # what the round loop's collector needs to resume beyond the engine (an in-process
    # simulated fleet: its devices' error-feedback residuals), ``<owner>/<name>`` -> array
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _split_strategy_state(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Numeric arrays go into the npz; JSON values (a DP ledger, say) into the header.

    An object array would be pickled by np.savez and then refused by the loader
    (allow_pickle=False): a checkpoint that saves but can never be restored. Refused here.
    """
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray | np.generic) and v.dtype != object:
            arrays[f"strategy/{k}"] = np.asarray(v)
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"strategy state {k!r} is neither an array nor JSON: {e}") from e
        plain[k] = v
    return arrays, plain


def save_checkpoint(path: str | Path, ck: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"param/{k}": v for k, v in ck.params.items()}
    strat_arrays, strat_json = _split_strategy_state(ck.strategy_state)
    arrays.update(strat_arrays)
    arrays.update({f"extra/{k}": np.asarray(v) for k, v in ck.extra.items()})
    header = {
        "format": FORMAT,
        "round": ck.round,
        "model_version": ck.model_version,
        "meta": ck.meta,
        "strategy_json": strat_json,
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getbuffer())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate; CheckpointError names what is wrong (never pickle: allow_pickle off)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                raise CheckpointError(f"{path}: no metadata")
            header = json.loads(z["__meta__"].tobytes().decode())
            params = {k[6:]: z[k] for k in z.files if k.startswith("param/")}
            strat = {k[9:]: z[k] for k in z.files if k.startswith("strategy/")}
            extra = {k[6:]: z[k] for k in z.files if k.startswith("extra/")}
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {header.get('format')!r}")
    if not isinstance(header.get("round"), int) or header["round"] < 0:
        raise CheckpointError(f"{path}: bad round {header.get('round')!r}")
    for k, v in params.items():
        if v.dtype != np.float32 or not np.isfinite(v).all():
            raise CheckpointError(f"{path}: parameter {k!r} is not finite float32")
    plain = header.get("strategy_json", {})
    if not isinstance(plain, dict) or set(plain) & set(strat):
        raise CheckpointError(f"{path}: bad strategy_json (not an object, or repeats an array)")
    strat.update(plain)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata 'meta' is not an object")
    return Checkpoint(header["round"], str(header["model_version"]), params, strat, meta, extra)
