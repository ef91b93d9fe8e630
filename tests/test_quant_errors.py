"""Bad input to edgefed.quant: a precise Python exception, never a crash."""

from __future__ import annotations

import re

import numpy as np
import pytest
from edgefed._core import quant as core

from edgefed import quant

X = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
S = np.float32(0.05)


def raises(exc: type[BaseException], msg: str):
    return pytest.raises(exc, match=re.escape(msg))


def test_wrong_dtypes_are_type_errors() -> None:
    with raises(TypeError, "grad must be float32, got float64"):
        quant.quantize(X.astype(np.float64), name="grad")
    with raises(TypeError, "dtype must be int8 or uint8, got int16"):
        quant.quantize(X, dtype=np.int16)
    with raises(TypeError, "q must be int8 or uint8, got int32"):
        quant.dequantize(np.zeros(3, np.int32), S)
    with raises(TypeError, "zero_point must be an integer array or int, got float32"):
        quant.quantize(X, S, np.float32(1))
    with raises(TypeError, "scale must be a float array or number, got int64"):
        quant.quantize(X, 1)
    with raises(TypeError, "out must be int8, got uint8"):
        quant.quantize(X, S, out=np.empty(X.shape, np.uint8))


def test_nonfinite_input_names_tensor_and_first_index() -> None:
    x = X.copy()
    x[1, 2], x[3, 0] = np.nan, np.inf
    assert issubclass(quant.NonFiniteError, ValueError)
    with raises(quant.NonFiniteError, "w contains nan at index (1, 2) (flat index 8)"):
        quant.quantize(x, S, name="w")
    x[1, 2] = 1.0
    with raises(quant.NonFiniteError, "x contains inf at index (3, 0) (flat index 18)"):
        quant.quantize(x, S)
    x[0, 1] = -np.inf
    msg = "x contains -inf at index (0, 1) (flat index 1); scales cannot be computed"
    for kw in ({}, {"axis": 0}, {"axis": 1}, {"block_size": 2}, {"axis": 0, "block_size": 2}):
        with raises(quant.NonFiniteError, msg):
            quant.quantize(x, **kw)
        with raises(quant.NonFiniteError, msg):
            quant.compute_scales(x, **kw)
    for isa in quant.available_isas():  # every kernel detects it, also in the tail
        y = np.ones(1000, np.float32)
        y[997] = np.nan
        with raises(quant.NonFiniteError, "x contains nan at index (997,) (flat index 997)"):
            quant.quantize(y, S, isa=isa)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_bad_scales(bad: float) -> None:
    with raises(ValueError, f"scale must be positive and finite, got {bad:g} at index 0"):
        quant.quantize(X, np.float32(bad))
    with raises(ValueError, "scale must be positive and finite, got"):
        quant.dequantize(np.zeros(4, np.int8), np.array([1, 1, bad, 1], np.float32), axis=0)


def test_bad_zero_points_and_shapes() -> None:
    with raises(ValueError, "zero_point must be in [-128, 127] for int8, got 300 at index 0"):
        quant.quantize(X, S, 300)
    with raises(ValueError, "zero_point must be in [0, 255] for uint8, got -1 at index 2"):
        quant.quantize(X, np.full(6, S), np.array([0, 1, -1, 0, 0, 0]), dtype=np.uint8, axis=1)
    with raises(ValueError, "zero_point was given without scale"):
        quant.quantize(X, zero_point=3)
    with raises(ValueError, "scale has shape (4,), expected (6,)"):
        quant.quantize(X, np.full(4, S), axis=1)
    with raises(ValueError, "scale has shape (4, 6), expected (4, 2)"):
        quant.quantize(X, np.full((4, 6), S), block_size=4)
    with raises(ValueError, "zero_point has shape (2,), expected ()"):
        quant.quantize(X, S, np.zeros(2, np.int8))
    with raises(ValueError, "axis 2 is out of range for a tensor with 2 dimensions"):
        quant.quantize(X, axis=2)
    with raises(ValueError, "block_size must be positive, got 0"):
        quant.quantize(X, block_size=0)
    with raises(ValueError, "block_size needs a tensor with at least one dimension"):
        quant.quantize(np.array(1.0, np.float32), block_size=4)
    with raises(ValueError, "out has shape (6, 4), expected (4, 6)"):
        quant.quantize(X, S, out=np.empty((6, 4), np.int8))
    with raises(ValueError, "symmetric quantization needs dtype int8"):
        quant.quantize(X, dtype=np.uint8)
    qt = quant.quantize(X)
    with raises(ValueError, "pass either a QuantizedTensor or q with scale, not both"):
        quant.dequantize(qt, S)
    with raises(ValueError, "dequantize needs a scale"):
        quant.dequantize(qt.q)


