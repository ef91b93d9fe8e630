"""The device's data file against the data contract the coordinator announces (the graph
manifest's ``data_contract``: per-sample shape and dtype of ``x``, label dtype and classes;
README "Your own model").

Checked before any training, so a data file made for another model is one line naming the
file, what the model expects and what the file holds (refused and reported to the
coordinator) instead of an onnxruntime error in the middle of a round.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _kind(dtype: str) -> str:
    return "f" if dtype.startswith(("float", "bfloat")) else "i"


def contract_mismatch(contract: Any, x: np.ndarray, y: np.ndarray, where: str) -> str | None:
    """None if ``x`` and ``y`` satisfy ``contract``, else the one-line reason.

    A float file for a float32 model is accepted (the trainer casts float kinds, as before);
    an integer file for a float model, or the reverse, is not. Symbolic dimensions (the
    ``"batch"`` axis) match any size."""
    if not isinstance(contract, dict) or not isinstance(contract.get("x_shape"), list):
        return None  # a coordinator older than issue 14 announces none
    want = contract["x_shape"]
    dtype = str(contract.get("x_dtype", x.dtype))
    dims, found = want[1:], [int(d) for d in x.shape[1:]]
    fits = len(dims) == len(found) and all(
        isinstance(d, str) or d == f for d, f in zip(dims, found, strict=True)
    )
    kind_ok = x.dtype.kind in ("f" if _kind(dtype) == "f" else "iu")
    if not fits or not kind_ok:
        return (
            f"data contract: {where}: x is {x.dtype}{list(x.shape)} (per sample {found}), "
            f"the federated model expects {dtype}{want} (per sample {dims})"
        )
    k = contract.get("num_classes")
    if isinstance(k, int) and contract.get("y_dtype") == "int64" and y.size:
        if y.dtype.kind not in "iu":
            return f"data contract: {where}: y is {y.dtype}, expected int64 class indices"
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            return (
                f"data contract: {where}: y holds class {bad}, "
                f"the federated model has classes 0..{k - 1}"
            )
    return None
