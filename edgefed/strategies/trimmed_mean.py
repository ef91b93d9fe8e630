"""Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``beta`` largest and smallest
fractions per coordinate, average the rest."""

from __future__ import annotations

from edgefed.strategies.base import ClientUpdate, Params, Strategy, trimmed_mean


class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1, max_update_norm: float | None = None) -> None:
        super().__init__(max_update_norm)
        if not 0 <= beta < 0.5:
            raise ValueError("trimmed mean beta must be in [0, 0.5)")
        self.beta = beta

    def _aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        tm = trimmed_mean(global_params, updates, self.beta)
        out = {k: v.copy() for k, v in global_params.items()}
        for name, d in tm.items():
            out[name] += d
        return out
