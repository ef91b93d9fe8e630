"""Aggregate 100 updates of a 10M-parameter model compressed ``topk:0.01+int8``:
edgefed's Accumulator (adds straight from the compressed form, C++, threaded, GIL
released) vs a numpy reference (decode each update to dense, then a weighted sum).
Targets: >= 10x faster, and peak extra memory <= 3x one dense float32 model copy.

Method (each side runs in its own fresh subprocess, same inputs):
1. the worker imports everything, reads all 100 payloads into memory and decodes one
   (warm-up: code paths and allocator pools touched);
2. it resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` sets
   VmHWM to the current RSS) and records VmRSS as its baseline (interpreter + libraries
   + encoded inputs);
3. it aggregates (decode_update + add for every payload, then the weighted average) and
   reads VmHWM: peak extra = VmHWM - baseline. Both sides parse with decode_update, so
   the difference is the aggregation itself.
The parent compares both averages (max abs difference) and writes the JSON.

Run: PYTHONPATH=. python benchmarks/aggregate.py [--updates 100] [--params 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table, write_json

from edgefed.codec import (
    Accumulator,
    ModelSchema,
    UpdateMeta,
    decode_update,
    encode_update,
)

SPEC = "topk:0.01+int8"


def schema_for(params: int) -> ModelSchema:
    big = params * 4 // 5
    rows = 2000
    rest = params - big
    return ModelSchema(
        {"l1.weight": (rows, big // rows), "l2.weight": (rest // 1000, 1000), "l2.bias": (500,)}
    )


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(side: str, folder: Path) -> None:
    schema = ModelSchema(
        {k: tuple(v) for k, v in json.loads((folder / "schema.json").read_text()).items()}
    )
    files = sorted(folder.glob("u*.bin"))
    payloads = [f.read_bytes() for f in files]
    decode_update(payloads[0], schema)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")
    base_kb = status_kb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    if side == "edgefed":
        acc = Accumulator(schema)
        for p in payloads:
            u = decode_update(p, schema)
            acc.add(u, float(u.meta.num_samples))
        avg = acc.average()
    else:
        sums = {k: np.zeros(s, np.float32) for k, s in schema.items()}
        total = 0.0
        for p in payloads:
            u = decode_update(p, schema)
            w = float(u.meta.num_samples)
            for name, dense in u.to_dense().items():
                np.multiply(dense, np.float32(w), out=dense)
                sums[name] += dense
            total += w
        avg = {k: v / np.float32(total) for k, v in sums.items()}
    ms = (time.perf_counter() - t) * 1e3
    cpu_ms = (time.process_time() - c) * 1e3  # all threads: a load-robust second view
    peak_kb = status_kb("VmHWM")
    np.save(folder / f"avg_{side}.npy", avg["l1.weight"])
    print(json.dumps({"ms": ms, "cpu_ms": cpu_ms, "base_kb": base_kb, "peak_kb": peak_kb}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--worker", choices=["edgefed", "numpy"])
    ap.add_argument("--dir", type=Path)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.dir)
        return
    schema = schema_for(a.params)
    n = schema.total_elements
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "schema.json").write_text(json.dumps({k: list(v) for k, v in schema.items()}))
        rng = np.random.default_rng(0)
        base = {k: rng.standard_normal(s).astype(np.float32) for k, s in schema.items()}
        wire = 0
        for i in range(a.updates):
            # cheap distinct updates: rolled and rescaled copies of one random draw
            upd = {k: np.roll(v, 7919 * i).reshape(v.shape) * (1 + i % 7) for k, v in base.items()}
            meta = UpdateMeta(round=1, device_id=f"dev-{i}", num_samples=10 + i, model_version="v1")
            p = encode_update(upd, meta, SPEC)
            wire += len(p)
            (folder / f"u{i:04d}.bin").write_bytes(p)
        del base, upd
        res = {}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for side in ("numpy", "edgefed"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", side, "--dir", str(folder)],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        diff = float(
            np.max(np.abs(np.load(folder / "avg_edgefed.npy") - np.load(folder / "avg_numpy.npy")))
        )
    dense_mb = 4 * n / 2**20
    rows = []
    for side, r in res.items():
        extra_mb = (r["peak_kb"] - r["base_kb"]) / 1024
        r["extra_mb"], r["extra_vs_dense_copy"] = extra_mb, extra_mb / dense_mb
        rows.append([side, f"{r['ms']:.0f}", f"{r['cpu_ms']:.0f}", f"{r['base_kb'] / 1024:.0f}",
                     f"{extra_mb:.0f}", f"{extra_mb / dense_mb:.2f}x"])  # fmt: skip
    speedup = res["numpy"]["ms"] / res["edgefed"]["ms"]
    cpu_speedup = res["numpy"]["cpu_ms"] / res["edgefed"]["cpu_ms"]
    print(
        f"aggregate {a.updates} updates of {n:,} params, {SPEC}, "
        f"{wire / a.updates / 1e3:.0f} kB each -- {machine()}"
    )
    heads = ["side", "wall ms", "cpu ms", "baseline RSS MB", "peak extra MB", "extra / dense copy"]
    print(table(heads, rows))
    print(f"speedup {speedup:.1f}x wall, {cpu_speedup:.1f}x cpu (target >= 10x); "
          f"edgefed peak extra "
          f"{res['edgefed']['extra_vs_dense_copy']:.2f}x a dense copy of {dense_mb:.0f} MB "
          f"(target <= 3x); max |avg difference| {diff:.2e}")  # fmt: skip
    path = write_json(
        "aggregate",
        {"machine": machine(), "updates": a.updates, "params": n, "spec": SPEC,
         "bytes_per_update": wire / a.updates, "results": res, "speedup": speedup,
         "cpu_speedup": cpu_speedup,
         "dense_copy_mb": dense_mb, "max_abs_diff": diff},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
