"""FedProx (Li et al. 2020): FedAvg aggregation; devices add (mu/2)||w - w_global||^2 to
their loss. The coordinator sends ``prox_mu`` with each task; the device trainer applies it
(the step graph exported with ``fedprox=True`` takes the global weights as inputs)."""

from __future__ import annotations

from typing import Any

from edgefed.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(
        self, mu: float = 0.01, server_lr: float = 1.0, max_update_norm: float | None = None
    ) -> None:
        super().__init__(server_lr, max_update_norm)
        if mu < 0:
            raise ValueError("FedProx mu must be >= 0")
        self.mu = mu

    def configure_round(self, rnd: int) -> dict[str, Any]:
        return {"prox_mu": self.mu}
