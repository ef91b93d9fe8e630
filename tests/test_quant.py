"""edgefed.quant behaviour: scale rules, granularities, threads, stochastic rounding, buffers.

Bit-exactness with onnxruntime is in test_quant_onnx.py, bad input in test_quant_errors.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness.wait import wait_until

from edgefed import quant

RNG = np.random.default_rng(7)
ISAS = quant.available_isas()


def ref_params(mn: np.ndarray, mx: np.ndarray, symmetric: bool, qmin: int, qmax: int):
    """Independent numpy float32 version of the documented scale rules."""
    f = np.float32
    mn, mx = np.asarray(mn, f), np.asarray(mx, f)
    if symmetric:
        s = np.maximum(-mn, mx) / f(127)
        return np.where(s > 0, s, f(1)).astype(f), np.zeros_like(s)
    mn, mx = np.minimum(mn, f(0)), np.maximum(mx, f(0))
    s = ((mx - mn) / f(qmax - qmin)).astype(f)
    s = np.where(s > 0, s, f(1)).astype(f)
    z = np.rint(np.clip((f(qmin) - mn / s).astype(f), qmin, qmax))
    return s, z


def test_readme_example_runs_as_documented() -> None:
    """The README's quantization snippet is executed verbatim, so it cannot drift."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quantization API", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    ns: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), ns)
    q, scale, zp, y, x = (ns[k] for k in ("q", "scale", "zp", "y", "x"))
    assert q.dtype == np.int8 and y.dtype == np.float32 and scale.shape == ()
    assert scale == np.abs(x).max() / np.float32(127) and zp == 0
    assert np.abs(y - x).max() <= scale * 0.5001
    assert q.min() >= -127  # symmetric never uses -128


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_compute_scales_all_granularities_match_numpy(symmetric: bool, dtype: type) -> None:
    if symmetric and dtype == np.uint8:
        return  # rejected, see test_quant_errors
    info = np.iinfo(dtype)
    x = (RNG.standard_normal((5, 70, 9)) * 3 + 0.5).astype(np.float32)
    cases = [(None, None), (0, None), (1, None), (2, None), (2, 4), (1, 16), (0, 2)]
    for axis, block in cases:
        s, z = quant.compute_scales(x, dtype=dtype, symmetric=symmetric, axis=axis,
                                    block_size=block)  # fmt: skip
        if axis is None:
            mn, mx = x.min(), x.max()
        elif block is None:
            red = tuple(i for i in range(3) if i != axis)
            mn, mx = x.min(axis=red), x.max(axis=red)
        else:
            n = x.shape[axis]
            pad = -(-n // block) * block - n
            widths = [(0, 0)] * 3
            widths[axis] = (0, pad)
            xp = np.pad(x, widths, mode="edge")
            shp = (*x.shape[:axis], -(-n // block), block, *x.shape[axis + 1 :])
            mn, mx = xp.reshape(shp).min(axis=axis + 1), xp.reshape(shp).max(axis=axis + 1)
        rs, rz = ref_params(mn, mx, symmetric, info.min, info.max)
        assert s.dtype == np.float32 and z.dtype == dtype
        np.testing.assert_array_equal(s, rs, err_msg=f"axis={axis} block={block}")
        np.testing.assert_array_equal(z, rz.astype(dtype), err_msg=f"axis={axis} block={block}")
        # the fused / two-pass quantize uses exactly these scales
        qt = quant.quantize(x, dtype=dtype, symmetric=symmetric, axis=axis, block_size=block)
        np.testing.assert_array_equal(qt.scale, s)
        again = quant.quantize(x, s, z, dtype=dtype, axis=axis, block_size=block)
        np.testing.assert_array_equal(qt.q, again.q)
        y = quant.dequantize(qt)
        step = np.broadcast_to(  # per-element scale for the error bound
            s if axis is None else (np.expand_dims(s, tuple(i for i in range(3) if i != axis))
                                    if block is None else np.repeat(s, block, axis=axis)
                                    .take(range(x.shape[axis]), axis=axis)),
            x.shape,
        )  # fmt: skip
        assert np.all(np.abs(y - x) <= step * 0.5001)


def test_zero_tensor_gets_scale_one() -> None:
    x = np.zeros((4, 8), np.float32)
    qt = quant.quantize(x, block_size=4)
    assert np.all(qt.scale == 1) and np.all(qt.q == 0)
    s, z = quant.compute_scales(x, dtype=np.uint8, symmetric=False)
    assert s == 1 and z == 0


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"axis": 0},
        {"axis": 1},
        {"block_size": 256},
        {"axis": 0, "block_size": 64},
        {"dtype": np.uint8, "symmetric": False, "block_size": 100},
        {"rounding": "stochastic", "seed": 5},
        {"rounding": "stochastic", "seed": 5, "axis": 1, "block_size": 32},
    ],
)
def test_results_identical_for_every_thread_count_and_isa(kw: dict) -> None:
    x = RNG.standard_normal((1024, 1800)).astype(np.float32)  # 7 threads x 256K elements
    ref = quant.quantize(x, threads=1, isa="generic", **kw)
    for isa in ISAS:
        for threads in (1, 2, 3, 7):
            qt = quant.quantize(x, threads=threads, isa=isa, **kw)
            assert qt.q.tobytes() == ref.q.tobytes(), (isa, threads)
            assert qt.scale.tobytes() == ref.scale.tobytes(), (isa, threads)
            y = quant.dequantize(qt, threads=threads)
            np.testing.assert_array_equal(y, quant.dequantize(ref, threads=1))


