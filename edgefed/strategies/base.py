"""The strategy interface and the plain aggregation functions every strategy builds on.

A strategy has three verbs: :meth:`Strategy.configure_round` (hyperparameters the devices
get), :meth:`Strategy.aggregate` (validate the round's updates, then produce the next global
model) and ``state_dict``/``load_state_dict`` (for checkpoints). The round loop lives in the
coordinator, written once. The math is in plain functions (:func:`weighted_sums`,
:func:`coordinate_median`, ...) that are easy to test alone.

Updates are DELTAS (device parameters after local training minus the global parameters it
started from). A device may send only some tensors (a head-only device in a mixed fleet) or
mark covered coordinates with a mask: every coordinate is averaged over the devices that
covered it, so partial and full updates improve one model. A coordinate nobody covered
keeps its global value.

Linear strategies (FedAvg, FedProx, FedAdam, FedYogi) need only per-coordinate weighted sums
and weight sums, so they also accept partial aggregates via :meth:`LinearStrategy.apply_sums`
(the codec's ``Accumulator`` or sharded aggregator workers produce those directly).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Params = dict[str, np.ndarray]


class UpdateRejected(ValueError):
    """An update failed validation; ``reason`` is logged and counted in the round's metrics."""

    def __init__(self, device_id: str, reason: str) -> None:
        super().__init__(f"{device_id}: {reason}")
        self.device_id = device_id
        self.reason = reason


@dataclass
class ClientUpdate:
    device_id: str
    delta: Params  # a subset of the model's tensors, float32, same shapes as the global ones
    num_samples: int
    mask: Params | None = None  # optional 0/1 per coordinate (missing tensor name = all 1)
    loss: float | None = None


def validate_update(global_params: Params, u: ClientUpdate) -> None:
    """Raise UpdateRejected unless names, shapes, dtypes, finiteness and weight are sane."""
    if not isinstance(u.num_samples, int) or isinstance(u.num_samples, bool) or u.num_samples <= 0:
        raise UpdateRejected(u.device_id, f"num_samples must be a positive int: {u.num_samples!r}")
    if not u.delta:
        raise UpdateRejected(u.device_id, "update carries no tensors")
    for name, d in u.delta.items():
        if name not in global_params:
            raise UpdateRejected(u.device_id, f"unknown tensor {name!r}")
        g = global_params[name]
        if not isinstance(d, np.ndarray) or d.shape != g.shape:
            shape = getattr(d, "shape", None)
            raise UpdateRejected(u.device_id, f"tensor {name!r} shape {shape} != {g.shape}")
        if d.dtype != np.float32:
            raise UpdateRejected(u.device_id, f"tensor {name!r} dtype {d.dtype} != float32")
        if not np.isfinite(d).all():
            raise UpdateRejected(u.device_id, f"tensor {name!r} has NaN or Inf")
        if u.mask is not None and name in u.mask and u.mask[name].shape != g.shape:
            raise UpdateRejected(u.device_id, f"mask {name!r} shape != {g.shape}")


def update_norm(delta: Params) -> float:
    return float(np.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta.values())))


def clip_update(delta: Params, max_norm: float) -> tuple[Params, float]:
    """Scale ``delta`` down to L2 norm ``max_norm`` (norm bounding against scaled or
    boosted updates); returns the (possibly scaled) delta and its original norm."""
    if max_norm <= 0:
        raise ValueError("max_norm must be > 0")
    norm = update_norm(delta)
    if norm <= max_norm:
        return delta, norm
    s = np.float32(max_norm / norm)
    return {k: v * s for k, v in delta.items()}, norm


def weighted_sums(
    global_params: Params, updates: list[ClientUpdate], weights: list[float]
) -> tuple[Params, Params]:
    """Per-coordinate sums of weight * delta and of weight over the devices covering each
    coordinate. Returns (sums, weight sums) for every tensor any update touched."""
    sums: Params = {}
    wsum: Params = {}
    for u, w in zip(updates, weights, strict=True):
        for name, d in u.delta.items():
            m = None if u.mask is None else u.mask.get(name)
            if name not in sums:
                sums[name] = np.zeros_like(global_params[name], dtype=np.float64)
                wsum[name] = np.zeros_like(global_params[name], dtype=np.float64)
            if m is None:
                sums[name] += w * d
                wsum[name] += w
            else:
                mm = (m != 0).astype(np.float64)
                sums[name] += w * d * mm
                wsum[name] += w * mm
    return sums, wsum


def mean_from_sums(sums: Params, wsum: Params) -> tuple[Params, Params]:
    """Per-coordinate mean (0 where nobody contributed) and the coverage mask (weight > 0).
    The divide is guarded: a zero total weight never produces NaN."""
    mean: Params = {}
    covered: Params = {}
    for name, s in sums.items():
        w = wsum[name]
        c = w > 0
        out = np.zeros(s.shape, dtype=np.float32)
        np.divide(s, w, out=out, where=c, casting="unsafe")
        mean[name] = out
        covered[name] = c
    return mean, covered


def _stack(global_params: Params, updates: list[ClientUpdate], name: str) -> np.ndarray:
    """(n_devices, *shape) array with NaN where a device did not cover a coordinate."""
    rows = []
    for u in updates:
        if name not in u.delta:
            continue
        d = u.delta[name].astype(np.float32, copy=True)
        m = None if u.mask is None else u.mask.get(name)
        if m is not None:
            d[m == 0] = np.nan
        rows.append(d)
    return np.stack(rows) if rows else np.empty((0, *global_params[name].shape), np.float32)


