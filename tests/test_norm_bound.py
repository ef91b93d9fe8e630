"""Adaptive norm bounding: the bound follows honest norms, ignores a minority of attackers,
never lets a round raise its own bound, and survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.security.norm_bound import AdaptiveNormBound, NormBoundError
from edgefed.strategies import ClientUpdate, FedAvg, Median, update_norm

RNG = np.random.default_rng(0)


def honest(dev: str, scale: float = 1.0) -> ClientUpdate:
    v = RNG.normal(size=(100,)).astype(np.float32)
    return ClientUpdate(dev, {"w": v / np.linalg.norm(v) * np.float32(scale)}, 10)


def test_warm_up_then_factor_times_median_of_history() -> None:
    nb = AdaptiveNormBound(factor=3.0, min_history=4, initial=50.0)
    assert nb.round_bound({"d0": 1.0, "d1": 2.0, "d2": 3.0}) == 50.0  # initial while warming up
    nb.end_round()
    assert nb.bound is None  # 3 < min_history
    assert nb.round_bound({"d3": 4.0}) == 50.0
    nb.end_round()
    assert nb.bound == pytest.approx(3.0 * 2.5)
    assert nb.round_bound({"x": 1000.0}) == pytest.approx(7.5)


def test_warm_up_without_initial_uses_this_rounds_median() -> None:
    nb = AdaptiveNormBound(factor=2.0, min_history=50)
    norms = {f"h{i}": 1.0 for i in range(8)} | {"a0": 500.0, "a1": 900.0}
    assert nb.round_bound(norms) == pytest.approx(2.0)  # 2 of 10 attackers: median is honest
    assert nb.clipped == 2


def test_a_round_cannot_raise_its_own_bound_and_minority_cannot_move_median() -> None:
    nb = AdaptiveNormBound(factor=2.0, min_history=5)
    nb.round_bound({f"h{i}": 1.0 for i in range(10)})
    nb.end_round()
    assert nb.bound == 2.0
    round2 = {f"h{i}": 1.0 for i in range(10)} | {f"a{i}": 1e6 for i in range(4)}
    assert nb.round_bound(round2) == 2.0  # the history decides, not this round
    nb.end_round()
    assert nb.bound == 2.0  # median of 24 values, 4 large: still honest


def test_revalidated_update_counts_once() -> None:
    nb = AdaptiveNormBound(min_history=1, factor=1.0)
    nb.round_bound({"d0": 1.0, "d1": 9.0})
    nb.round_bound({"d0": 1.0})  # the same update validated again
    nb.end_round()
    assert nb.bound == pytest.approx(5.0)  # median of [1, 9], not of [1, 1, 9]


def test_strategy_clips_with_adaptive_bound() -> None:
    g = {"w": np.zeros(100, np.float32)}
    s = FedAvg()
    s.norm_bound = AdaptiveNormBound(factor=2.0, min_history=5)
    ups = [honest(f"h{i}") for i in range(8)] + [honest("evil", 1000.0)]
    ok, _ = s.validate(g, ups)  # round 1: warm-up, 2 x this round's median
    assert update_norm(ok[-1].delta) == pytest.approx(2.0, rel=1e-5)
    assert all(update_norm(u.delta) == pytest.approx(1.0, rel=1e-5) for u in ok[:-1])
    s.aggregate(1, g, ups)  # validating again in aggregate does not double-count
    assert s.norm_bound.bound == pytest.approx(2.0)  # 2 x median of (8 x 1.0, 1000)
    ok, _ = s.validate(g, [honest("evil", 1000.0)])  # alone in a round: history still rules
    assert update_norm(ok[0].delta) == pytest.approx(2.0, rel=1e-5)
    # without a bound the same update passes at full size
    plain, _ = Median().validate(g, [honest("evil", 1000.0)])
    assert update_norm(plain[0].delta) == pytest.approx(1000.0, rel=1e-5)


def test_state_round_trip_and_bad_state() -> None:
    nb = AdaptiveNormBound(min_history=2, factor=1.5)
    nb.round_bound({"0": 1.0, "1": 3.0, "2": 5.0})
    nb.end_round()
    other = AdaptiveNormBound(min_history=2, factor=1.5)
    other.load_state(nb.state())
    assert other.bound == nb.bound == pytest.approx(4.5)
    for bad in ({"history": [1.0, float("nan")]}, {"history": "x"}, {"history": [-1.0]}):
        with pytest.raises(NormBoundError, match="history"):
            other.load_state(bad)


@pytest.mark.parametrize(
    "kw",
    [{"factor": 0}, {"factor": float("inf")}, {"initial": -1.0}, {"window": 0}, {"min_history": 0}],
)
def test_bad_config_rejected(kw) -> None:
    with pytest.raises(NormBoundError):
        AdaptiveNormBound(**kw)
