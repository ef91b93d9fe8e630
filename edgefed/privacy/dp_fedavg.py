"""DP-FedAvg mechanism (McMahan et al. 2018, "Learning differentially private recurrent
language models"): user-level (here: device-level) differential privacy for one round.

Per round: clip every device update to L2 norm ``C`` (``clip_norm``), sum them *unweighted*,
add ``N(0, (z*C)^2)`` to each coordinate of the sum (``z`` = ``noise_multiplier``), divide by
the expected number of participants ``m`` (fixed-denominator estimator). Decisions:

* unweighted: sample-count weights would let one device's contribution exceed ``C`` and break
  the sensitivity bound the accountant assumes;
* fixed denominator ``m`` (expected participants), not the actual count: the actual count
  depends on which devices took part, so dividing by it would leak membership;
* the accountant (``edgefed.privacy.accountant``) assumes Poisson sampling of devices with
  rate ``q = m / fleet size``; fixed-size sampling is close but not covered by that analysis;
* noise comes from ``numpy.random.Generator(PCG64)`` seeded by the OS (``secrets``) unless a
  seed is given (tests only). Floating-point noise has known theoretical side channels
  (Mironov 2012); this module does not defend against them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgefed.strategies.base import clip_update


class DPError(ValueError):
    """Bad DP configuration or an update that cannot be privatized; the message says which."""


@dataclass(frozen=True)
class DPConfig:
    clip_norm: float  # C
    noise_multiplier: float  # z: noise std on the sum is z * C
    expected_clients: float  # m: the fixed denominator (sample rate x fleet size)

    def __post_init__(self) -> None:
        for name in ("clip_norm", "expected_clients"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise DPError(f"{name} must be a positive finite number, got {v!r}")
        z = self.noise_multiplier
        if not (isinstance(z, int | float) and math.isfinite(z) and z >= 0):
            raise DPError(f"noise_multiplier must be >= 0, got {z!r}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the *average* (per coordinate)."""
        return self.noise_multiplier * self.clip_norm / self.expected_clients


class DPFedAvgAggregator:
    """One round of DP-FedAvg over dense float32 updates of a fixed schema.

    ``add`` clips and accumulates (float64); ``result`` adds the noise once and returns the
    noised average update per tensor. Only the noised result may leave this object.
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], config: DPConfig, seed: int | None = None
    ) -> None:
        self.config = config
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._sum = {k: np.zeros(s, dtype=np.float64) for k, s in self.shapes.items()}
        self._rng = make_rng(seed)
        self.count = 0
        self.clipped = 0
        self._done = False

    def add(self, update: Mapping[str, np.ndarray]) -> float:
        """Clip ``update`` to ``clip_norm`` and add it; returns its norm before clipping.

        Tensors missing from ``update`` count as zero (partial updates); unknown names or
        wrong shapes are errors.
        """
        if self._done:
            raise DPError("this round's result was already released")
        for name, t in update.items():
            if name not in self.shapes:
                raise DPError(f"update has unknown tensor {name!r}")
            if tuple(np.shape(t)) != self.shapes[name]:
                raise DPError(
                    f"tensor {name!r} has shape {np.shape(t)}, expected {self.shapes[name]}"
                )
        arrays = {}
        for name, t in update.items():
            a = np.asarray(t, dtype=np.float32)
            if not np.isfinite(a).all():
                raise DPError(f"update rejected: tensor {name!r} has NaN or Inf")
            arrays[name] = a
        clipped, norm = clip_update(arrays, self.config.clip_norm)
        if not math.isfinite(norm):
            raise DPError("update rejected: its norm overflows float32")
        for name, t in clipped.items():
            self._sum[name] += t
        self.count += 1
        self.clipped += int(norm > self.config.clip_norm)
        return norm

    def result(self) -> dict[str, np.ndarray]:
        """Noised average update (float32). Callable once: a second draw would leak."""
        if self._done:
            raise DPError("this round's result was already released")
        self._done = True
        return noised_average(self._sum, self.config, self._rng)


def make_rng(seed: int | None) -> np.random.Generator:
    """PCG64 seeded by the OS unless a seed is given (tests only)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))


def noised_average(
    sums: Mapping[str, np.ndarray], config: DPConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The mechanism's release: ``(sum of clipped updates + N(0, (z*C)^2)) / m`` per
    coordinate, float32. Call once per round: a second draw would leak."""
    sigma = config.noise_multiplier * config.clip_norm
    out = {}
    for name, s in sums.items():
        noised = s + rng.normal(0.0, sigma, size=s.shape) if sigma > 0 else s
        out[name] = (noised / config.expected_clients).astype(np.float32)
    return out
