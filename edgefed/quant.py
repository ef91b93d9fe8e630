"""int8 / uint8 quantization with ONNX QuantizeLinear / DequantizeLinear semantics.

``quantize`` computes ``Saturate(RoundHalfToEven(x / scale) + zero_point)`` (a true division,
bit-exact with onnxruntime) per tensor, per axis or per block; ``dequantize`` computes
``(q - zero_point) * scale``. The work runs in the C++ core (``edgefed._core.quant``): SIMD
chosen at run time (AVX-512 / AVX2 / SSE2 on x86_64, NEON on aarch64), split across threads
with the GIL released, identical bytes for every ISA and thread count.

Input policy (decided here, tested in tests/test_quant_errors.py):

* dtype: ``x`` must be float32 and ``q`` int8 / uint8 -- never silently cast (``TypeError``).
* layout: a non-contiguous or misaligned input is copied (it is read-only to us); an ``out``
  buffer must already be C-contiguous, aligned, writeable and of the right shape and dtype,
  since writing into a copy would lose the result (``ValueError``).
* threads: ``threads`` is an upper bound (default: all cores); each extra thread needs at
  least 256K elements, because a thread is started per call.
* NaN / Inf in ``x`` raise :class:`NonFiniteError` naming the tensor and the first bad index.
  ``allow_nonfinite=True`` (given scales only) saturates them the way onnxruntime does on x86:
  +Inf -> qmax, -Inf and NaN -> qmin. Scales are never computed from non-finite values.
* empty tensors, more than 2^31 elements, scale <= 0 or non-finite, zero points that are not
  integers in the dtype's range, and shape / axis / block-size mismatches raise ``ValueError``
  (the size check runs before anything is copied or allocated).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgefed import _core

_q = _core.quant

NonFiniteError: type[ValueError] = _q.NonFiniteError
MAX_ELEMENTS: int = int(_q.MAX_ELEMENTS)

Rounding = Literal["nearest", "stochastic"]
Isa = Literal["auto", "generic", "sse2", "avx2", "avx512", "neon"]

__all__ = [
    "MAX_ELEMENTS",
    "NonFiniteError",
    "QuantizedTensor",
    "available_isas",
    "best_isa",
    "compute_scales",
    "dequantize",
    "quantize",
]


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields
class QuantizedTensor:
    """A quantized tensor and what is needed to dequantize it.

    ``scale`` / ``zero_point`` have shape ``()`` per tensor, ``(len(axis),)`` per axis and the
    ONNX blocked shape (``x.shape`` with the axis dimension replaced by
    ``ceil(len / block_size)``) per block. Unpacks as ``q, scale, zero_point`` for convenience.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    block_size: int | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.q, self.scale, self.zero_point))

    def dequantize(self, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
        return dequantize(self, out=out, threads=threads)


def available_isas() -> list[str]:
    """Instruction sets usable on this CPU (each can be forced with ``isa=``)."""
    return list(_q.available_isas())


def best_isa() -> str:
    """The instruction set ``isa="auto"`` uses here."""
    return str(_q.best_isa())


# ---------------------------------------------------------------- argument normalisation
_I8, _U8, _F32 = np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32)


def _qdtype(dtype: npt.DTypeLike) -> np.dtype:
    if dtype is np.int8 or dtype is np.uint8:  # fast path: this runs on every call
        return np.dtype(dtype)
    try:
        d = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be int8 or uint8, got {dtype!r}") from e
    if d not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise TypeError(f"dtype must be int8 or uint8, got {d}")
    return d


