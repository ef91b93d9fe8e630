"""Compression table: 1M and 10M parameter updates at density 100%, 10%, 1%, 0.1%.

Columns: bytes on the wire (whole payload, wire format v2 = compact default: header,
indices, values, scales, crc32), the same payload in v1 (safetensors), ratio vs raw
float32, relative L2 error of one update (top-k error includes the dropped entries;
with error feedback those are sent in later rounds), encode ms (encode_update: selection,
quantisation, index coding, framing, checksum), decode ms (decode_update: every check,
index decoding, zero-copy views) and decode+dense ms (plus to_dense()). Best of 3.

A second table shows where the format matters: a digits-sized MLP update (64-128-10,
9,610 parameters in 4 tensors), bytes per message in v1 and v2 and the reduction vs a
float32 update in the *same* format.

Run: PYTHONPATH=. python benchmarks/compression.py [--sizes 1000000 10000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table, write_json

from edgefed.codec import ModelSchema, UpdateMeta, decode_update, encode_update

META = UpdateMeta(round=1, device_id="bench", num_samples=100, model_version="v1")
CONFIGS = [
    (1.0, "none"),
    (1.0, "fp16"),
    (1.0, "int8"),
    (1.0, "int8:block=256"),
    (1.0, "int4:block=32"),
    (0.1, "topk:0.1"),
    (0.1, "topk:0.1+int8"),
    (0.01, "topk:0.01"),
    (0.01, "topk:0.01+int8"),
    (0.001, "topk:0.001"),
    (0.001, "topk:0.001+int8"),
]


def best_ms(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    a = ap.parse_args()
    rows, records = [], []
    for n in a.sizes:
        rng = np.random.default_rng(n)
        # heavy-tailed like real deltas: Gaussian times a log-normal per-element scale
        x = (rng.standard_normal(n) * np.exp(0.7 * rng.standard_normal(n))).astype(np.float32)
        shape = (n // 1000, 1000)
        tensors = {"layer.weight": x.reshape(shape)}
        schema = ModelSchema({"layer.weight": shape})
        for density, spec in CONFIGS:
            enc_ms, payload = best_ms(lambda s=spec, t=tensors: encode_update(t, META, s))
            dec_ms, _ = best_ms(lambda p=payload, sc=schema: decode_update(p, sc))
            dd_ms, dense = best_ms(lambda p=payload, sc=schema: decode_update(p, sc).to_dense())
            y = dense["layer.weight"].reshape(-1)
            err = float(np.linalg.norm(y - x) / np.linalg.norm(x))
            ratio = 4 * n / len(payload)
            v1 = len(encode_update(tensors, META, spec, version=1))
            rows.append(
                [f"{n:,}", f"{density:.1%}", spec, f"{len(payload):,}", f"{v1:,}", f"{ratio:.1f}x",
                 f"{err:.4f}", f"{enc_ms:.1f}", f"{dec_ms:.1f}", f"{dd_ms:.1f}"]
            )  # fmt: skip
            records.append(
                {"n": n, "density": density, "spec": spec, "bytes": len(payload), "bytes_v1": v1,
                 "ratio_vs_f32": ratio, "rel_l2": err, "encode_ms": enc_ms,
                 "decode_ms": dec_ms, "decode_dense_ms": dd_ms}
            )  # fmt: skip
    print(f"update compression -- {machine()}")
    print(
        table(
            ["params", "density", "spec", "bytes on wire", "v1 bytes", "vs f32", "rel L2 err",
             "encode ms", "decode ms", "decode+dense ms"],
            rows,
        )
    )  # fmt: skip
    small = small_model_table()
    out = {"machine": machine(), "rows": records, "small_model": small}
    print(f"wrote {write_json('compression', out)}")


def small_model_table() -> list[dict]:
    """Digits MLP-sized update: per-message bytes of both wire versions (seeded deltas)."""
    rng = np.random.default_rng(0)
    shapes = {"0.weight": (128, 64), "0.bias": (128,), "2.weight": (10, 128), "2.bias": (10,)}
    upd = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    meta = UpdateMeta(round=37, device_id="device-07", num_samples=70, model_version="r37")
    rows, recs = [], []
    f32 = {v: len(encode_update(upd, meta, "none", version=v)) for v in (1, 2)}
    for spec in ["none", "int8", "topk:0.1+int8", "topk:0.01+int8"]:
        b = {v: len(encode_update(upd, meta, spec, version=v)) for v in (1, 2)}
        rows.append(
            [spec, f"{b[1]:,}", f"{f32[1] / b[1]:.1f}x", f"{b[2]:,}", f"{f32[2] / b[2]:.1f}x"]
        )
        recs.append({"spec": spec, "bytes_v1": b[1], "bytes_v2": b[2],
                     "reduction_v1": f32[1] / b[1], "reduction_v2": f32[2] / b[2]})  # fmt: skip
    print("\ndigits MLP update (9,610 params, 4 tensors), bytes per message")
    print(table(["spec", "v1 bytes", "v1 vs f32", "v2 bytes", "v2 vs f32"], rows))
    return recs


if __name__ == "__main__":
    main()
