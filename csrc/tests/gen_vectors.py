"""Regenerate quant_vectors.txt: inputs and the outputs onnxruntime's QuantizeLinear /
DequantizeLinear give for them (the x86 reference the NEON path is checked against).

Floats are written as hex bit patterns so the file is exact and portable. Run from the repo
root: ``python csrc/tests/gen_vectors.py`` (tests/test_aarch64_neon.py checks it is current).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HERE = Path(__file__).parent


def _run(op: str, x: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    t = helper.np_dtype_to_tensor_dtype
    out = t(z.dtype) if op == "QuantizeLinear" else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "s", "z"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", t(x.dtype), list(x.shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", t(z.dtype), []),
        ],
        [helper.make_tensor_value_info("y", out, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "s": s, "z": z})[0]


def _hex(a: np.ndarray) -> str:
    return " ".join(f"{v:08x}" for v in a.view(np.uint32))


def generate() -> str:
    rng = np.random.default_rng(2026)
    lines = [
        "# edgefed quantize reference vectors (csrc/tests/gen_vectors.py, onnxruntime "
        f"{ort.__version__}); floats as IEEE-754 hex bits",
    ]
    n = 157
    for dt, zp in (("s8", 0), ("s8", -7), ("u8", 131)):
        for scale in (0.25, 0.1, 3e-3):
            s = np.float32(scale)
            k = rng.integers(-150, 150, n)
            x = np.where(rng.random(n) < 0.5, (k + 0.5) * s, rng.standard_normal(n) * 50 * s)
            x = x.astype(np.float32)
            x[[3, 40, 77]] = [np.nan, np.inf, -np.inf]
            x[[5, 6, 7, 8]] = [1e30, -1e30, -0.0, 1e-42]
            z = np.array(zp, np.int8 if dt == "s8" else np.uint8)
            q = _run("QuantizeLinear", x, np.array(s), z)
            lines += [f"Q {dt} {_hex(np.array([s]))} {zp} {n}", _hex(x)]
            lines.append(" ".join(str(int(v)) for v in q))
    for dt, zp, scale in (("s8", 0, 0.1), ("s8", 5, 3e-3), ("u8", 128, 0.1), ("u8", 3, 7.5)):
        q = np.arange(256, dtype=np.uint8)
        q = q.view(np.int8) if dt == "s8" else q
        z = np.array(zp, q.dtype)
        y = _run("DequantizeLinear", q, np.array(np.float32(scale)), z)
        lines += [f"D {dt} {_hex(np.array([np.float32(scale)]))} {zp} 256"]
        lines += [" ".join(str(int(v)) for v in q), _hex(y)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (HERE / "quant_vectors.txt").write_text(generate())
    sys.exit(0)