def _input(x: npt.ArrayLike, name: str, kinds: tuple[np.dtype, ...]) -> np.ndarray:
    arr = np.asarray(x)  # no copy for an ndarray, whatever its strides
    if arr.size > MAX_ELEMENTS:  # checked before any copy or allocation
        _q.check_size(arr.size)
    if arr.dtype not in kinds:
        want = " or ".join(str(k) for k in kinds)
        raise TypeError(f"{name} must be {want}, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.require(arr, requirements=["C", "A"])  # an aligned C-contiguous copy


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise ValueError(
            f"threads must be None (all cores) or an int in [1, 1024], got {threads!r}"
        )
    return threads


def _granularity(
    ndim: int, axis: int | None, block_size: int | None
) -> tuple[int | None, int | None]:
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if ndim == 0:
            raise ValueError("block_size needs a tensor with at least one dimension")
        if axis is None:
            axis = -1
    if axis is None:
        return None, None
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return int(axis) % ndim, None if block_size is None else int(block_size)


def _scale_shape(shape: tuple[int, ...], axis: int | None, block: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    if block is None:
        return (shape[axis],)
    return (*shape[:axis], -(-shape[axis] // block), *shape[axis + 1 :])


def _scale(scale: npt.ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(scale)
    if s.dtype.kind != "f":
        raise TypeError(f"scale must be a float array or number, got {s.dtype}")
    if s.shape != shape and not (shape == () and s.size == 1):
        raise ValueError(f"scale has shape {s.shape}, expected {shape}")
    return np.ascontiguousarray(s, dtype=np.float32).reshape(shape)


def _zero_point(zp: npt.ArrayLike | None, shape: tuple[int, ...], qd: np.dtype) -> np.ndarray:
    if zp is None:
        return np.zeros(shape, qd)
    z = np.asarray(zp)
    if z.dtype.kind not in "iu":
        raise TypeError(f"zero_point must be an integer array or int, got {z.dtype}")
    if z.shape != shape and not (shape == () and z.size == 1):
        raise ValueError(f"zero_point has shape {z.shape}, expected {shape}")
    info = np.iinfo(qd)
    bad = np.flatnonzero((z < info.min) | (z > info.max))
    if bad.size:
        raise ValueError(
            f"zero_point must be in [{info.min}, {info.max}] for {qd}, got "
            f"{z.reshape(-1)[bad[0]]} at index {int(bad[0])}"
        )
    return z.astype(qd).reshape(shape)


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must be {dtype}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    return out  # contiguity / alignment / writeability are checked by the core


# ---------------------------------------------------------------- public API
def quantize(
    x: npt.ArrayLike,
    scale: npt.ArrayLike | None = None,
    zero_point: npt.ArrayLike | None = None,
    *,
    dtype: npt.DTypeLike = np.int8,
    symmetric: bool = True,
    axis: int | None = None,
    block_size: int | None = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    out: np.ndarray | None = None,
    threads: int | None = None,
    allow_nonfinite: bool = False,
    name: str = "x",
    isa: Isa = "auto",
) -> QuantizedTensor:
    """Quantize float32 ``x`` to int8 / uint8.

    Granularity: per tensor (default), per ``axis``, or per block of ``block_size`` elements
    along ``axis`` (default: the last axis; scales computed and applied in one pass).
    Without ``scale`` the scales are computed: ``symmetric`` (int8 only) uses absmax / 127
    and zero point 0; otherwise min / max with 0 included, as ONNX DynamicQuantizeLinear.
    ``rounding="stochastic"`` rounds up with probability frac(x / scale) (unbiased), driven
    by a counter-based hash of (``seed``, flat index): reproducible for any thread count.
    ``name`` labels ``x`` in error messages.
    """
    qd = _qdtype(dtype)
    xa = _input(x, name, (np.dtype(np.float32),))
    ax, block = _granularity(xa.ndim, axis, block_size)
    sshape = _scale_shape(xa.shape, ax, block)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    q = _out(out, xa.shape, qd)
    stochastic, nthreads = rounding == "stochastic", _threads(threads)
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale")
        if symmetric and qd != np.int8:
            raise ValueError("symmetric quantization needs dtype int8 (use symmetric=False)")
        s = np.empty(sshape, np.float32)
        zf = np.empty(sshape, np.float32)
        _q.quantize_dynamic(
            xa, q, s, zf, ax, block or 0, symmetric, stochastic, seed, nthreads, name, isa
        )
        z = zf.astype(qd)
    else:
        s = _scale(scale, sshape)
        z = _zero_point(zero_point, sshape, qd)
        _q.quantize(
            xa, q, s, z.astype(np.float32), ax, block or 0, stochastic, seed, nthreads,
            allow_nonfinite, name, isa,
        )  # fmt: skip
    return QuantizedTensor(q, s, z, ax, block)


def dequantize(
    q: np.ndarray | QuantizedTensor,
    scale: npt.ArrayLike | None = None,
    zero_point: npt.ArrayLike | None = None,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    out: np.ndarray | None = None,
    threads: int | None = None,
    isa: Isa = "auto",
) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 (ONNX DequantizeLinear), into ``out`` if given.

    ``q`` may be a :class:`QuantizedTensor` (then scale / zero point / granularity come from
    it) or an int8 / uint8 array with ``scale`` and optional ``zero_point`` (default 0).
    """
    if isinstance(q, QuantizedTensor):
        if scale is not None or zero_point is not None or axis is not None or block_size:
            raise ValueError("pass either a QuantizedTensor or q with scale, not both")
        q, scale, zero_point, axis, block_size = (
            q.q, q.scale, q.zero_point, q.axis, q.block_size
        )  # fmt: skip
    if scale is None:
        raise ValueError("dequantize needs a scale")
    qa = _input(q, "q", (np.dtype(np.int8), np.dtype(np.uint8)))
    ax, block = _granularity(qa.ndim, axis, block_size)
    sshape = _scale_shape(qa.shape, ax, block)
    s = _scale(scale, sshape)
    z = _zero_point(zero_point, sshape, qa.dtype)
    y = _out(out, qa.shape, np.dtype(np.float32))
    _q.dequantize(qa, y, s, z.astype(np.float32), ax, block or 0, _threads(threads), isa)
    return y


def compute_scales(
    x: npt.ArrayLike,
    *,
    dtype: npt.DTypeLike = np.int8,
    symmetric: bool = True,
    axis: int | None = None,
    block_size: int | None = None,
    threads: int | None = None,
    name: str = "x",
    isa: Isa = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points ``quantize`` would compute (same shapes, same bits)."""
    qd = _qdtype(dtype)
    xa = _input(x, name, (np.dtype(np.float32),))
    ax, block = _granularity(xa.ndim, axis, block_size)
    sshape = _scale_shape(xa.shape, ax, block)
    if symmetric and qd != np.int8:
        raise ValueError("symmetric quantization needs dtype int8 (use symmetric=False)")
    s = np.empty(sshape, np.float32)
    zf = np.empty(sshape, np.float32)
    _q.compute_scales(
        xa, s, zf, ax, block or 0, symmetric, qd == np.int8, _threads(threads), name, isa
    )
    return s, zf.astype(qd)
