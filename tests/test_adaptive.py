"""Adaptive per-device compression (issue 15): the ladder choice, the size prediction from the
real codec, and error feedback that stays exact when a device's spec changes mid-run."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.codec import ErrorFeedback, ModelSchema, UpdateMeta, decode_update, encode_update
from edgefed.coordinator.adaptive import (
    AUTO_WINDOW,
    DEFAULT_LADDER,
    AdaptiveUplink,
    auto_budget,
    choose_spec,
    parse_ladder,
    spec_bytes,
    spec_sizes,
)

SHAPES = {"fc1.weight": (64, 64), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}


def test_predicted_size_is_the_real_encoded_size() -> None:
    sizes = spec_sizes(SHAPES)
    assert list(sizes) == list(DEFAULT_LADDER)
    # each rung is smaller than the one before (the ladder's point)
    assert all(a > b for a, b in zip(sizes.values(), list(sizes.values())[1:], strict=False))
    rng = np.random.default_rng(5)  # another delta, other values: same length
    delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    meta = UpdateMeta(1, "size-probe", 1, "r0", kind="delta")
    for spec, n in sizes.items():
        got = len(encode_update(delta, meta, spec))
        if spec == "int8":  # dense: exactly the same length
            assert got == n == spec_bytes(SHAPES, spec, seed=9)
        else:  # top-k index gaps are varint-coded: positions move the length by a few bytes
            assert abs(got - n) <= 0.02 * n, (spec, got, n)


def test_choice_fits_the_budget() -> None:
    sizes = {
        "int8": 100_000,
        "topk:0.1+int8": 20_000,
        "topk:0.01+int8": 3_000,
        "topk:0.001+int8": 900,
    }
    fast = choose_spec(sizes, 1e6, 1.0)
    assert (fast.spec, fast.fits) == ("int8", True) and fast.predicted_s == pytest.approx(0.1)
    modem = choose_spec(sizes, 10_000, 1.0)  # 10 kB/s: int8 takes 10 s, top-10% 2 s
    assert (modem.spec, modem.predicted_bytes) == ("topk:0.01+int8", 3_000)
    assert modem.predicted_s is not None and modem.predicted_s <= 1.0
    hopeless = choose_spec(sizes, 100, 1.0)
    assert (hopeless.spec, hopeless.fits) == ("topk:0.001+int8", False)
    unknown = choose_spec(sizes, None, 1.0)  # never measured: no reason to compress more
    assert (unknown.spec, unknown.fits, unknown.predicted_s) == ("int8", False, None)
    # overhead counts: 2_900 + 200 B at 3_000 B/s misses 1 s, so one rung further
    assert choose_spec(sizes, 3_000, 1.0, overhead_bytes=200).spec == "topk:0.001+int8"
    # a configured ladder in its own order
    assert choose_spec([("fp16", 50), ("int8", 25)], 30, 1.0).spec == "int8"


def test_bad_ladders_and_budgets_are_named() -> None:
    assert parse_ladder(["int8", "topk:0.1+int8"]) == ("int8", "topk:0.1+int8")
    with pytest.raises(ValueError, match=r"\[compression\] ladder: bad spec 'topk:2'"):
        parse_ladder(["int8", "topk:2"])
    with pytest.raises(ValueError, match="non-empty list"):
        parse_ladder("int8")
    with pytest.raises(ValueError, match="upload_budget_s must be > 0"):
        choose_spec({"int8": 1}, 1.0, 0)
    with pytest.raises(ValueError, match="empty"):
        choose_spec({}, 1.0, 1.0)


def test_error_feedback_survives_spec_changes(tmp_path) -> None:
    """Sum of what was sent + the residual left == sum of the true deltas, round after round,
    while the spec walks the ladder down and back up (and the state goes through disk)."""
    schema = ModelSchema(SHAPES)
    ef = ErrorFeedback(schema)
    rng = np.random.default_rng(0)
    sent = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    true = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    walk = ["int8", "topk:0.001+int8", "topk:0.01+int8", "topk:0.1+int8", "int8", "topk:0.001+int8"]
    for rnd, spec in enumerate(walk, 1):
        delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        payload = encode_update(
            delta, UpdateMeta(rnd, "d", 1, "r", kind="delta"), spec, feedback=ef
        )
        dec = decode_update(payload, schema).to_dense()
        for k in SHAPES:
            sent[k] += dec[k]
            true[k] += delta[k]
        res = ef.residuals()
        for k in SHAPES:
            np.testing.assert_allclose(sent[k] + res[k], true[k], atol=1e-4, err_msg=f"{spec} {k}")
        ef.save(tmp_path / "res.bin")  # a restart between rounds keeps it exact too
        ef = ErrorFeedback.load(tmp_path / "res.bin", schema)
    # the sparse rungs really dropped mass into the residual (the check above is not vacuous)
    assert ef.norm() > 1.0


def test_coordinator_hook_reads_the_presence_rate() -> None:
    hook = AdaptiveUplink(SHAPES, upload_budget_s=1.0)
    assert hook.spec_for({}).spec == "int8"  # an old agent: no rate reported
    assert hook.spec_for({"uplink_bytes_per_s": "fast"}).spec == "int8"  # junk: ignored
    assert hook.spec_for({"uplink_bytes_per_s": 10_000_000}).spec == "int8"
    slow = hook.spec_for({"uplink_bytes_per_s": 1_500})  # int8 (~4.9 kB) takes > 3 s
    assert slow.spec != "int8" and slow.fits
    assert slow.predicted_bytes == hook.sizes[slow.spec] + hook.overhead
    with pytest.raises(ValueError, match=r"\[compression\] upload_budget_s must be > 0"):
        AdaptiveUplink(SHAPES, upload_budget_s=0)


def test_auto_budget_is_a_share_of_the_median_recent_round() -> None:
    """(ratio - 1) x the median of the last AUTO_WINDOW rounds: None before any round, long
    rounds (the slow device's) fewer than half of the window do not move it, old rounds age
    out, unmeasurable durations are ignored."""
    assert auto_budget([], 1.5) is None
    assert auto_budget([0.0, float("nan")], 1.5) is None
    assert auto_budget([2.0], 1.5) == pytest.approx(1.0)
    typical, slow = [1.0, 1.2, 0.8, 1.0, 1.0], [9.0, 9.0]
    assert auto_budget(typical + slow, 1.5) == pytest.approx(0.5 * 1.0)
    assert auto_budget(typical + slow, 2.0) == pytest.approx(1.0)
    old = [100.0] * 50  # a slower era, then AUTO_WINDOW rounds of 1 s
    assert auto_budget(old + [1.0] * AUTO_WINDOW, 1.5) == pytest.approx(0.5)
    assert auto_budget(old + [1.0] * (AUTO_WINDOW // 2 - 1), 1.5) == pytest.approx(50.0)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="budget_ratio must be > 1"):
            auto_budget([1.0], bad)


def test_auto_hook_follows_the_fleet_round_time() -> None:
    """upload_budget_s = "auto": every device on the first rung until a round was measured;
    then the 3 kB/s device is pushed down the ladder by short rounds and let back up by
    long ones, while the fast device stays on int8."""
    hook = AdaptiveUplink(SHAPES, upload_budget_s="auto", budget_ratio=1.5)
    slow, fast = {"uplink_bytes_per_s": 3_000}, {"uplink_bytes_per_s": 10_000_000}
    assert hook.budget is None
    first = hook.spec_for(slow)
    assert (first.spec, first.predicted_s, first.fits) == ("int8", None, False)
    for _ in range(5):
        hook.observe_round(1.0)
    assert hook.budget == pytest.approx(0.5)
    short = hook.spec_for(slow)
    assert short == choose_spec(hook.sizes, 3_000, 0.5, hook.overhead)
    assert short.spec != "int8" and short.fits
    assert hook.spec_for(fast).spec == "int8"
    int8_s = (hook.sizes["int8"] + hook.overhead) / 3_000
    for _ in range(AUTO_WINDOW):  # rounds long enough that int8 fits half of one
        hook.observe_round(2.2 * int8_s)
    assert hook.spec_for(slow).spec == "int8"
    with pytest.raises(ValueError, match='upload_budget_s must be > 0 or "auto"'):
        AdaptiveUplink(SHAPES, upload_budget_s="fast")
    with pytest.raises(ValueError, match=r"\[compression\] budget_ratio must be > 1"):
        AdaptiveUplink(SHAPES, upload_budget_s="auto", budget_ratio=1.0)
