"""Aggregation of one round behind two verbs: ``add(update, weight)`` as updates are
accepted, ``close(rnd, params) -> new params`` once. The round loop never knows which kind
it drives (Flower's model: the strategy does the math, wrappers add clipping).

- :class:`StreamingAggregator` (linear strategies: FedAvg, FedProx, FedAdam, FedYogi): adds
  each update straight from its compressed form into the codec's C++
  :class:`~edgefed.codec.Accumulator` (one float32 sum per tensor, weights as scalars
  unless an update is partial per coordinate), so memory stays at about one model
  whatever the number of devices and no update is ever expanded to dense float32.
- :class:`BufferedAggregator` (robust strategies, median / trimmed mean):
  they need every update at once, so it keeps them (dense: robust statistics sort per
  coordinate) until ``close``.
- :class:`ShardedAggregator`: the sums come from the aggregator workers' merged partials
  (``edgefed.sharding``); ``add_sums`` instead of ``add``.
- :class:`DPAggregator`: DP-FedAvg (``edgefed.privacy``) as a wrapper over the same
  accumulator: every update clipped to ``clip_norm`` while added, noise once at ``close``.
- :class:`FixedNormBound` / :class:`AdaptiveNormBoundAggregator`: wrappers that bound every
  update's L2 norm (fixed ``max_update_norm``, or the adaptive bound of
  ``edgefed.security.norm_bound``, which needs all of a round's norms first, so it holds
  the round's updates, still compressed, until ``close``). They scale an update by setting
  its ``scale``: the accumulator multiplies while adding, nothing is copied.

Asynchronous aggregation (FedBuff, later) drives the same objects: ``add`` with a
staleness-discounted ``weight`` for each of K buffered updates, then ``close``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import numpy as np

from edgefed.codec import Accumulator, DecodedUpdate, ModelSchema
from edgefed.codec.tensors import DenseF16, DenseF32, DenseInt8, SparseTensor
from edgefed.coordinator.intake import AcceptedUpdate
from edgefed.strategies import ClientUpdate, LinearStrategy, Params, Strategy

__all__ = [
    "AdaptiveNormBoundAggregator",
    "Aggregator",
    "BufferedAggregator",
    "DPAggregator",
    "FixedNormBound",
    "ShardedAggregator",
    "StreamingAggregator",
    "compressed_norm",
    "make_aggregator",
]


class Aggregator(ABC):
    """One round's aggregation. ``weight`` defaults to the update's sample count (FedAvg)."""

    count = 0

    @abstractmethod
    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None: ...

    @abstractmethod
    def close(self, rnd: int, params: Params) -> Params:
        """The next global parameters (``params`` is not modified)."""


class StreamingAggregator(Aggregator):
    def __init__(self, strategy: LinearStrategy, schema: ModelSchema, threads: int = 0) -> None:
        self.strategy = strategy
        self.acc = Accumulator(schema, threads=threads)
        self.touched: set[str] = set()
        self.count = 0

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        w = float(u.num_samples if weight is None else weight)
        self.acc.add(u.update, w, u.scale)
        self.touched.update(u.update.tensors)
        self.count += 1

    def close(self, rnd: int, params: Params) -> Params:
        """Mean = sums / weights, divided in place in the accumulator's float32 sums (no
        second model-sized buffer; the accumulator is spent), then the strategy's step.
        Tensors nobody sent are left out: they keep their value and optimizer state."""
        mean: Params = {}
        covered: Params = {}
        for name in sorted(self.touched):
            s, w = self.acc.take(name)
            if np.ndim(w) == 0:
                if w > 0:
                    np.divide(s, np.float32(w), out=s)
                else:
                    s.fill(0.0)
                covered[name] = np.broadcast_to(np.bool_(w > 0), s.shape)  # no n-byte mask
            else:
                c = np.asarray(w) > 0
                np.divide(s, w, out=s, where=c)
                s[~c] = 0.0
                covered[name] = c
            mean[name] = s
        return self.strategy.apply_mean(rnd, params, mean, covered)


class BufferedAggregator(Aggregator):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.updates: list[ClientUpdate] = []
        self.count = 0

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        dense = u.update.to_dense()
        if u.scale != 1.0:
            s = np.float32(u.scale)
            dense = {k: v * s for k, v in dense.items()}
        n = u.num_samples if weight is None else max(1, round(weight))
        self.updates.append(ClientUpdate(u.device, dense, int(n), None, u.header.loss))
        self.count += 1

    def close(self, rnd: int, params: Params) -> Params:
        return self.strategy.combine(rnd, params, self.updates)


class ShardedAggregator(Aggregator):
    """Sums already added up by the aggregator workers (float32, merged in float64)."""

    def __init__(self, strategy: LinearStrategy) -> None:
        self.strategy = strategy
        self.sums: Params = {}
        self.weights: Params = {}

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        raise RuntimeError("a sharded round's updates are added by the aggregator workers")

    def add_sums(self, sums: Params, weights: Params, count: int) -> None:
        self.sums, self.weights = dict(sums), dict(weights)
        self.count = count

    def close(self, rnd: int, params: Params) -> Params:
        return self.strategy.apply_sums(rnd, params, self.sums, self.weights)


class FixedNormBound(Aggregator):
    """Scale every update down to L2 norm ``max_norm`` before the inner aggregator sees it."""

    def __init__(self, inner: Aggregator, max_norm: float) -> None:
        self.inner, self.max_norm = inner, max_norm

    @property
    def count(self) -> int:  # type: ignore[override]
        return self.inner.count

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        self.inner.add(_bounded(u, self.max_norm), weight)

    def close(self, rnd: int, params: Params) -> Params:
        return self.inner.close(rnd, params)


class AdaptiveNormBoundAggregator(Aggregator):
    """The adaptive bound (``AdaptiveNormBound``) decides once it has every norm of the round:
    updates are held compressed (their decoded payloads) until ``close``."""

    def __init__(self, inner: Aggregator, bound: object) -> None:
        self.inner, self.bound = inner, bound
        self.held: list[tuple[AcceptedUpdate, float | None, float]] = []

    @property
    def count(self) -> int:  # type: ignore[override]
        return len(self.held)

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        self.held.append((u, weight, u.scale * compressed_norm(u.update)))

    def close(self, rnd: int, params: Params) -> Params:
        if not self.held:
            return self.inner.close(rnd, params)
        nb = self.bound
        limit = nb.round_bound({u.device: n for u, _, n in self.held})  # type: ignore[attr-defined]
        for u, w, n in self.held:
            self.inner.add(u if limit is None else _bounded(u, limit, n), w)
        self.held = []
        out = self.inner.close(rnd, params)
        nb.end_round()  # type: ignore[attr-defined]
        return out


class DPAggregator(Aggregator):
    """DP-FedAvg (``edgefed.privacy``) from the compressed form: each update is clipped to
    ``clip_norm`` as it is added (its ``scale``), unweighted (sample counts would break the
    sensitivity bound), into a float32 sum; ``close`` has the strategy add the noise once,
    divide by the fixed denominator and step (and record the round in its ledger)."""

    def __init__(self, strategy: Any, schema: ModelSchema, threads: int = 0) -> None:
        self.strategy = strategy
        self.clip_norm = float(strategy.config.clip_norm)
        self.acc = Accumulator(schema, threads=threads)
        self.count = 0
        self.clipped = 0

    def add(self, u: AcceptedUpdate, weight: float | None = None) -> None:
        norm = u.scale * compressed_norm(u.update)
        f = self.clip_norm / norm if norm > self.clip_norm else 1.0
        self.acc.add(u.update, 1.0, u.scale * f)
        self.count += 1
        self.clipped += int(norm > self.clip_norm)

    def close(self, rnd: int, params: Params) -> Params:
        if not self.count:  # no participant, no release (and nothing spent)
            return {k: v.copy() for k, v in params.items()}
        sums = {name: self.acc.take(name)[0] for name in self.acc.schema}
        return self.strategy.release(rnd, params, sums)


def _bounded(u: AcceptedUpdate, max_norm: float, norm: float | None = None) -> AcceptedUpdate:
    n = u.scale * compressed_norm(u.update) if norm is None else norm
    if n <= max_norm or not math.isfinite(n):
        return u
    return replace(u, scale=u.scale * max_norm / n)


def compressed_norm(upd: DecodedUpdate, chunk: int = 1 << 20) -> float:
    """L2 norm of a decoded update computed on its compressed form (no dense copy of the
    update: int8 blocks as scale^2 * sum q^2, sparse tensors over their entries)."""
    total = 0.0
    for t in upd.tensors.values():
        if isinstance(t, SparseTensor):
            v = t.values.astype(np.float32)
            s = t.scale if t.values.dtype == np.int8 else 1.0
            total += s * s * float(np.dot(v, v))
        elif isinstance(t, DenseInt8):
            b, n = t.block, t.q.size
            step = max(b, chunk // b * b)
            for lo in range(0, n, step):
                q = t.q[lo : lo + step].astype(np.float32)
                starts = np.arange(0, q.size, b)
                per_block = np.add.reduceat(q * q, starts) if q.size else q
                sc = t.scales[lo // b : lo // b + starts.size].astype(np.float64)
                total += float(np.dot(per_block.astype(np.float64), sc * sc))
        elif isinstance(t, DenseF32 | DenseF16):
            v = t.values.astype(np.float32, copy=False)
            total += float(np.dot(v, v))
        else:  # int4: expanded one tensor at a time
            d = t.to_dense().ravel()
            total += float(np.dot(d, d))
    return math.sqrt(total)


def make_aggregator(
    strategy: Strategy, schema: ModelSchema, threads: int = 0, sharded: bool = False
) -> Aggregator:
    """The aggregator a strategy needs, wrapped with its norm bound if it has one."""
    inner: Aggregator
    if sharded:
        if not isinstance(strategy, LinearStrategy):
            raise RuntimeError("sharded aggregation needs a linear strategy")
        return ShardedAggregator(strategy)
    from edgefed.privacy.strategy import DPFedAvg

    if isinstance(strategy, DPFedAvg):  # clipping and noise are the mechanism itself
        return DPAggregator(strategy, schema, threads)
    if isinstance(strategy, LinearStrategy):
        inner = StreamingAggregator(strategy, schema, threads)
    else:
        inner = BufferedAggregator(strategy)
    if strategy.norm_bound is not None:
        return AdaptiveNormBoundAggregator(inner, strategy.norm_bound)
    if strategy.max_update_norm is not None:
        return FixedNormBound(inner, strategy.max_update_norm)
    return inner
