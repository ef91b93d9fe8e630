"""FedAvg (McMahan et al. 2017): sample-weighted mean of the deltas, applied with a server
learning rate (1.0 = plain FedAvg)."""

from __future__ import annotations

import numpy as np

from edgefed.strategies.base import LinearStrategy, Params


class FedAvg(LinearStrategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, max_update_norm: float | None = None) -> None:
        super().__init__(max_update_norm)
        if not server_lr > 0:
            raise ValueError("server_lr must be > 0")
        self.server_lr = server_lr

    def apply_mean(
        self, rnd: int, global_params: Params, mean_delta: Params, covered: Params
    ) -> Params:
        out = {k: v.copy() for k, v in global_params.items()}
        for name, d in mean_delta.items():
            if self.server_lr == 1.0:  # plain FedAvg: no model-sized temporary
                out[name] += d
            else:
                out[name] += np.float32(self.server_lr) * d
        return out
