"""Demo data, built offline from sklearn's 8x8 digits (load_digits ships with scikit-learn).

Federated splits of the 8x8 digits (demo, simulation, benchmarks): non-IID by Dirichlet
label skew (Hsu et al. 2019): for each class, the share each device gets is drawn from
Dir(alpha); small alpha = few classes per device. Every device is guaranteed
``min_samples`` samples (redrawn otherwise) so no device has nothing to train on.

The 28x28 noisy-digits task (export pipeline):

Why not plain 8x8 digits: everything scores >= 99% there and batch-1 latency sits at
onnxruntime's per-call floor, so compression shows nothing (see the export design note).
Each 8x8 digit is upscaled 2x (nearest) to 16x16, placed at a random spot of a 28x28
canvas, given a random contrast and background level, plus Gaussian noise, clipped to
[0, 1]. The 1,797 digits are split 1,400 / 397 (stratified) BEFORE augmentation, so no
test image shares a source digit with a training image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TaskData:
    """What the coordinator holds. ``y_train`` may be None (distillation from soft targets)."""

    x_train: np.ndarray  # float32 (N, C, H, W)
    y_train: np.ndarray | None  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("x_train", "x_test"):
            a = getattr(self, name)
            if a.dtype != np.float32 or a.ndim < 2 or not np.isfinite(a).all():
                raise ValueError(f"{name} must be a finite float32 array with a batch axis")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError("x_train and x_test sample shapes differ")
        for name, x in (("y_train", self.x_train), ("y_test", self.x_test)):
            y = getattr(self, name)
            if y is None:
                continue
            if y.shape != (len(x),) or y.min() < 0 or y.max() >= len(self.labels):
                raise ValueError(f"{name} must hold one label in [0, {len(self.labels)}) per row")

    @staticmethod
    def load_npz(path: str) -> TaskData:
        """x_train, x_test, y_test required; y_train and labels optional."""
        with np.load(path, allow_pickle=False) as z:
            n_cls = int(z["y_test"].max()) + 1
            labels = (
                [str(s) for s in z["labels"]] if "labels" in z else [str(i) for i in range(n_cls)]
            )
            return TaskData(
                x_train=z["x_train"].astype(np.float32),
                y_train=z["y_train"].astype(np.int64) if "y_train" in z else None,
                x_test=z["x_test"].astype(np.float32),
                y_test=z["y_test"].astype(np.int64),
                labels=labels,
                preprocessing={"source": str(path)},
            )


def _place(
    digits: np.ndarray, per_digit: int, size: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    big = np.kron(digits.reshape(-1, 8, 8) / 16.0, np.ones((2, 2)))  # (n, 16, 16) in [0, 1]
    n = len(big) * per_digit
    src = np.repeat(big, per_digit, axis=0)
    out = np.empty((n, size, size), np.float32)
    offs = rng.integers(0, size - 16 + 1, size=(n, 2))
    contrast = rng.uniform(0.5, 1.0, size=n)
    background = rng.uniform(0.0, 0.2, size=n)
    for i in range(n):
        canvas = np.full((size, size), background[i])
        r, c = offs[i]
        canvas[r : r + 16, c : c + 16] += contrast[i] * src[i]
        out[i] = canvas
    out += rng.normal(0.0, noise, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)[:, None]


def noisy_digits(
    train_per_digit: int = 15,
    test_per_digit: int = 5,
    size: int = 28,
    noise: float = 0.15,
    seed: int = 0,
) -> TaskData:
    """21,000 train / 1,985 test images with the defaults (as in the design note)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data, d.target, train_size=1400, stratify=d.target, random_state=seed
    )
    rng = np.random.default_rng(seed)
    return TaskData(
        x_train=_place(x_tr, train_per_digit, size, noise, rng),
        y_train=np.repeat(y_tr, train_per_digit).astype(np.int64),
        x_test=_place(x_te, test_per_digit, size, noise, rng),
        y_test=np.repeat(y_te, test_per_digit).astype(np.int64),
        labels=[str(i) for i in range(10)],
        preprocessing={
            "layout": "NCHW",
            "channels": 1,
            "height": size,
            "width": size,
            "range": [0.0, 1.0],
            "note": "grayscale, 1.0 = ink; no mean/std normalisation",
        },
    )


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