def test_gil_is_released_while_kernels_run() -> None:
    x = RNG.standard_normal(16_000_000).astype(np.float32)
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    wait_until(lambda: ticks > 0, 5, "the spinner thread running")
    before = ticks
    t0 = time.perf_counter()
    quant.quantize(x, np.float32(0.01), isa="generic", threads=1)
    elapsed = time.perf_counter() - t0
    during = ticks - before
    stop.set()
    t.join()
    assert elapsed > 0.02  # long enough for the spinner to be scheduled many times
    assert during > 1000, f"python thread advanced only {during} ticks in {elapsed:.3f}s"


def test_out_buffers_are_used_without_allocation() -> None:
    x = RNG.standard_normal((64, 33)).astype(np.float32)
    q = np.empty(x.shape, np.int8)
    qt = quant.quantize(x, np.float32(0.02), out=q)
    assert qt.q is q
    y = np.empty_like(x)
    assert quant.dequantize(qt, out=y) is y
    np.testing.assert_array_equal(y, quant.dequantize(qt))
    assert qt.dequantize().dtype == np.float32


def test_stochastic_rounding_reproducible_and_floor_or_ceil() -> None:
    x = RNG.standard_normal(300_001).astype(np.float32)
    s = np.float32(0.013)
    a = quant.quantize(x, s, rounding="stochastic", seed=42).q
    b = quant.quantize(x, s, rounding="stochastic", seed=42, threads=1).q
    c = quant.quantize(x, s, rounding="stochastic", seed=43).q
    assert a.tobytes() == b.tobytes()
    assert (a != c).mean() > 0.2  # another seed, other draws
    v = np.clip(x / s, -128, 127)
    assert np.all((a == np.floor(v)) | (a == np.ceil(v)))


def test_stochastic_rounding_is_unbiased() -> None:
    s = np.float32(0.5)
    n = 400_000
    for frac in (0.3, 0.5, 0.9):
        x = np.full(n, (3 + frac) * s, np.float32)
        q = quant.quantize(x, s, rounding="stochastic", seed=1).q.astype(np.float64)
        # nearest rounding would give exactly 3 or 4 (bias >= 0.1); std of the mean ~ 0.0008
        assert abs(q.mean() - (3 + frac)) < 0.005, (frac, q.mean())
    x = (RNG.standard_normal(n) * 10).astype(np.float32)
    q = quant.quantize(x, s, rounding="stochastic", seed=9).q.astype(np.float64)
    assert abs((q * 0.5 - x).mean()) < 0.002
    u = np.array([quant._q.stochastic_uniform(3, i) for i in range(20_000)])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_noncontiguous_and_misaligned_inputs_are_copied() -> None:
    x = RNG.standard_normal((40, 64)).astype(np.float32)
    view = x[:, ::2]
    np.testing.assert_array_equal(
        quant.quantize(view, np.float32(0.01)).q,
        quant.quantize(np.ascontiguousarray(view), np.float32(0.01)).q,
    )
    raw = bytearray(x.nbytes + 1)
    mis = np.frombuffer(raw, np.float32, count=x.size, offset=1)
    assert not mis.flags.aligned
    mis_src = np.frombuffer(memoryview(raw)[1:], np.float32)  # same memory
    np.testing.assert_array_equal(mis_src, mis)
    raw[1:] = x.tobytes()
    np.testing.assert_array_equal(
        quant.quantize(mis, np.float32(0.01)).q, quant.quantize(x.ravel(), np.float32(0.01)).q
    )


def test_zero_dim_and_uint8_asymmetric() -> None:
    qt = quant.quantize(np.array(1.5, np.float32), np.float32(0.5))
    assert qt.q.shape == () and qt.q == 3
    x = RNG.uniform(-1, 3, 10_000).astype(np.float32)
    qt = quant.quantize(x, dtype=np.uint8, symmetric=False)
    assert qt.q.dtype == np.uint8 and qt.zero_point.dtype == np.uint8
    assert qt.q.min() == 0 and qt.q.max() == 255
    assert np.abs(quant.dequantize(qt) - x).max() <= qt.scale / 2 * 1.0001


@pytest.mark.parametrize("isa", ISAS)
def test_streaming_store_path_with_unaligned_outputs(isa: str) -> None:
    """Outputs >= 2 MB per call use non-temporal stores after an alignment head loop."""
    n = 2_200_003
    x = RNG.standard_normal(n).astype(np.float32)
    s = np.float32(0.02)
    ref = np.clip(np.rint(x / s), -128, 127).astype(np.int8)
    for off in (0, 3):
        q = np.empty(n + 8, np.int8)[off : off + n]
        quant.quantize(x, s, out=q, threads=1, isa=isa)
        np.testing.assert_array_equal(q, ref)
        y = np.empty(n + 2, np.float32)[off % 2 : off % 2 + n]
        quant.dequantize(q, s, out=y, threads=1, isa=isa)
        np.testing.assert_array_equal(y, ref.astype(np.float32) * s)


def test_quantize_bench_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from edgefed.apps.cli import main

    assert main(["quantize-bench", "--size", "100000", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "100,000 float32" in out
    for row in ("scale given", "incl. scale", "blockwise(256)", "dequantize"):
        line = next(ln for ln in out.splitlines() if row in ln)
        assert float(line.split()[-4]) > 0  # GB/s