def test_empty_and_bad_options() -> None:
    with raises(ValueError, "x is empty"):
        quant.quantize(np.zeros((0, 3), np.float32))
    with raises(ValueError, "q is empty"):
        quant.dequantize(np.zeros(0, np.int8), S)
    with raises(ValueError, "threads must be None (all cores) or an int in [1, 1024], got 0"):
        quant.quantize(X, threads=0)
    with raises(ValueError, "rounding must be 'nearest' or 'stochastic', got 'up'"):
        quant.quantize(X, rounding="up")  # type: ignore[arg-type]
    with raises(ValueError, "seed must be an int in [0, 2**64), got -1"):
        quant.quantize(X, seed=-1)
    with raises(ValueError, "unknown isa 'mmx'"):
        quant.quantize(X, isa="mmx")  # type: ignore[arg-type]
    missing = next(i for i in ("avx512", "neon", "sse2") if i not in quant.available_isas())
    with raises(ValueError, "the requested isa is not supported by this CPU or build"):
        quant.quantize(X, isa=missing)  # type: ignore[arg-type]


def test_out_buffer_layout_is_rejected_not_copied() -> None:
    big = np.empty((4, 12), np.int8)
    with raises(ValueError, "out must be C-contiguous"):
        quant.quantize(X, S, out=big[:, ::2])
    ro = np.empty(X.shape, np.int8)
    ro.flags.writeable = False
    with raises(ValueError, "out is read-only"):
        quant.quantize(X, S, out=ro)
    with raises(ValueError, "out must be C-contiguous"):
        quant.dequantize(np.zeros((4, 6), np.int8), S, out=np.empty((6, 4), np.float32).T)


def test_size_limit_checked_before_touching_memory() -> None:
    huge = np.broadcast_to(np.float32(0), (2**31 + 1,))  # 4 bytes of real memory
    with raises(ValueError, "tensor has 2147483649 elements; at most 2^31"):
        quant.quantize(huge)
    with raises(ValueError, "tensor has 2147549184 elements; at most 2^31"):
        quant.dequantize(np.broadcast_to(np.int8(0), (2**16, 2**15 + 1)), S)
    core.check_size(2**31)  # the limit itself is fine
    # The core's own check, on an array that claims to be C-contiguous but is backed by 4 KB:
    # reading it would crash, so this passes only if the size is checked first.
    backing = np.zeros(1024, np.float32)
    fake = np.lib.stride_tricks.as_strided(backing, shape=(2**31 + 5,), strides=(4,))
    assert fake.flags.c_contiguous
    out = np.zeros(1, np.int8)
    with raises(ValueError, "tensor has 2147483653 elements; at most 2^31"):
        core.quantize(fake, out, np.ones(1, np.float32), np.zeros(1, np.float32), None, 0,
                      False, 0, 0, False, "x", "auto")  # fmt: skip
    with raises(ValueError, "tensor has 2147483653 elements; at most 2^31"):
        core.compute_scales(fake, np.ones(1, np.float32), np.zeros(1, np.float32), None, 0,
                            True, True, 0, "x", "auto")  # fmt: skip


def test_core_rejects_what_python_would_copy() -> None:
    raw = np.zeros(X.size + 1, np.float32).view(np.uint8)[1 : 1 + X.nbytes].view(np.float32)
    assert not raw.flags.aligned
    out = np.empty(raw.shape, np.int8)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    with raises(ValueError, "x is misaligned"):
        core.quantize(raw, out, one, zero, None, 0, False, 0, 0, False, "x", "auto")
    with raises(ValueError, "x must be C-contiguous"):
        core.quantize(X[:, ::2], np.empty((4, 3), np.int8), one, zero, None, 0, False, 0, 0,
                      False, "x", "auto")  # fmt: skip
    with raises(ValueError, "x must be float32, got float64"):
        core.quantize(X.astype(np.float64), np.empty(X.shape, np.int8), one, zero, None, 0,
                      False, 0, 0, False, "x", "auto")  # fmt: skip
    with raises(ValueError, "scale has 1 elements, the layout needs 6"):
        core.quantize(X, np.empty(X.shape, np.int8), one, zero, 1, 0, False, 0, 0, False, "x",
                      "auto")  # fmt: skip
    with raises(ValueError, "zero_point must be an integer in [-128, 127], got 0.5 at index 0"):
        core.quantize(X, np.empty(X.shape, np.int8), one, zero + 0.5, None, 0, False, 0, 0,
                      False, "x", "auto")  # fmt: skip
    with raises(ValueError, "threads must be in [0, 1024]"):
        core.dequantize(np.zeros(3, np.int8), np.empty(3, np.float32), one, zero, None, 0, -1,
                        "auto")  # fmt: skip