def coordinate_median(global_params: Params, updates: list[ClientUpdate]) -> Params:
    """Coordinate-wise median of the deltas over the devices covering each coordinate
    (unweighted: robust statistics must not let one device buy influence by claiming
    many samples). Coordinates nobody covered get delta 0."""
    out: Params = {}
    for name in {n for u in updates for n in u.delta}:
        st = _stack(global_params, updates, name)
        med = np.zeros(st.shape[1:], np.float32)
        if st.shape[0]:
            valid = ~np.isnan(st).all(axis=0)
            with np.errstate(all="ignore"):
                m = np.nanmedian(np.where(valid, st, 0.0), axis=0)
            med = np.where(valid, m, 0.0).astype(np.float32)
        out[name] = med
    return out


def trimmed_mean(global_params: Params, updates: list[ClientUpdate], beta: float) -> Params:
    """Coordinate-wise mean after dropping the ``beta`` fraction of largest and of smallest
    values (per coordinate, among devices covering it; at least one value is kept)."""
    if not 0 <= beta < 0.5:
        raise ValueError("trim fraction beta must be in [0, 0.5)")
    out: Params = {}
    for name in {n for u in updates for n in u.delta}:
        st = _stack(global_params, updates, name)
        if not st.shape[0]:
            out[name] = np.zeros(global_params[name].shape, np.float32)
            continue
        n_valid = (~np.isnan(st)).sum(axis=0)
        srt = np.sort(st, axis=0)  # NaN sorts last
        k = np.floor(beta * n_valid).astype(np.int64)
        k = np.minimum(k, np.maximum((n_valid - 1) // 2, 0))
        idx = np.arange(st.shape[0]).reshape((-1,) + (1,) * (st.ndim - 1))
        keep = (idx >= k) & (idx < n_valid - k)
        total = np.where(keep, srt, 0.0).sum(axis=0, dtype=np.float64)
        cnt = keep.sum(axis=0)
        res = np.zeros(total.shape, np.float32)
        np.divide(total, cnt, out=res, where=cnt > 0, casting="unsafe")
        out[name] = res
    return out


class Strategy(ABC):
    """Base class. ``max_update_norm`` (optional) bounds every update's L2 norm first."""

    name: ClassVar[str] = "base"
    # Optional adaptive bound (edgefed.security.norm_bound.AdaptiveNormBound, issue 7): when
    # set, it replaces max_update_norm. Typed Any: strategies must not import security.
    norm_bound: Any = None

    def __init__(self, max_update_norm: float | None = None) -> None:
        if max_update_norm is not None and max_update_norm <= 0:
            raise ValueError("max_update_norm must be > 0")
        self.max_update_norm = max_update_norm

    def configure_round(self, rnd: int) -> dict[str, Any]:
        """Extra hyperparameters for the devices this round (FedProx adds ``prox_mu``)."""
        return {}

    def validate(
        self, global_params: Params, updates: list[ClientUpdate]
    ) -> tuple[list[ClientUpdate], list[UpdateRejected]]:
        ok, bad = [], []
        for u in updates:
            try:
                validate_update(global_params, u)
            except UpdateRejected as e:
                bad.append(e)
                continue
            if self.max_update_norm is not None and self.norm_bound is None:
                u = ClientUpdate(
                    u.device_id,
                    clip_update(u.delta, self.max_update_norm)[0],
                    u.num_samples,
                    u.mask,
                    u.loss,
                )
            ok.append(u)
        if self.norm_bound is not None and ok:
            bound = self.norm_bound.round_bound({u.device_id: update_norm(u.delta) for u in ok})
            if bound is not None:
                ok = [
                    ClientUpdate(
                        u.device_id, clip_update(u.delta, bound)[0], u.num_samples, u.mask, u.loss
                    )
                    for u in ok
                ]
        return ok, bad

    def aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        """Validate, then aggregate. Raises UpdateRejected for the first invalid update
        (the coordinator validates earlier, one update at a time, and never hits this)."""
        ok, bad = self.validate(global_params, updates)
        if bad:
            raise bad[0]
        if not ok:
            return {k: v.copy() for k, v in global_params.items()}
        new = self._aggregate(rnd, global_params, ok)
        if self.norm_bound is not None:
            self.norm_bound.end_round()
        return new

    def combine(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        """New global parameters from updates already validated and norm-bounded (the
        coordinator's intake and aggregation wrappers did both): the math alone."""
        if not updates:
            return {k: v.copy() for k, v in global_params.items()}
        return self._aggregate(rnd, global_params, updates)

    @abstractmethod
    def _aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        """New global parameters from validated updates (never called with an empty list)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state, got keys {sorted(state)}")


class LinearStrategy(Strategy):
    """A strategy that needs only per-coordinate weighted sums (sample-weighted)."""

    def _aggregate(self, rnd: int, global_params: Params, updates: list[ClientUpdate]) -> Params:
        sums, wsum = weighted_sums(global_params, updates, [float(u.num_samples) for u in updates])
        return self.apply_sums(rnd, global_params, sums, wsum)

    def apply_sums(self, rnd: int, global_params: Params, sums: Params, wsum: Params) -> Params:
        mean, covered = mean_from_sums(sums, wsum)
        return self.apply_mean(rnd, global_params, mean, covered)

    @abstractmethod
    def apply_mean(
        self, rnd: int, global_params: Params, mean_delta: Params, covered: Params
    ) -> Params:
        """Server step from the per-coordinate mean delta (``covered``: where it is defined)."""
