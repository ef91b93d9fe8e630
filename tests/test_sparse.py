"""C++ sparse kernels: top-k, error feedback, index coding, int4, aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefed import sparse


def ref_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: stable sort by -|x| (ties -> lowest index), then sort."""
    order = np.argsort(-np.abs(x), kind="stable")[:k]
    return np.sort(order)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 70_000, 300_000])
@pytest.mark.parametrize("frac", [0.0, 0.001, 0.01, 0.3, 1.0])
def test_topk_exact_matches_reference(n: int, frac: float) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    k = round(frac * n)
    idx, vals = sparse.topk(x, k)
    np.testing.assert_array_equal(idx, ref_topk(x, k))
    np.testing.assert_array_equal(vals, x[idx])
    ridx, _ = sparse.topk(x, k) if n <= 1000 else sparse._s.topk_radix(x, k)
    np.testing.assert_array_equal(ridx, ref_topk(x, k))


@pytest.mark.parametrize(
    "kind",
    ["ties", "zeros", "sorted", "spike", "tiny", "huge", "negzero", "lognormal", "levels"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_topk_adversarial_inputs(kind: str, threads: int) -> None:
    n, k = 200_000, 2_000
    rng = np.random.default_rng(1)
    x = {
        "ties": np.full(n, 0.5, np.float32),
        "zeros": np.zeros(n, np.float32),
        "sorted": np.linspace(-1, 1, n, dtype=np.float32),
        "spike": np.where(np.arange(n) % 97 == 0, 3.0, 1.0).astype(np.float32),
        "tiny": (rng.standard_normal(n) * 1e-40).astype(np.float32),  # subnormals
        "huge": (rng.standard_normal(n) * 1e37).astype(np.float32),
        "negzero": np.where(np.arange(n) % 2 == 0, -0.0, 0.0).astype(np.float32),
        "lognormal": rng.lognormal(0, 5, n).astype(np.float32),
        # few distinct magnitudes: many ties at the threshold inside the sampled band,
        # split across both threads' parts (lowest indices must win)
        "levels": (np.round(rng.standard_normal(n) * 64) / 64).astype(np.float32),
    }[kind]
    ref = ref_topk(x, k)
    for fn in (
        lambda: sparse.topk(x, k, threads=threads),
        lambda: sparse._s.topk_radix(x, k, threads),
    ):
        idx, vals = fn()
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(vals, x[ref])
    # Approximate: an exact top-m set with m within the documented band.
    idx, _ = sparse.topk(x, k, approximate=True, tolerance=0.1, threads=threads)
    m = idx.size
    assert abs(m - k) <= int(np.ceil(0.1 * k))
    np.testing.assert_array_equal(idx, ref_topk(x, m))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tol", [0.0, 0.05, 0.2])
def test_topk_approx_count_bound(seed: int, tol: float) -> None:
    rng = np.random.default_rng(seed)
    n = 500_000
    x = (rng.standard_normal(n) * rng.exponential(1, n)).astype(np.float32)
    k = [50, 500, 5_000, 50_000][seed % 4]
    idx, vals = sparse.topk(x, k, approximate=True, tolerance=tol, seed=seed)
    m = idx.size
    assert abs(m - k) <= int(np.ceil(tol * k))
    assert np.all(np.diff(idx.astype(np.int64)) > 0)
    np.testing.assert_array_equal(idx, ref_topk(x, m))
    np.testing.assert_array_equal(vals, x[idx])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [10, 100_000])
def test_topk_rejects_non_finite(bad: float, n: int) -> None:
    x = np.ones(n, np.float32)
    x[n // 2] = bad
    for approx in (False, True):
        with pytest.raises(ValueError, match="NaN or Inf"):
            sparse.topk(x, 3, approximate=approx)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse._s.topk_radix(x, 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.topk(x, 0)


def test_topk_argument_errors() -> None:
    with pytest.raises(ValueError, match="float32"):
        sparse.topk(np.ones(10, np.float64), 2)
    with pytest.raises(ValueError, match="k must be"):
        sparse.topk(np.ones(10, np.float32), -1)
    idx, vals = sparse.topk(np.ones(10, np.float32), 50)
    assert idx.size == 10 and vals.size == 10
    idx64, _ = sparse.topk(np.arange(10, dtype=np.float32), 3, index_dtype=np.int64)
    assert idx64.dtype == np.int64 and idx64.tolist() == [7, 8, 9]


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("approximate", [False, True])
def test_ef_topk_residual_identity(quantize: bool, approximate: bool) -> None:
    rng = np.random.default_rng(3)
    n, k = 100_000, 1_000
    residual = (rng.standard_normal(n) * 0.1).astype(np.float32)
    update = rng.standard_normal(n).astype(np.float32)
    acc = residual + update
    idx, vals, scale = sparse.ef_topk(
        residual, update, k, quantize=quantize, approximate=approximate
    )
    sent = np.zeros(n, np.float32)
    sent[idx] = vals.astype(np.float32) * scale if quantize else vals
    # residual = acc - decode(encode(acc)), exactly as the kernel computed it.
    np.testing.assert_allclose(residual, acc - sent, rtol=0, atol=1e-6)
    assert set(idx.tolist()) == set(ref_topk(acc, idx.size).tolist())
    if quantize:
        assert vals.dtype == np.int8 and np.abs(vals).max() == 127
        assert np.max(np.abs(residual[idx])) <= scale / 2 + 1e-6
    else:
        assert np.all(residual[idx] == 0)


def test_ef_topk_errors_leave_no_partial_write() -> None:
    r = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="lengths disagree"):
        sparse.ef_topk(r, np.ones(11, np.float32), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        sparse.ef_topk(np.zeros(20, np.float32)[::2], np.ones(10, np.float32), 2)
    u = np.ones(10, np.float32)
    u[3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.ef_topk(r, u, 2)


@pytest.mark.parametrize("n", [1, 9, 64, 1000, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.3, 1.0])
def test_index_coding_round_trip_and_auto_choice(n: int, density: float) -> None:
    rng = np.random.default_rng(n)
    idx = np.flatnonzero(rng.random(n) < density).astype(np.uint32)
    sizes = {}
    for coding in ("varint", "bitmap"):
        name, data = sparse.encode_indices(idx, n, coding)
        assert name == coding
        sizes[coding] = data.size
        np.testing.assert_array_equal(sparse.decode_indices(data, coding, idx.size, n), idx)
    name, data = sparse.encode_indices(idx, n)
    assert data.size == min(sizes.values())
    np.testing.assert_array_equal(sparse.decode_indices(data, name, idx.size, n), idx)


def test_varint_known_bytes() -> None:
    _, data = sparse.encode_indices(np.array([0, 1, 129, 16513], np.uint32), 1 << 20, "varint")
    # first index 0, gaps 1, 128 (0x80 0x01), 16384 (0x80 0x80 0x01)
    assert data.tolist() == [0, 1, 0x80, 0x01, 0x80, 0x80, 0x01]


@pytest.mark.parametrize(
    ("data", "count", "n", "match"),
    [
        ([1, 0x81], 2, 1000, "truncated"),
        ([1, 0], 2, 100, "duplicate"),
        ([1, 2, 3], 2, 100, "trailing"),
        ([99, 1], 2, 100, "out of range"),
        ([0x80, 0x80, 0x80, 0x80, 0x10], 1, 1 << 31, "overflows"),
        ([0x81, 0x00], 1, 1000, "not minimal"),
        ([5], 101, 100, "exceeds tensor size"),
        ([5], 3, 100, "exceeds index stream"),
    ],
)
def test_varint_decoder_rejects(data: list[int], count: int, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sparse.decode_indices(np.array(data, np.uint8), "varint", count, n)


def test_bitmap_decoder_rejects() -> None:
    with pytest.raises(ValueError, match="length"):
        sparse.decode_indices(np.zeros(3, np.uint8), "bitmap", 0, 100)
    with pytest.raises(ValueError, match="beyond"):
        sparse.decode_indices(np.array([0x80], np.uint8), "bitmap", 1, 7)
    with pytest.raises(ValueError, match="more entries"):
        sparse.decode_indices(np.array([0x03], np.uint8), "bitmap", 1, 8)
    with pytest.raises(ValueError, match="fewer entries"):
        sparse.decode_indices(np.array([0x01], np.uint8), "bitmap", 2, 8)
    with pytest.raises(ValueError, match="unknown index coding"):
        sparse.decode_indices(np.array([0x01], np.uint8), "zip", 1, 8)


def test_encode_indices_rejects_bad_order() -> None:
    for bad, match in (([3, 2], "strictly"), ([2, 2], "strictly"), ([1, 100], "out of range")):
        with pytest.raises(ValueError, match=match):
            sparse.encode_indices(np.array(bad, np.uint32), 100)


def test_int4_packing_onnx_semantics() -> None:
    q = np.array([1, -1, 7, -8, 9, -20, 3], np.int8)
    packed = sparse.pack_int4(q)
    # low nibble first; 9 -> 7, -20 -> -8 (saturate); odd tail has a zero high nibble
    assert packed.tolist() == [0xF1, 0x87, 0x87, 0x03]
    np.testing.assert_array_equal(sparse.unpack_int4(packed, 7), [1, -1, 7, -8, 7, -8, 3])
    with pytest.raises(ValueError, match="packed length"):
        sparse.unpack_int4(packed, 9)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 100_001])
@pytest.mark.parametrize("block", [1, 7, 32, 256])
def test_int4_quantize_round_trip(n: int, block: int) -> None:
    rng = np.random.default_rng(n + block)
    x = rng.standard_normal(n).astype(np.float32)
    packed, scales = sparse.quantize_int4(x, block)
    assert packed.size == (n + 1) // 2 and scales.size == -(-n // block)
    y = sparse.dequantize_int4(packed, n, block, scales)
    s = np.repeat(scales, block)[:n]
    assert np.all(np.abs(y - x) <= s / 2 + 1e-6)
    # independent reference: round half to even of x / s, saturate
    q = np.clip(np.rint(np.divide(x, s, out=np.zeros_like(x), where=s > 0)), -8, 7)
    np.testing.assert_array_equal(sparse.unpack_int4(packed, n), q.astype(np.int8))


def test_int8_blocks_reference() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1000).astype(np.float32)
    q, s = sparse.quantize_int8_blocks(x, 64)
    ref_s = np.array([np.abs(x[i : i + 64]).max() / np.float32(127) for i in range(0, 1000, 64)])
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    ref_q = np.clip(np.rint(x / np.repeat(s, 64)[:1000]), -127, 127)
    np.testing.assert_array_equal(q, ref_q.astype(np.int8))
    bad = x.copy()
    bad[10] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.quantize_int8_blocks(bad, 64)


@pytest.mark.parametrize("threads", [1, 2])
def test_accumulate_all_forms(threads: int) -> None:
    rng = np.random.default_rng(9)
    n = 150_000
    sums = np.zeros(n, np.float32)
    ref = np.zeros(n, np.float64)
    x = rng.standard_normal(n).astype(np.float32)
    sparse.accumulate_dense(sums, x, 2.0, threads)
    ref += 2.0 * x
    h = x.astype(np.float16)
    sparse.accumulate_dense(sums, h, 0.5, threads)
    ref += 0.5 * h.astype(np.float64)
    q, s = sparse.quantize_int8_blocks(x, 100)
    sparse.accumulate_int8(sums, q, s, 100, 3.0, threads)
    ref += 3.0 * q * np.repeat(s, 100)[:n]
    p4, s4 = sparse.quantize_int4(x, 32)
    sparse.accumulate_int4(sums, p4, s4, 32, 1.5, threads)
    ref += 1.5 * sparse.dequantize_int4(p4, n, 32, s4)
    idx = np.sort(rng.choice(n, 5000, replace=False)).astype(np.uint32)
    wsums = np.zeros(n, np.float32)
    v = rng.standard_normal(5000).astype(np.float32)
    sparse.accumulate_sparse(sums, wsums, idx, v, 1.0, 4.0, threads)
    ref[idx] += 4.0 * v
    qi = rng.integers(-127, 128, 5000).astype(np.int8)
    sparse.accumulate_sparse(sums, None, idx, qi, 0.01, 2.0, threads)
    ref[idx] += 2.0 * 0.01 * qi
    sparse.accumulate_sparse(sums, wsums, idx, v.astype(np.float16), 1.0, 1.0, threads)
    ref[idx] += v.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(sums, ref, rtol=1e-5, atol=1e-4)
    expect_w = np.zeros(n, np.float32)
    expect_w[idx] = 5.0
    np.testing.assert_array_equal(wsums, expect_w)


def test_accumulate_rejects_bad_input_without_writing() -> None:
    n = 100
    sums = np.zeros(n, np.float32)
    v = np.ones(3, np.float32)
    cases = [
        (np.array([1, 5, 100], np.uint32), v, 1.0, "out of range"),
        (np.array([5, 1, 7], np.uint32), v, 1.0, "strictly increasing"),
        (np.array([1, 1, 7], np.uint32), v, 1.0, "strictly increasing"),
        (np.array([1, 2], np.uint32), v, 1.0, "lengths disagree"),
        (np.array([1, 2, 3], np.uint32), np.array([1, np.nan, 1], np.float32), 1.0, "NaN"),
        (np.array([1, 2, 3], np.uint32), v, np.inf, "weight must be finite"),
    ]
    for idx, vals, w, match in cases:
        with pytest.raises(ValueError, match=match):
            sparse.accumulate_sparse(sums, None, idx, vals, 1.0, w)
    with pytest.raises(ValueError, match="scale must be finite"):
        sparse.accumulate_sparse(
            sums, None, np.array([1], np.uint32), np.ones(1, np.int8), np.nan, 1.0
        )
    with pytest.raises(ValueError, match="scales has"):
        sparse.accumulate_int8(sums, np.ones(n, np.int8), np.ones(3, np.float32), 10, 1.0)
    with pytest.raises(ValueError, match="scales must be finite"):
        sparse.accumulate_int8(sums, np.ones(n, np.int8), np.full(10, np.inf, np.float32), 10, 1.0)
    with pytest.raises(ValueError, match="length does not match"):
        sparse.accumulate_dense(sums, np.ones(n + 1, np.float32), 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.accumulate_dense(sums, np.full(n, np.inf, np.float16), 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        sparse.accumulate_dense(np.zeros(2 * n, np.float32)[::2], np.ones(n, np.float32), 1.0)
    assert not sums.any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [1024, 4096, 1 << 20])
def test_accumulate_sparse_batch_matches_reference(threads: int, chunk: int) -> None:
    rng = np.random.default_rng(chunk + threads)
    n = 300_000
    sums = np.zeros(n, np.float32)
    wsums = np.zeros(n, np.float32)
    ref = np.zeros(n, np.float64)
    ref_w = np.zeros(n, np.float64)
    items = []
    for i in range(12):
        m = int(rng.integers(0, 40_000))
        idx = np.sort(rng.choice(n, m, replace=False)).astype(np.uint32)
        kind = i % 3
        w = float(i + 1)
        if kind == 0:
            v = rng.standard_normal(m).astype(np.float32)
            items.append((idx, v, 1.0, w, False))
            ref[idx] += w * v
        elif kind == 1:
            v = rng.standard_normal(m).astype(np.float16)
            items.append((idx, v, 1.0, w, True))
            ref[idx] += w * v.astype(np.float64)
            ref_w[idx] += w
        else:
            v = rng.integers(-127, 128, m).astype(np.int8)
            items.append((idx, v, 0.05, w, False))
            ref[idx] += w * 0.05 * v
    sparse._s.acc_sparse_batch(sums, wsums, items, chunk, threads)
    np.testing.assert_allclose(sums, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(wsums, ref_w.astype(np.float32))


def test_accumulate_sparse_batch_validates_everything_before_writing() -> None:
    n = 1000
    sums = np.zeros(n, np.float32)
    good = (np.array([1, 2, 3], np.uint32), np.ones(3, np.float32), 1.0, 1.0, False)
    bad_cases = [
        ((np.array([1, 2, 1000], np.uint32), np.ones(3, np.float32), 1.0, 1.0, False), "range"),
        ((np.array([3, 2, 1], np.uint32), np.ones(3, np.float32), 1.0, 1.0, False), "strictly"),
        ((np.array([1, 2], np.uint32), np.ones(3, np.float32), 1.0, 1.0, False), "disagree"),
        ((np.array([1], np.uint32), np.ones(1, np.float32), 1.0, np.nan, False), "weight"),
        ((np.array([1], np.uint32), np.ones(1, np.int8), -1.0, 1.0, False), "scale"),
        ((np.array([1], np.uint32), np.ones(1, np.float32), 1.0, 1.0, True), "weight_sums"),
        ((np.array([1], np.uint32), np.ones(1, np.float64), 1.0, 1.0, False), "float32"),
        ((np.array([1], np.int64), np.ones(1, np.float32), 1.0, 1.0, False), "uint32"),
        ((np.array([1], np.uint32), np.array([np.inf], np.float32), 1.0, 1.0, False), "NaN"),
        ((np.array([1], np.uint32),), "each item"),
    ]
    for item, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            sparse._s.acc_sparse_batch(sums, None, [good, item], 1024, 1)
    assert not sums.any()  # the good item before the bad one was not applied either


def py_decode_varint(data: bytes, count: int, n: int) -> list[int] | None:
    """Independent reference decoder; None where the stream must be rejected."""
    out, pos, prev = [], 0, 0
    for i in range(count):
        v, shift, start = 0, 0, pos
        while True:
            if pos >= len(data):
                return None
            b = data[pos]
            pos += 1
            if shift == 28 and b & 0xF0:
                return None
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and pos - start > 1:
                    return None
                break
            shift += 7
        if i and v == 0:
            return None
        idx = v if i == 0 else prev + v
        if idx >= n:
            return None
        out.append(idx)
        prev = idx
    return out if pos == len(data) else None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 12), st.sampled_from([1, 200, 20_000, 2**32 - 1]))
def test_varint_decoder_matches_reference_on_any_bytes(data: bytes, count: int, n: int) -> None:
    ref = py_decode_varint(data, count, n)
    arr = np.frombuffer(data, np.uint8)
    if ref is None or count > len(data):
        with pytest.raises(ValueError):
            sparse.decode_indices(arr, "varint", count, n)
    else:
        assert sparse.decode_indices(arr, "varint", count, n).tolist() == ref


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 127, 128, 129, 16383, 16384, 16385, 2**21, 2**28]), max_size=60)
)
def test_varint_round_trip_gap_boundaries(gaps: list[int]) -> None:
    idx = np.cumsum(np.array([0, *gaps], np.int64))
    n = int(idx[-1]) + 1
    name, data = sparse.encode_indices(idx.astype(np.uint32), n, "varint")
    assert sparse.decode_indices(data, name, idx.size, n).tolist() == idx.tolist()
