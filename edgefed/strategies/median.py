"""Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates."""

from __future__ import annotations

from edgefed.strategies.base import ClientUpdate, Params, Strategy, coordinate_median


class Median(Strategy):
    name = "median"

    def _aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        med = coordinate_median(global_params, updates)
        out = {k: v.copy() for k, v in global_params.items()}
        for name, d in med.items():
            out[name] += d
        return out
