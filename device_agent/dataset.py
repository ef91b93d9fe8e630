"""Local datasets for on-device training: arrays or .npz files, and the mini-batch order.

The batch order is a pure function of (n, epochs, batch_size, seed, shuffle) so a reference
run elsewhere (e.g. torch on the coordinator) can replay exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """The local dataset is malformed (names the file/array and the problem)."""


def load_npz(path: str | Path, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Load (x, y) from an .npz file; pickled object arrays are refused."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in (x_key, y_key) if k not in z.files]
            if missing:
                raise DatasetError(f"{p}: missing arrays {missing} (has {z.files})")
            return np.asarray(z[x_key]), np.asarray(z[y_key])
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{p}: not a readable .npz file: {e}") from e


def batch_order(
    n: int, epochs: int, batch_size: int, seed: int, shuffle: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (epoch, indices) for every mini-batch; the last partial batch is kept."""
    if n <= 0 or epochs < 0 or batch_size <= 0:
        raise DatasetError(
            f"need n > 0, epochs >= 0, batch_size > 0 (got {n}, {epochs}, {batch_size})"
        )
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            yield epoch, order[start : start + batch_size]
