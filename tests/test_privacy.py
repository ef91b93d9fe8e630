"""Client-level DP (DP-FedAvg): the mechanism's clipping and noise scale, and epsilon from
dp-accounting checked against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from edgefed.privacy import DPConfig, DPError, DPFedAvgAggregator
from edgefed.privacy.accountant import PrivacyLedger, epsilon
from edgefed.privacy.strategy import DPFedAvg
from edgefed.strategies import ClientUpdate

SHAPES = {"w": (400, 250), "b": (250,)}


def test_updates_are_clipped_and_noise_has_the_promised_scale() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.2, expected_clients=8.0)
    agg = DPFedAvgAggregator(SHAPES, cfg, seed=1)
    rng = np.random.default_rng(2)
    ups = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(6)]
    norms = [agg.add(u) for u in ups]
    assert all(n > 100 for n in norms) and agg.clipped == 6
    scale = [1.0 / n for n in norms]
    exact = {
        k: sum(u[k].astype(np.float64) * s for u, s in zip(ups, scale, strict=True)) / 8.0
        for k in SHAPES
    }
    out = agg.result()
    noise = np.concatenate([(out[k] - exact[k]).ravel() for k in SHAPES])
    n = noise.size  # 100,250 draws: std within ~0.5% (4 sigma), mean within 4 sigma/sqrt(n)
    want = cfg.noise_std
    assert want == pytest.approx(1.2 * 1.0 / 8.0)
    assert abs(noise.std() / want - 1) < 4 * math.sqrt(1 / (2 * n)) + 1e-3
    assert abs(noise.mean()) < 4 * want / math.sqrt(n)
    # Gaussian shape: fraction within one sigma
    assert abs(np.mean(np.abs(noise) < want) - 0.6827) < 0.01
    with pytest.raises(DPError, match="already released"):
        agg.result()


def test_zero_noise_is_exact_clipped_mean_and_small_updates_untouched() -> None:
    cfg = DPConfig(clip_norm=10.0, noise_multiplier=0.0, expected_clients=2.0)
    agg = DPFedAvgAggregator({"w": (3,)}, cfg, seed=0)
    agg.add({"w": np.array([3.0, 4.0, 0.0], np.float32)})  # norm 5 < 10: as is
    agg.add({"w": np.array([0.0, 0.0, 20.0], np.float32)})  # norm 20 -> 10
    np.testing.assert_allclose(agg.result()["w"], [1.5, 2.0, 5.0])


@pytest.mark.parametrize(
    "update, message",
    [
        ({"w": np.array([np.nan, 0, 0], np.float32)}, "NaN or Inf"),
        ({"w": np.zeros(4, np.float32)}, "shape"),
        ({"v": np.zeros(3, np.float32)}, "unknown tensor"),
    ],
)
def test_bad_updates_rejected(update, message) -> None:
    agg = DPFedAvgAggregator({"w": (3,)}, DPConfig(1.0, 1.0, 1.0))
    with pytest.raises(DPError, match=message):
        agg.add(update)


@pytest.mark.parametrize(
    "kw", [{"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"expected_clients": math.inf}]
)
def test_bad_config(kw) -> None:
    base = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_clients": 10.0} | kw
    with pytest.raises(DPError):
        DPConfig(**base)


def exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Tight epsilon of ``rounds`` Gaussian mechanisms (no sampling): their composition is
    one Gaussian with sensitivity/std mu = sqrt(T)/z (Balle & Wang 2018, Theorem 8)."""
    mu = math.sqrt(rounds) / z

    def excess(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

    return brentq(excess, 0.0, 500.0)


def rdp_subsampled_gaussian_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """Independent RDP computation for integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3):
    A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 z^2)); RDP(a) = T log(A_a)/(a-1);
    epsilon via the conversion of Balle et al. 2020 (Prop. 12), minimised over orders."""
    best = math.inf
    for a in range(2, 257):
        k = np.arange(a + 1)
        logc = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
        terms = logc + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * z * z)
        rdp = rounds * float(logsumexp(terms)) / (a - 1)
        eps = rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (2.0, 50), (5.0, 100)])
def test_epsilon_without_sampling_matches_the_exact_gaussian(z: float, rounds: int) -> None:
    exact = exact_gaussian_epsilon(z, rounds, 1e-5)
    assert epsilon(z, 1.0, rounds, 1e-5, method="pld") == pytest.approx(exact, rel=1e-3)
    rdp = epsilon(z, 1.0, rounds, 1e-5, method="rdp")
    assert exact < rdp < 1.15 * exact  # RDP is an upper bound, a little loose


def test_epsilon_with_sampling_matches_an_independent_rdp_computation() -> None:
    z, q, rounds, delta = 1.1, 0.01, 10_000, 1e-5
    ref = rdp_subsampled_gaussian_epsilon(z, q, rounds, delta)
    got = epsilon(z, q, rounds, delta)
    # dp-accounting also tries fractional orders, so it may only be a little lower
    assert got <= ref + 1e-9 and got == pytest.approx(ref, rel=0.03)
    assert epsilon(z, q, rounds, delta, method="pld") < got  # PLD is tighter
    # monotone in the obvious directions
    assert epsilon(z, q, 2 * rounds, delta) > got > epsilon(2 * z, q, rounds, delta)
    assert epsilon(z, q, 0, delta) == 0.0


def test_ledger_matches_one_shot_and_survives_checkpoint() -> None:
    led = PrivacyLedger(1e-5)
    for _ in range(30):
        led.record(1.0, 0.1)
    assert led.epsilon() == pytest.approx(epsilon(1.0, 0.1, 30, 1e-5))
    again = PrivacyLedger.from_state(led.state())
    assert again.epsilon() == pytest.approx(led.epsilon())
    with pytest.raises(DPError, match="ledger"):
        PrivacyLedger.from_state({"delta": 1e-5, "rounds": [[1.0, 2.0, 3]]})
    with pytest.raises(DPError, match="method"):
        led.epsilon("moments")


def test_dp_fedavg_strategy_noises_updates_and_reports_privacy() -> None:
    g = {"w": np.zeros(1000, np.float32)}
    s = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, expected_clients=10, sample_rate=0.1, seed=3)
    ups = [ClientUpdate(f"d{i}", {"w": np.full(1000, 0.1, np.float32)}, 50) for i in range(10)]
    new = s.aggregate(1, g, ups)
    # each update (norm 3.16) clipped to 0.5 -> mean 0.5/sqrt(1000) per coordinate, plus noise
    mean_part = 0.5 / math.sqrt(1000)
    noise = new["w"] - mean_part
    assert abs(noise.std() - 0.05) < 0.005 and abs(noise.mean()) < 0.01
    assert s.privacy_spent() == pytest.approx(epsilon(1.0, 0.1, 1, 1e-5))
    restored = DPFedAvg(0.5, 1.0, 10, 0.1)
    restored.load_state_dict(s.state_dict())
    assert restored.privacy_spent() == pytest.approx(s.privacy_spent())


def test_dp_fedavg_is_available_by_name() -> None:
    from edgefed.strategies import make_strategy

    s = make_strategy(
        "dp-fedavg", clip_norm=1.0, noise_multiplier=1.0, expected_clients=5, sample_rate=0.5
    )
    assert isinstance(s, DPFedAvg) and s.privacy_spent() == 0.0
    with pytest.raises(ValueError, match="bad parameters"):
        make_strategy("dp-fedavg", clip_norm=1.0)
