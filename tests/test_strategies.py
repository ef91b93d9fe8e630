"""Strategies: each aggregate checked against an independent small reference."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.strategies import (
    ClientUpdate,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Median,
    TrimmedMean,
    UpdateRejected,
    clip_update,
    make_strategy,
    update_norm,
)

RNG = np.random.default_rng(0)
G = {"w": RNG.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(3, np.float32)}


def _upd(dev: str, n: int, scale: float = 1.0, names=("w", "b"), mask=None) -> ClientUpdate:
    r = np.random.default_rng([ord(c) for c in dev])
    delta = {k: (scale * r.standard_normal(G[k].shape)).astype(np.float32) for k in names}
    return ClientUpdate(dev, delta, n, mask)


def test_fedavg_is_sample_weighted_mean() -> None:
    ups = [_upd("a", 10), _upd("b", 30), _upd("c", 60)]
    out = FedAvg().aggregate(1, G, ups)
    for k in G:
        ref = G[k] + sum(u.num_samples * u.delta[k] for u in ups) / 100
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6)
    assert out["w"] is not G["w"]


def test_partial_updates_are_averaged_per_coordinate() -> None:
    full = _upd("full", 10)
    head = _upd("head", 30, names=("b",))  # a weak device trains only the head
    mask = {"w": np.zeros((3, 4), np.float32)}
    mask["w"][0] = 1
    masked = _upd("masked", 20, mask=mask)
    out = FedAvg().aggregate(1, G, [full, head, masked])
    ref_b = G["b"] + (10 * full.delta["b"] + 30 * head.delta["b"] + 20 * masked.delta["b"]) / 60
    np.testing.assert_allclose(out["b"], ref_b, rtol=1e-5, atol=1e-6)
    ref_w = G["w"] + full.delta["w"]  # rows 1-2: only `full` covers them
    ref_w[0] = G["w"][0] + (10 * full.delta["w"][0] + 20 * masked.delta["w"][0]) / 30
    np.testing.assert_allclose(out["w"], ref_w, rtol=1e-5, atol=1e-6)
    # nobody covers "w": unchanged, no NaN from a zero weight
    only_head = FedAvg().aggregate(2, G, [head])
    np.testing.assert_array_equal(only_head["w"], G["w"])


def test_no_updates_keeps_model() -> None:
    out = FedAvg().aggregate(1, G, [])
    np.testing.assert_array_equal(out["w"], G["w"])


def test_median_and_trimmed_mean_match_reference_and_resist_outliers() -> None:
    ups = [_upd(f"d{i}", 1 + i) for i in range(5)]
    ups.append(_upd("evil", 1000, scale=1e4))
    med = Median().aggregate(1, G, ups)
    st = np.stack([u.delta["w"] for u in ups])
    np.testing.assert_allclose(med["w"], G["w"] + np.median(st, axis=0), rtol=1e-6)
    tm = TrimmedMean(beta=0.2).aggregate(1, G, ups)  # floor(0.2*6)=1 trimmed each side
    srt = np.sort(st, axis=0)[1:-1]
    np.testing.assert_allclose(tm["w"], G["w"] + srt.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(tm["w"] - G["w"]).max() < 10  # the 1e4-scaled update was trimmed
    avg = FedAvg().aggregate(1, G, ups)
    assert np.abs(avg["w"] - G["w"]).max() > 100  # ...while FedAvg is dragged away


def test_robust_strategies_respect_masks() -> None:
    mask = {"w": np.zeros((3, 4), np.float32)}
    a, b = _upd("a", 1), _upd("b", 1, mask=mask)
    med = Median().aggregate(1, G, [a, b])
    np.testing.assert_allclose(med["w"], G["w"] + a.delta["w"], rtol=1e-6)
    np.testing.assert_allclose(med["b"], G["b"] + (a.delta["b"] + b.delta["b"]) / 2, rtol=1e-5)


def _adam_ref(kind: str, deltas, lr=0.1, b1=0.9, b2=0.99, tau=1e-3):
    x = G["w"].astype(np.float64).copy()
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(("cls", "kind"), [(FedAdam, "adam"), (FedYogi, "yogi")])
def test_server_optimizers_match_reference_and_checkpoint(cls, kind) -> None:
    s = cls(server_lr=0.1)
    params = dict(G)
    deltas = []
    for rnd in range(3):
        u = _upd(f"r{rnd}", 5)
        deltas.append(u.delta["w"].astype(np.float64))
        params = s.aggregate(rnd, params, [u])
        if rnd == 1:  # checkpoint and restore mid-way
            state = s.state_dict()
            s = cls(server_lr=0.1)
            s.load_state_dict(state)
    np.testing.assert_allclose(params["w"], _adam_ref(kind, deltas), rtol=1e-4, atol=1e-5)


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    ups = [_upd("a", 3), _upd("b", 7)]
    assert FedProx(mu=0.1).configure_round(1) == {"prox_mu": 0.1}
    p, a = FedProx(mu=0.1).aggregate(1, G, ups), FedAvg().aggregate(1, G, ups)
    np.testing.assert_array_equal(p["w"], a["w"])


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (ClientUpdate("x", {"zz": np.zeros(3, np.float32)}, 1), "unknown tensor 'zz'"),
        (ClientUpdate("x", {"b": np.zeros(4, np.float32)}, 1), "shape"),
        (ClientUpdate("x", {"b": np.zeros(3, np.float64)}, 1), "dtype float64"),
        (ClientUpdate("x", {"b": np.array([0, np.nan, 0], np.float32)}, 1), "NaN"),
        (ClientUpdate("x", {"b": np.zeros(3, np.float32)}, 0), "num_samples"),
        (ClientUpdate("x", {}, 1), "no tensors"),
    ],
)
def test_invalid_updates_rejected_with_reason(update, reason) -> None:
    s = FedAvg()
    ok, bad = s.validate(G, [update, _upd("good", 1)])
    assert [u.device_id for u in ok] == ["good"]
    assert reason in bad[0].reason and bad[0].device_id == "x"
    with pytest.raises(UpdateRejected, match=reason):
        s.aggregate(1, G, [update])


def test_norm_bounding() -> None:
    u = _upd("big", 1, scale=100.0)
    clipped, norm = clip_update(u.delta, 1.0)
    assert norm > 100 and abs(update_norm(clipped) - 1.0) < 1e-5
    out = FedAvg(max_update_norm=1.0).aggregate(1, G, [u])
    diff = {k: out[k] - G[k] for k in G}
    assert update_norm(diff) <= 1.0 + 1e-5


def test_make_strategy() -> None:
    assert isinstance(make_strategy("FedYogi", server_lr=0.05), FedYogi)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="bad parameters"):
        make_strategy("fedavg", mu=1)
    with pytest.raises(ValueError, match="beta"):
        make_strategy("trimmed_mean", beta=0.5)
