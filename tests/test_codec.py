"""Codec: spec parsing, round trips, error feedback, accumulation, state files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy as stn

from edgefed.codec import (
    Accumulator,
    CodecError,
    CompressionSpec,
    DecodeLimits,
    ErrorFeedback,
    ModelSchema,
    SparseTensor,
    UpdateMeta,
    decode_update,
    encode_encoded,
    encode_update,
)

SCHEMA = ModelSchema({"fc1.weight": (128, 64), "fc1.bias": (128,), "fc2.weight": (10, 128)})
META = UpdateMeta(round=3, device_id="dev-7", num_samples=120, model_version="v3", kind="delta")


def make_update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SCHEMA.items()}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (spec, max relative L2 error on the compressed tensors)
SPECS = [
    ("none", 0.0),
    ("fp16", 1e-3),
    ("int8", 0.02),
    ("int8:channel", 0.02),
    ("int8:block=256", 0.02),
    ("int4:block=32", 0.2),
    ("int4", 0.2),
]


@pytest.mark.parametrize(("spec", "bound"), SPECS)
def test_dense_round_trip_error_bound(spec: str, bound: float) -> None:
    upd = make_update()
    payload = encode_update(upd, META, spec)
    dec = decode_update(payload, SCHEMA)
    assert dec.meta == META
    dense = dec.to_dense()
    assert set(dense) == set(upd)
    small = CompressionSpec.parse(spec).small_pipeline  # small tensors: dense, never top-k
    b_err = rel(dense["fc1.bias"], upd["fc1.bias"])
    assert b_err == 0.0 if small.kind == "f32" else 0 < b_err <= max(bound, 0.02)
    for k in ("fc1.weight", "fc2.weight"):
        assert dense[k].shape == upd[k].shape and dense[k].dtype == np.float32
        assert rel(dense[k], upd[k]) <= bound


def test_int8_per_element_error_is_half_a_step() -> None:
    upd = make_update(1)
    dec = decode_update(encode_update(upd, META, "int8:block=64"), SCHEMA)
    t = dec.tensors["fc1.weight"]
    steps = np.repeat(t.scales, 64)[: upd["fc1.weight"].size].reshape(128, 64)
    assert np.all(np.abs(dec.to_dense()["fc1.weight"] - upd["fc1.weight"]) <= steps / 2 + 1e-7)
    assert t.scales.size == 128 * 64 // 64


def test_channel_scales_are_per_row() -> None:
    upd = make_update(2)
    upd["fc1.weight"][5] *= 100.0
    dec = decode_update(encode_update(upd, META, "int8:channel"), SCHEMA)
    t = dec.tensors["fc1.weight"]
    assert t.block == 64 and t.scales.size == 128
    np.testing.assert_allclose(t.scales, np.abs(upd["fc1.weight"]).max(axis=1) / 127, rtol=1e-6)


@pytest.mark.parametrize("values", ["", "+int8", "+fp16"])
def test_topk_keeps_the_largest(values: str) -> None:
    upd = make_update(3)
    dec = decode_update(encode_update(upd, META, f"topk:0.05{values}"), SCHEMA)
    t = dec.tensors["fc1.weight"]
    assert isinstance(t, SparseTensor) and t.indices.size == int(np.ceil(0.05 * 8192))
    flat = upd["fc1.weight"].reshape(-1)
    thresh = np.sort(np.abs(flat))[-t.indices.size]
    assert np.all(np.abs(flat[t.indices]) >= thresh)
    d = dec.to_dense()["fc1.weight"].reshape(-1)
    tol = {"": 0, "+fp16": 1e-2, "+int8": np.abs(flat).max() / 254 + 1e-6}[values]
    assert np.all(
        np.abs(d[t.indices] - flat[t.indices])
        <= tol * (1 if values != "+fp16" else np.abs(flat[t.indices]))
    )
    mask = np.ones(flat.size, bool)
    mask[t.indices] = False
    assert not d[mask].any()


def test_spec_parsing_and_overrides() -> None:
    s = CompressionSpec.parse("topk:0.01+int8; *.bias=fp16; fc2.*=int8:block=64; min_elements=10")
    assert str(s.for_tensor("fc1.weight", 8192)) == "topk:0.01+int8"
    assert str(s.for_tensor("fc1.bias", 128)) == "fp16"
    assert str(s.for_tensor("fc2.weight", 1280)) == "int8:block=64"
    assert str(s.for_tensor("tiny", 5)) == "int8"  # small: dense per-tensor int8 (lossy spec)
    assert CompressionSpec.parse(str(s)) == s
    default = CompressionSpec.parse("int8")
    assert str(default.for_tensor("fc1.bias", 1023)) == "int8"  # small tensors dense int8
    assert str(CompressionSpec.parse("none").for_tensor("b", 10)) == "none"
    assert str(CompressionSpec.parse("fp16").for_tensor("b", 10)) == "fp16"
    old = CompressionSpec.parse("topk:0.01+int8; small=none")  # the v1 default, on request
    assert str(old.for_tensor("b", 10)) == "none" and CompressionSpec.parse(str(old)) == old
    assert str(default.for_tensor("w", 1024)) == "int8"
    for bad in [
        "",
        "zip",
        "topk:0",
        "topk:1.5",
        "topk:x",
        "int8:block=0",
        "int8; foo",
        "int8; min_elements=x",
        "int8; topk_mode=fast",
        "int8; small=topk:0.1",
    ]:
        with pytest.raises(CodecError):
            CompressionSpec.parse(bad)


def test_meta_and_schema_validation() -> None:
    for kw in (
        {"round": -1},
        {"num_samples": 1.5},
        {"device_id": "x" * 200},
        {"device_id": "bad\nid"},
        {"kind": "gradient"},
        {"round": True},
    ):
        args = {**META.__dict__, **kw}
        with pytest.raises(CodecError):
            UpdateMeta(**args)
    for bad in ({"a b": (1,)}, {"w": (-1,)}, {"w": (2**20, 2**20)}, {"w": "12"}):
        with pytest.raises(CodecError):
            ModelSchema(bad)


def test_encode_rejects_bad_tensors() -> None:
    upd = make_update()
    upd["fc1.weight"][3, 3] = np.nan
    for spec in ("none", "int8", "topk:0.01+int8", "int4", "fp16"):
        with pytest.raises(CodecError, match=r"fc1\.weight"):
            encode_update(upd, META, spec)
    with pytest.raises(CodecError, match="float array"):
        encode_update({"fc1.bias": np.ones(128, np.int32)}, META, "none")
    with pytest.raises(CodecError, match="float16"):
        encode_update({"fc1.bias": np.full(128, 1e6, np.float32)}, META, "fp16; min_elements=0")
    weights_meta = UpdateMeta(1, "coord", 0, "v1", "weights")
    with pytest.raises(CodecError, match="delta"):
        encode_update(make_update(), weights_meta, "int8", feedback=ErrorFeedback(SCHEMA))


def test_encoding_is_deterministic_and_standard_safetensors() -> None:
    upd = make_update(4)
    assert encode_update(upd, META, "topk:0.1+int8") == encode_update(upd, META, "topk:0.1+int8")
    p1 = encode_update(upd, META, "topk:0.1+int8; small=none", version=1)
    p2 = encode_update(upd, META, "topk:0.1+int8; small=none", version=1)
    assert p1 == p2
    loaded = stn.load(p1)  # the reference safetensors parser reads our payloads
    dec = decode_update(p1, SCHEMA, accept_v1=True)
    np.testing.assert_array_equal(loaded["fc1.weight/v"], dec.tensors["fc1.weight"].values)
    np.testing.assert_array_equal(loaded["fc1.bias/v"], upd["fc1.bias"])
    hlen = int.from_bytes(p1[:8], "little")
    assert (8 + hlen) % 8 == 0
    md = json.loads(p1[8 : 8 + hlen])["__metadata__"]
    assert md["format"] == "edgefed.update" and md["version"] == "1"


def test_downlink_weights_kind_and_partial_update() -> None:
    upd = make_update(5)
    meta = UpdateMeta(
        round=4, device_id="coordinator", num_samples=0, model_version="v4", kind="weights"
    )
    dec = decode_update(encode_update(upd, meta, "int8"), SCHEMA)
    assert dec.meta.kind == "weights"
    partial = {"fc1.bias": upd["fc1.bias"]}
    dec = decode_update(encode_update(partial, META, "none"), SCHEMA)
    assert set(dec.tensors) == {"fc1.bias"}


@pytest.mark.parametrize(
    "spec",
    [
        "topk:0.01+int8",
        "topk:0.05",
        "int8",
        "int4",
        "fp16",
        "topk:0.02+fp16",
        "topk:0.05+int8; topk_mode=approx",
    ],
)
def test_error_feedback_conserves_mass(spec: str) -> None:
    """sum of what was sent + final residual == sum of all updates (EF invariant)."""
    ef = ErrorFeedback(SCHEMA)
    total = {k: np.zeros(s, np.float64) for k, s in SCHEMA.items()}
    sent = {k: np.zeros(s, np.float64) for k, s in SCHEMA.items()}
    for r in range(6):
        upd = make_update(10 + r)
        for k in upd:
            total[k] += upd[k]
        dec = decode_update(encode_update(upd, META, spec, feedback=ef), SCHEMA)
        for k, v in dec.to_dense().items():
            sent[k] += v
    res = ef.residuals()
    for k in SCHEMA:
        got = sent[k] + res.get(k, 0)
        np.testing.assert_allclose(got, total[k], atol=2e-4)


def test_error_feedback_helps_topk() -> None:
    """With EF, the running sum of sent updates tracks the true sum much better."""
    errs = {}
    for use_ef in (False, True):
        ef = ErrorFeedback(SCHEMA) if use_ef else None
        total = np.zeros(8192)
        sent = np.zeros(8192)
        for r in range(30):
            upd = make_update(100 + r)
            total += upd["fc1.weight"].reshape(-1)
            dec = decode_update(encode_update(upd, META, "topk:0.05+int8", feedback=ef), SCHEMA)
            sent += dec.to_dense()["fc1.weight"].reshape(-1)
        errs[use_ef] = np.linalg.norm(sent - total) / np.linalg.norm(total)
    assert errs[True] < 0.6 * errs[False]


def test_error_feedback_save_load(tmp_path) -> None:
    ef = ErrorFeedback(SCHEMA)
    encode_update(make_update(7), META, "topk:0.01+int8", feedback=ef)
    path = tmp_path / "ef.safetensors"
    ef.save(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left
    back = ErrorFeedback.load(path, SCHEMA)
    for k, v in ef.residuals().items():
        np.testing.assert_array_equal(back.residuals()[k], v)
    again = ErrorFeedback.load(path)  # schema taken from the file
    assert again.schema.to_json() == SCHEMA.to_json()
    # continuing after a restart gives the same bytes as continuing in memory
    nxt = make_update(8)
    assert encode_update(nxt, META, "topk:0.01+int8", feedback=ef) == encode_update(
        nxt, META, "topk:0.01+int8", feedback=back
    )
    other = ModelSchema({"fc1.weight": (128, 64)})
    with pytest.raises(CodecError, match="different model"):
        ErrorFeedback.load(path, other)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CodecError, match=r"sha256|NaN"):
        ErrorFeedback.load(path, SCHEMA)
    path.write_bytes(b"garbage")
    with pytest.raises(CodecError):
        ErrorFeedback.load(path, SCHEMA)
    with pytest.raises(CodecError, match="cannot read"):
        ErrorFeedback.load(tmp_path / "missing", SCHEMA)


def test_accumulator_weighted_average_matches_numpy() -> None:
    acc = Accumulator(SCHEMA, threads=2)
    ref = {k: np.zeros(s, np.float64) for k, s in SCHEMA.items()}
    wsum = 0.0
    for i, spec in enumerate(
        ["none", "fp16", "int8:block=32", "int4", "topk:0.1+int8", "topk:0.2"]
    ):
        upd = make_update(20 + i)
        dec = decode_update(encode_update(upd, META, spec), SCHEMA)
        w = float(10 + i)
        acc.add(dec, w)
        for k, v in dec.to_dense().items():
            ref[k] += w * v
        wsum += w
    sums, weights = acc.result()
    avg = acc.average()
    for k in SCHEMA:
        np.testing.assert_allclose(sums[k], ref[k], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(weights[k], np.full(SCHEMA[k], wsum, np.float32))
        np.testing.assert_allclose(avg[k], ref[k] / wsum, rtol=1e-5, atol=1e-5)
    assert acc.count == 6


@pytest.mark.parametrize("batch", [1, 2, 64])
def test_accumulator_batching_gives_same_sums(batch: int) -> None:
    acc = Accumulator(SCHEMA, batch=batch)
    ref = {k: np.zeros(s, np.float64) for k, s in SCHEMA.items()}
    for i in range(5):
        dec = decode_update(encode_update(make_update(40 + i), META, "topk:0.1+int8"), SCHEMA)
        acc.add(dec, 1.0 + i)
        for k, v in dec.to_dense().items():
            ref[k] += (1.0 + i) * v
    sums, weights = acc.result()
    for k in SCHEMA:
        np.testing.assert_allclose(sums[k], ref[k], rtol=1e-5, atol=1e-5)
        assert np.all(weights[k] == 15.0)


def test_accumulator_partial_updates_average_correctly() -> None:
    acc = Accumulator(SCHEMA)
    full = make_update(30)
    acc.add(decode_update(encode_update(full, META, "none"), SCHEMA), 1.0)
    # second device sends only fc1.bias: fc1.weight keeps device 1's value
    acc.add(
        decode_update(
            encode_update({"fc1.bias": np.full(128, 3.0, np.float32)}, META, "none"), SCHEMA
        ),
        3.0,
    )
    # third device sends a coordinate-partial fc2.weight (missing = absent)
    idx = np.array([0, 5, 1279], np.uint32)
    part = SparseTensor((10, 128), idx, np.array([1.0, 2.0, 3.0], np.float32), fill="absent")
    acc.add(decode_update(encode_encoded({"fc2.weight": part}, META), SCHEMA), 2.0)
    avg = acc.average()
    _, weights = acc.result()
    np.testing.assert_allclose(avg["fc1.weight"], full["fc1.weight"], rtol=1e-6)
    np.testing.assert_allclose(avg["fc1.bias"], (full["fc1.bias"] + 9.0) / 4.0, rtol=1e-6)
    f2 = full["fc2.weight"].reshape(-1).copy()
    expect = f2.copy()
    expect[idx] = (f2[idx] + 2.0 * np.array([1.0, 2.0, 3.0])) / 3.0
    np.testing.assert_allclose(avg["fc2.weight"].reshape(-1), expect, rtol=1e-6)
    w2 = weights["fc2.weight"].reshape(-1)
    assert w2[5] == 3.0 and w2[6] == 1.0


def test_accumulator_rejects_and_changes_nothing() -> None:
    acc = Accumulator(SCHEMA)
    dec = decode_update(encode_update(make_update(), META, "int8"), SCHEMA)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(CodecError, match="weight"):
            acc.add(dec, bad)
    other = ModelSchema({"fc1.weight": (64, 128), "fc1.bias": (128,), "fc2.weight": (10, 128)})
    dec_other = decode_update(
        encode_update({"fc1.weight": np.ones((64, 128), np.float32)}, META, "none"), other
    )
    with pytest.raises(CodecError, match="does not match"):
        acc.add(dec_other, 1.0)
    weights_dec = decode_update(
        encode_update(make_update(), UpdateMeta(1, "c", 0, "v", "weights"), "int8"), SCHEMA
    )
    acc.add(dec, 1.0)
    with pytest.raises(CodecError, match="mix"):
        acc.add(weights_dec, 1.0)
    assert acc.count == 1
    empty = Accumulator(SCHEMA).average()
    assert all(not v.any() for v in empty.values())


@pytest.mark.parametrize("version", [1, 2])
def test_decode_limits_are_enforced(version: int) -> None:
    payload = encode_update(make_update(), META, "none", version=version)
    v1 = version == 1  # the retired v1 is read only on request (the coordinator's intake)
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode_update(payload, SCHEMA, DecodeLimits(max_bytes=1000), accept_v1=v1)
    if version == 1:
        with pytest.raises(CodecError, match="header length"):
            decode_update(payload, SCHEMA, DecodeLimits(max_header_bytes=64), accept_v1=v1)
    else:
        with pytest.raises(CodecError, match="tensor count"):
            decode_update(payload, SCHEMA, DecodeLimits(max_tensors=2))
    with pytest.raises(CodecError, match="not in the model schema"):
        decode_update(
            payload, ModelSchema({"fc1.weight": (128, 64), "other": (3,), "x": (1,)}), accept_v1=v1
        )
    with pytest.raises(CodecError, match="shape"):  # same sizes, transposed: v2's layout hash
        decode_update(
            payload,
            ModelSchema({"fc1.weight": (64, 128), "fc1.bias": (128,), "fc2.weight": (10, 128)}),
            accept_v1=v1,
        )


def test_accumulator_rejects_bad_hand_built_sparse_before_any_change() -> None:
    acc = Accumulator(SCHEMA)
    good = decode_update(encode_update(make_update(), META, "topk:0.1+int8"), SCHEMA)
    acc.add(good, 1.0)
    bad_cases = [
        (SparseTensor((128,), np.array([5, 2], np.uint32), np.ones(2, np.float32)), "strictly"),
        (SparseTensor((128,), np.array([1, 200], np.uint32), np.ones(2, np.float32)), "range"),
        (SparseTensor((128,), np.array([1, 2], np.uint32), np.ones(3, np.float32)), "disagree"),
        (SparseTensor((128,), np.array([1], np.uint32), np.ones(1, np.float64)), "values"),
        (SparseTensor((128,), np.array([1], np.uint32), np.full(1, np.nan, np.float32)), "finite"),
    ]
    for t, match in bad_cases:
        upd = type(good)(META, {"fc1.bias": t})
        with pytest.raises(CodecError, match=match):
            acc.add(upd, 1.0)
    assert acc.count == 1
    sums, _ = acc.result()
    np.testing.assert_allclose(sums["fc1.weight"], good.to_dense()["fc1.weight"], rtol=1e-6)
