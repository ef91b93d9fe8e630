"""DP-FedAvg as a :class:`edgefed.strategies.base.Strategy` (name ``dp-fedavg``).

The round's noised average delta (see :mod:`edgefed.privacy.dp_fedavg`) is applied with a
server learning rate; every aggregated round is recorded in a :class:`PrivacyLedger`, so
``privacy_spent()`` reports epsilon at ``delta`` and the ledger travels in ``state_dict``
(a restarted coordinator keeps counting). Sample weights are ignored on purpose (they would
break the per-device sensitivity bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefed.privacy.accountant import PrivacyLedger
from edgefed.privacy.dp_fedavg import (
    DPConfig,
    DPError,
    DPFedAvgAggregator,
    make_rng,
    noised_average,
)
from edgefed.strategies.base import ClientUpdate, Params, Strategy


class DPFedAvg(Strategy):
    name = "dp-fedavg"

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        sample_rate: float,
        delta: float = 1e-5,
        server_lr: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(max_update_norm=None)  # clipping is part of the mechanism
        self.config = DPConfig(clip_norm, noise_multiplier, expected_clients)
        if not 0 < sample_rate <= 1:
            raise DPError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not server_lr > 0:
            raise DPError(f"server_lr must be > 0, got {server_lr}")
        self.sample_rate = sample_rate
        self.server_lr = server_lr
        self.ledger = PrivacyLedger(delta)
        self._seed = seed

    def _seed_for(self, rnd: int) -> int | None:
        return None if self._seed is None else self._seed + rnd

    def _aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        shapes = {k: v.shape for k, v in global_params.items()}
        agg = DPFedAvgAggregator(shapes, self.config, seed=self._seed_for(rnd))
        for u in updates:
            agg.add(u.delta)
        return self._step(global_params, agg.result())

    def release(self, rnd: int, global_params: Params, clipped_sums: Params) -> Params:
        """The round's new model from the sum of its updates, each already clipped to
        ``clip_norm`` and added unweighted (the coordinator's DP aggregation wrapper does
        that from the compressed form): noise once, divide by ``expected_clients``, step."""
        sums = {k: clipped_sums.get(k, np.zeros(g.shape)) for k, g in global_params.items()}
        return self._step(
            global_params, noised_average(sums, self.config, make_rng(self._seed_for(rnd)))
        )

    def _step(self, global_params: Params, noised: Params) -> Params:
        self.ledger.record(self.config.noise_multiplier, self.sample_rate)
        return {
            k: (g + np.float32(self.server_lr) * noised[k]).astype(np.float32)
            for k, g in global_params.items()
        }

    def privacy_spent(self, method: str = "rdp") -> float:
        """Epsilon at the configured delta after the rounds aggregated so far."""
        return self.ledger.epsilon(method)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"ledger"}:
            raise ValueError(f"dp-fedavg state has unknown keys {sorted(set(state) - {'ledger'})}")
        if "ledger" in state:
            self.ledger = PrivacyLedger.from_state(state["ledger"])
