"""Bit-exactness against onnxruntime running real QuantizeLinear / DequantizeLinear nodes.

Every ISA this CPU offers is forced in turn (``isa=``), so the generic, SSE2, AVX2 (and
AVX-512 where present) kernels are each compared with onnxruntime, ties and all tail
lengths included.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgefed import quant

ISAS = quant.available_isas()
RNG = np.random.default_rng(1234)


@cache
def _session(op: str, in_dt: str, zp_dt: str, ndim: int, s_ndim: int, axis: int | None,
             block: int | None, opset: int = 21) -> ort.InferenceSession:  # fmt: skip
    """One session per graph signature; symbolic dims let it serve every shape."""
    t = helper.np_dtype_to_tensor_dtype
    x_dims = [f"d{i}" for i in range(ndim)]
    s_dims = [f"s{i}" for i in range(s_ndim)]
    out_dt = t(np.dtype(zp_dt)) if op == "QuantizeLinear" else TensorProto.FLOAT
    attrs = {k: v for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "s", "z"], ["y"], **attrs)],
        "g",
        [
            helper.make_tensor_value_info("x", t(np.dtype(in_dt)), x_dims),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, s_dims),
            helper.make_tensor_value_info("z", t(np.dtype(zp_dt)), s_dims),
        ],
        [helper.make_tensor_value_info("y", out_dt, x_dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_q(x, s, z, axis=None, block=None) -> np.ndarray:
    sess = _session("QuantizeLinear", "float32", str(z.dtype), x.ndim, s.ndim, axis, block)
    return sess.run(None, {"x": x, "s": s, "z": z})[0]


def ort_dq(q, s, z, axis=None, block=None) -> np.ndarray:
    sess = _session("DequantizeLinear", str(q.dtype), str(z.dtype), q.ndim, s.ndim, axis, block)
    return sess.run(None, {"x": q, "s": s, "z": z})[0]


def tricky(n: int, scale: float) -> np.ndarray:
    """Normal values, exact ties (k + 0.5) * scale, saturating values, zeros, denormals."""
    x = (RNG.standard_normal(n) * 60 * scale).astype(np.float32)
    k = RNG.integers(-140, 140, n)
    ties = ((k + 0.5) * scale).astype(np.float32)
    x = np.where(RNG.random(n) < 0.4, ties, x)
    x[RNG.random(n) < 0.05] = 1e30
    x[RNG.random(n) < 0.05] = -1e30
    x[RNG.random(n) < 0.05] = 0.0
    x[RNG.random(n) < 0.02] = 1e-42
    return x.astype(np.float32)


ZP_CASES = [("int8", 0), ("int8", -7), ("uint8", 131), ("uint8", 0)]


def test_isa_list_matches_cpu_flags() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    if "sse2" in flags:  # x86_64
        assert ISAS[:2] == ["generic", "sse2"]
        assert ("avx2" in ISAS) == ({"avx2", "fma"} <= flags)
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        assert ("avx512" in ISAS) == avx512
    else:
        assert "neon" in ISAS
    assert quant.best_isa() == ISAS[-1]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("dt", "zp"), ZP_CASES)
@pytest.mark.parametrize("scale", [0.25, 0.1, 3e-3])
def test_per_tensor_quantize_matches_ort(isa: str, dt: str, zp: int, scale: float) -> None:
    x = tricky(100_003, scale)
    s, z = np.array(scale, np.float32), np.array(zp, dt)
    ours = quant.quantize(x, s, z, dtype=dt, isa=isa, threads=2).q
    np.testing.assert_array_equal(ours, ort_q(x, s, z))


@pytest.mark.parametrize("isa", ISAS)
def test_every_tail_length_and_offset_matches_ort(isa: str) -> None:
    base = tricky(200, 0.125)
    s, z8, zu = np.array(0.125, np.float32), np.array(-3, np.int8), np.array(200, np.uint8)
    for n in range(1, 131):
        for off in (0, 1, 3):  # 4-byte aligned but not vector aligned
            x = base[off : off + n]
            np.testing.assert_array_equal(
                quant.quantize(x, s, z8, isa=isa).q, ort_q(x, s, z8), err_msg=f"n={n}"
            )
            q = quant.quantize(x, s, zu, dtype=np.uint8, isa=isa).q
            np.testing.assert_array_equal(q, ort_q(x, s, zu), err_msg=f"n={n}")
            np.testing.assert_array_equal(
                quant.dequantize(q, s, zu, isa=isa), ort_dq(q, s, zu), err_msg=f"n={n}"
            )


@pytest.mark.parametrize("isa", ISAS)
def test_per_axis_tails_match_ort(isa: str) -> None:
    for n in range(1, 131):  # last axis: one scale per element (vector path)
        x = tricky(3 * n, 0.05).reshape(3, n)
        s = RNG.uniform(0.01, 0.1, n).astype(np.float32)
        z = RNG.integers(0, 256, n).astype(np.uint8)
        q = quant.quantize(x, s, z, dtype=np.uint8, axis=1, isa=isa).q
        np.testing.assert_array_equal(q, ort_q(x, s, z, axis=1), err_msg=f"n={n}")
        np.testing.assert_array_equal(
            quant.dequantize(q, s, z, axis=1, isa=isa), ort_dq(q, s, z, axis=1)
        )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("dt", "zp"), ZP_CASES[:3])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_axis_matches_ort(isa: str, dt: str, zp: int, axis: int) -> None:
    x = tricky(7 * 9 * 67, 0.02).reshape(7, 9, 67)
    n = x.shape[axis]
    s = RNG.uniform(0.005, 0.05, n).astype(np.float32)
    info = np.iinfo(dt)
    z = np.clip(zp + RNG.integers(-5, 6, n), info.min, info.max).astype(dt)
    q = quant.quantize(x, s, z, dtype=dt, axis=axis, isa=isa).q
    np.testing.assert_array_equal(q, ort_q(x, s, z, axis=axis % 3))
    np.testing.assert_array_equal(
        quant.dequantize(q, s, z, axis=axis, isa=isa), ort_dq(q, s, z, axis=axis % 3)
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("shape", "axis", "block"),
    [
        ((6, 300), 1, 256),
        ((6, 300), 1, 7),
        ((5, 129), 1, 32),
        ((70, 5, 3), 0, 16),
        ((4, 33, 9), 1, 8),
    ],
)
def test_blocked_matches_ort(isa: str, shape: tuple[int, ...], axis: int, block: int) -> None:
    x = tricky(int(np.prod(shape)), 0.03).reshape(shape)
    qt = quant.quantize(x, dtype=np.int8, axis=axis, block_size=block, isa=isa, threads=2)
    assert qt.scale.shape == (*shape[:axis], -(-shape[axis] // block), *shape[axis + 1 :])
    np.testing.assert_array_equal(qt.q, ort_q(x, qt.scale, qt.zero_point, axis, block))
    np.testing.assert_array_equal(
        quant.dequantize(qt, isa=isa), ort_dq(qt.q, qt.scale, qt.zero_point, axis, block)
    )
    # asymmetric uint8 with computed zero points, through the fused path
    qa = quant.quantize(x, dtype=np.uint8, symmetric=False, axis=axis, block_size=block, isa=isa)
    np.testing.assert_array_equal(qa.q, ort_q(x, qa.scale, qa.zero_point, axis, block))


@pytest.mark.parametrize("isa", ISAS)
def test_dynamic_scale_matches_ort_dynamicquantizelinear(isa: str) -> None:
    t = TensorProto
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
        "g",
        [helper.make_tensor_value_info("x", t.FLOAT, ["n"])],
        [
            helper.make_tensor_value_info("y", t.UINT8, ["n"]),
            helper.make_tensor_value_info("s", t.FLOAT, []),
            helper.make_tensor_value_info("z", t.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (
        RNG.standard_normal(10_001).astype(np.float32),
        RNG.uniform(0.5, 3.0, 999).astype(np.float32),  # all positive: range extended to 0
        -RNG.uniform(0.5, 3.0, 999).astype(np.float32),  # all negative
        (RNG.standard_normal(5000) * 1e-3 + 0.01).astype(np.float32),
    ):
        y, s, z = sess.run(None, {"x": x})
        qt = quant.quantize(x, dtype=np.uint8, symmetric=False, isa=isa)
        assert qt.scale.tobytes() == s.tobytes() and qt.zero_point == z
        np.testing.assert_array_equal(qt.q, y)


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_saturates_like_ort_when_allowed(isa: str) -> None:
    x = tricky(1000, 0.1)
    x[::7], x[3::11], x[5::13] = np.nan, np.inf, -np.inf
    for z in (np.array(0, np.int8), np.array(17, np.uint8)):
        s = np.array(0.1, np.float32)
        q = quant.quantize(x, s, z, dtype=z.dtype, allow_nonfinite=True, isa=isa).q
        np.testing.assert_array_equal(q, ort_q(x, s, z))
