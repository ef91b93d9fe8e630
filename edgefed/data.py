"""Federated splits of sklearn's digits (offline: load_digits ships with scikit-learn).

Non-IID by Dirichlet label skew (Hsu et al. 2019): for each class, the share each device
gets is drawn from Dir(alpha); small alpha = few classes per device. Every device is
guaranteed ``min_samples`` samples (redrawn otherwise) so no device has nothing to train on.
"""

from __future__ import annotations

import numpy as np


def load_digits_arrays(image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x float32 scaled to [0, 1] (n, 64) or (n, 1, 8, 8); y int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def train_test_split(
    x: np.ndarray, y: np.ndarray, test_size: int = 397, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(x))
    te, tr = perm[:test_size], perm[test_size:]
    return x[tr], y[tr], x[te], y[te]


def dirichlet_split(
    y: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 8
) -> list[np.ndarray]:
    """Indices per device with Dirichlet(alpha) label skew."""
    if num_devices < 1 or alpha <= 0:
        raise ValueError("need num_devices >= 1 and alpha > 0")
    if len(y) < num_devices * min_samples:
        raise ValueError(f"{len(y)} samples cannot give {num_devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise RuntimeError("could not draw a split with enough samples per device; raise alpha")


def digits_federated(
    num_devices: int,
    alpha: float = 0.5,
    seed: int = 0,
    image: bool = False,
    test_size: int = 397,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """(per-device (x, y) list, held-out (x, y)) for the digits benchmark and demo."""
    x, y = load_digits_arrays(image)
    xtr, ytr, xte, yte = train_test_split(x, y, test_size, seed)
    parts = dirichlet_split(ytr, num_devices, alpha, seed)
    return [(xtr[p], ytr[p]) for p in parts], (xte, yte)
