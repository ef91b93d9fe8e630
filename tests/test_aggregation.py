"""Aggregation from the compressed form (coordinator/aggregation.py) against the dense
reference: the strategies' own ``aggregate`` over ``to_dense()`` copies of the same updates.

Covered: the L2 norm computed on every codec form, streaming FedAvg / FedAdam with a
head-only (partial) update, the fixed and the adaptive norm bound as wrappers, and the
buffered path of robust strategies.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.codec import CompressionSpec, ModelSchema, UpdateMeta, decode_update, encode_update
from edgefed.coordinator.aggregation import (
    AdaptiveNormBoundAggregator,
    BufferedAggregator,
    FixedNormBound,
    StreamingAggregator,
    compressed_norm,
    make_aggregator,
)
from edgefed.coordinator.intake import AcceptedUpdate
from edgefed.protocol import UpdateHeader
from edgefed.security.norm_bound import AdaptiveNormBound
from edgefed.strategies import ClientUpdate, FedAdam, FedAvg, Median, TrimmedMean, update_norm

# large enough that int8 blocks, top-k and the small-tensor rule all take part
SCHEMA = ModelSchema({"body.w": (64, 130), "head.w": (10, 64), "head.b": (10,)})
PARAMS = {k: np.random.default_rng(1).standard_normal(s).astype(np.float32)
          for k, s in SCHEMA.items()}  # fmt: skip


def make(i: int, spec: str, tensors: tuple[str, ...] = tuple(SCHEMA), scale: float = 1.0):
    rng = np.random.default_rng(100 + i)
    delta = {n: scale * rng.standard_normal(SCHEMA[n]).astype(np.float32) for n in tensors}
    num = 5 + 3 * i
    meta = UpdateMeta(1, f"d{i}", num, "r0", kind="delta")
    upd = decode_update(encode_update(delta, meta, CompressionSpec.parse(spec)), SCHEMA)
    acc = AcceptedUpdate(UpdateHeader(1, f"d{i}", f"u{i}", num, 0.1), upd, 0, 0)
    dense = ClientUpdate(f"d{i}", upd.to_dense(), num)
    return acc, dense


@pytest.mark.parametrize(
    "spec", ["none", "fp16", "int8", "int8:block=64", "int4", "topk:0.05", "topk:0.05+int8",
             "topk:0.05+fp16"]
)  # fmt: skip
def test_norm_on_the_compressed_form_equals_the_dense_norm(spec: str) -> None:
    u, dense = make(0, spec)
    assert compressed_norm(u.update, chunk=1000) == pytest.approx(update_norm(dense.delta), 1e-5)


def _updates(spec: str, n: int = 5, big: int | None = None):
    out = []
    for i in range(n):
        tensors = ("head.w", "head.b") if i == 1 else tuple(SCHEMA)  # one head-only device
        out.append(make(i, spec, tensors, scale=40.0 if i == big else 1.0))
    return out


def _run(agg, ups) -> dict[str, np.ndarray]:
    for u, _ in ups:
        agg.add(u)
    return agg.close(1, PARAMS)


def _close(a: dict, b: dict) -> None:
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("spec", ["int8", "topk:0.1+int8", "none"])
@pytest.mark.parametrize("strategy", [FedAvg, FedAdam])
def test_streaming_equals_dense_aggregate(spec: str, strategy) -> None:
    ups = _updates(spec)
    agg = make_aggregator(strategy(), SCHEMA)
    assert isinstance(agg, StreamingAggregator)
    got = _run(agg, ups)
    _close(got, strategy().aggregate(1, PARAMS, [d for _, d in ups]))
    assert not np.allclose(got["body.w"], PARAMS["body.w"])


def test_fixed_norm_bound_wrapper_equals_clipping_dense() -> None:
    ups = _updates("topk:0.1+int8", big=3)
    agg = make_aggregator(FedAvg(max_update_norm=5.0), SCHEMA)
    assert isinstance(agg, FixedNormBound)
    _close(_run(agg, ups), FedAvg(max_update_norm=5.0).aggregate(1, PARAMS, [d for _, d in ups]))


@pytest.mark.parametrize("strategy", [FedAvg, lambda: TrimmedMean(beta=0.2)])
def test_adaptive_norm_bound_wrapper_equals_the_strategy_with_the_bound(strategy) -> None:
    ups = _updates("int8", n=7, big=2)
    s_ref, s_new = strategy(), strategy()
    s_ref.norm_bound = AdaptiveNormBound(factor=1.5, min_history=3)
    s_new.norm_bound = AdaptiveNormBound(factor=1.5, min_history=3)
    agg = make_aggregator(s_new, SCHEMA)
    assert isinstance(agg, AdaptiveNormBoundAggregator)
    _close(_run(agg, ups), s_ref.aggregate(1, PARAMS, [d for _, d in ups]))
    assert s_new.norm_bound.clipped == s_ref.norm_bound.clipped >= 1  # the boosted one
    assert s_new.norm_bound.bound == pytest.approx(s_ref.norm_bound.bound)  # same history


def test_robust_strategies_are_buffered_and_match() -> None:
    ups = _updates("topk:0.1+int8", big=4)
    agg = make_aggregator(Median(), SCHEMA)
    assert isinstance(agg, BufferedAggregator)
    _close(_run(agg, ups), Median().aggregate(1, PARAMS, [d for _, d in ups]))


def test_no_updates_keeps_the_model() -> None:
    for s in (FedAvg(), FedAdam(), Median()):
        out = make_aggregator(s, SCHEMA).close(1, PARAMS)
        _close(out, PARAMS)
