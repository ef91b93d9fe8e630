"""Aggregation strategies (torch-free numpy math). See :mod:`edgefed.strategies.base` for
the interface; :func:`make_strategy` builds one from a name and keyword parameters (the
coordinator's ``[strategy]`` TOML table)."""

from __future__ import annotations

from typing import Any

from edgefed.strategies.base import (
    ClientUpdate,
    LinearStrategy,
    Params,
    Strategy,
    UpdateRejected,
    clip_update,
    coordinate_median,
    mean_from_sums,
    trimmed_mean,
    update_norm,
    validate_update,
    weighted_sums,
)
from edgefed.strategies.fedadam import FedAdam
from edgefed.strategies.fedavg import FedAvg
from edgefed.strategies.fedprox import FedProx
from edgefed.strategies.fedyogi import FedYogi
from edgefed.strategies.median import Median
from edgefed.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    c.name: c for c in (FedAvg, FedProx, FedAdam, FedYogi, Median, TrimmedMean)
}


def make_strategy(name: str, **params: Any) -> Strategy:
    """``make_strategy("fedadam", server_lr=0.01)``; ValueError names unknown ones."""
    cls = STRATEGIES.get(name.lower())
    if cls is None and name.lower() == "dp-fedavg":  # client-level DP lives in edgefed.privacy
        from edgefed.privacy.strategy import DPFedAvg as cls
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for strategy {name!r}: {e}") from None


__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "LinearStrategy",
    "Median",
    "Params",
    "Strategy",
    "TrimmedMean",
    "UpdateRejected",
    "clip_update",
    "coordinate_median",
    "make_strategy",
    "mean_from_sums",
    "trimmed_mean",
    "update_norm",
    "validate_update",
    "weighted_sums",
]
