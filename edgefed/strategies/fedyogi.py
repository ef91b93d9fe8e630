"""FedYogi: Yogi's additive second moment, v -= (1-beta2) d^2 sign(v - d^2), which grows
v more slowly than Adam when gradients are sparse or noisy (Reddi et al. 2021)."""

from __future__ import annotations

import numpy as np

from edgefed.strategies.fedopt import _FedOpt


class FedYogi(_FedOpt):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
