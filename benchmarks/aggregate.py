"""The coordinator's own intake + aggregation path against the dense path it replaced.

Two workloads (issue 12 "done when"):
- A: 100 updates of a 10M-parameter model compressed ``topk:0.01+int8``;
  targets: >= 10x faster than numpy decode + dense sum, peak extra memory <= 3x one dense
  float32 model;
- B: 100 updates of a 1M-parameter model compressed ``int8``; target: >= 3x the throughput
  of the old ``RoundEngine.handle_update``.

Sides (same message bytes: update header + codec payload, as devices send them):
- ``coordinator``: the real thing, ``RoundEngine.handle_update`` for every message (the
  shared intake, ``coordinator/intake.py``, then ``StreamingAggregator.add``: the C++
  Accumulator straight from the compressed form) and ``finish_round`` (mean + FedAvg step);
- ``old engine``: a faithful copy of main's path before issue 12 (``handle_update`` decoded
  every update to dense float32 with ``to_dense()``, ran ``validate_update`` over it, and
  accumulated ``w * delta`` into float64 sums with a temporary per tensor; ``finish_round``
  then ``apply_sums``). Kept here as the named baseline, so both run in one session;
- ``numpy``: decode each update, expand to dense, weighted float32 sum, divide (the
  reference of the first version of this benchmark).

Method: every side runs in its own fresh subprocess, repeated and interleaved (A, B, C, A,
B, C, ...) because the machine is shared and noisy. A worker builds its state (engine,
opened round), reads every message into memory, warms up one decode, resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records VmRSS, runs the timed path
and reads VmHWM: peak extra = VmHWM - baseline. The parent checks the sides' models agree.

Run: PYTHONPATH=. python benchmarks/aggregate.py [--repeat 3] [--updates 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table, write_json

from edgefed.codec import ModelSchema, UpdateMeta, decode_update, encode_update
from edgefed.protocol import UpdateHeader, pack

WORKLOADS = {
    "A": {"params": 10_000_000, "spec": "topk:0.01+int8"},
    "B": {"params": 1_000_000, "spec": "int8"},
}
SIDES = ("numpy", "old engine", "coordinator")


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


def _engine(schema: ModelSchema, spec: str, devices: list[str]):
    """A RoundEngine over a model with this schema (graph bytes are never read here)."""
    from edgefed.coordinator.model import FederatedModel, GraphBundle
    from edgefed.coordinator.rounds import RoundConfig, RoundEngine
    from edgefed.strategies import FedAvg

    init = {k: np.zeros(s, np.float32) for k, s in schema.items()}
    g = GraphBundle("full", b"bench", {"trainable": list(schema)}, b"")
    eng = RoundEngine(FederatedModel(init, {"full": g}), FedAvg(), RoundConfig(uplink=spec))
    eng.start_round(devices)
    return eng


class OldEngine:
    """main's RoundEngine.handle_update + streaming close before issue 12 (the baseline)."""

    def __init__(self, schema: ModelSchema, devices: list[str]) -> None:
        from edgefed.strategies import FedAvg
        from edgefed.transport.dedupe import SeenSet

        self.schema = schema
        self.params = {k: np.zeros(s, np.float32) for k, s in schema.items()}
        self.strategy = FedAvg()
        self.open, self.sampled = 1, set(devices)
        self.seen = SeenSet(1_000_000)
        self.accepted: dict[str, object] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.wsum: dict[str, np.ndarray] = {}

    def handle_update(self, topic_device: str, data: bytes) -> bool:
        import math

        from edgefed.protocol import require, unpack
        from edgefed.strategies import ClientUpdate, validate_update

        header, parts = unpack(data)
        rnd = require(header, "round", int)
        dev = require(header, "device_id", str)
        update_id = require(header, "update_id", str)
        num = require(header, "num_samples", int)
        if dev != topic_device or rnd != self.open or dev not in self.sampled:
            return False
        key = (dev, rnd, update_id)
        if key in self.seen or dev in self.accepted or "update" not in parts:
            return False
        upd = decode_update(parts["update"], self.schema)
        m = upd.meta
        if (m.round, m.device_id, m.num_samples, m.kind) != (rnd, dev, num, "delta"):
            return False
        dense = upd.to_dense()
        if set(dense) - set(self.schema):
            return False
        loss = header.get("loss")
        cu = ClientUpdate(
            dev,
            {k: np.asarray(v, np.float32) for k, v in dense.items()},
            num,
            None,
            float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
        )
        validate_update(self.params, cu)
        self.seen.check_and_add(key)
        w = float(cu.num_samples)
        for name, d in cu.delta.items():
            if name not in self.sums:
                self.sums[name] = np.zeros(d.shape, np.float64)
                self.wsum[name] = np.zeros(d.shape, np.float64)
            self.sums[name] += w * d
            self.wsum[name] += w
        self.accepted[dev] = ClientUpdate(dev, {}, cu.num_samples, None, cu.loss)
        return True

    def finish_round(self) -> None:
        self.params = self.strategy.apply_sums(self.open, self.params, self.sums, self.wsum)
        self.sums, self.wsum = {}, {}


def worker(side: str, folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    schema = ModelSchema({k: tuple(v) for k, v in meta["schema"].items()})
    files = sorted(folder.glob("u*.bin"))
    messages = [f.read_bytes() for f in files]
    devices = [f"dev-{i}" for i in range(len(messages))]
    eng = (
        _engine(schema, meta["spec"], devices)
        if side == "coordinator"
        else OldEngine(schema, devices)
        if side == "old engine"
        else None
    )
    from edgefed.protocol import unpack

    decode_update(unpack(messages[0])[1]["update"], schema)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")
    base_kb = status_kb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    if eng is not None:
        for dev, msg in zip(devices, messages, strict=True):
            if not eng.handle_update(dev, msg):
                raise RuntimeError(f"{side}: update of {dev} refused")
        eng.finish_round()
        result = eng.params
    else:
        sums = {k: np.zeros(s, np.float32) for k, s in schema.items()}
        total = 0.0
        for msg in messages:
            u = decode_update(unpack(msg)[1]["update"], schema)
            w = float(u.meta.num_samples)
            for name, dense in u.to_dense().items():
                np.multiply(dense, np.float32(w), out=dense)
                sums[name] += dense
            total += w
        result = {k: v / np.float32(total) for k, v in sums.items()}
    ms = (time.perf_counter() - t) * 1e3
    cpu_ms = (time.process_time() - c) * 1e3  # all threads: a load-robust second view
    peak_kb = status_kb("VmHWM")
    np.save(folder / f"model_{side.replace(' ', '_')}.npy", result["l1.weight"])
    print(json.dumps({"ms": ms, "cpu_ms": cpu_ms, "base_kb": base_kb, "peak_kb": peak_kb}))


def prepare(folder: Path, params: int, spec: str, updates: int) -> tuple[ModelSchema, int]:
    schema = schema_for(params)
    (folder / "meta.json").write_text(
        json.dumps({"schema": {k: list(v) for k, v in schema.items()}, "spec": spec})
    )
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in schema.items()}
    wire = 0
    for i in range(updates):
        # cheap distinct updates: rolled and rescaled copies of one random draw
        upd = {k: np.roll(v, 7919 * i).reshape(v.shape) * (1 + i % 7) for k, v in base.items()}
        dev, num = f"dev-{i}", 10 + i
        meta = UpdateMeta(round=1, device_id=dev, num_samples=num, model_version="r0")
        payload = encode_update(upd, meta, spec)
        msg = pack(UpdateHeader(1, dev, f"u{i}", num, 0.5).to_dict(), {"update": payload})
        wire += len(msg)
        (folder / f"u{i:04d}.bin").write_bytes(msg)
    return schema, wire


def run_side(side: str, folder: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", side, "--dir", str(folder)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", choices=SIDES)
    ap.add_argument("--dir", type=Path)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.dir)
        return
    report: dict[str, object] = {"machine": machine(), "updates": a.updates, "workloads": {}}
    print(f"coordinator intake + aggregation, {a.updates} updates -- {machine()}")
    for name, wl in WORKLOADS.items():
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            schema, wire = prepare(folder, wl["params"], wl["spec"], a.updates)
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
            for _ in range(a.repeat):  # interleaved: load spikes hit every side alike
                for side in SIDES:
                    runs[side].append(run_side(side, folder))
            models = {s: np.load(folder / f"model_{s.replace(' ', '_')}.npy") for s in SIDES}
        n = schema.total_elements
        dense_mb = 4 * n / 2**20
        res: dict[str, dict[str, float]] = {}
        for side, rs in runs.items():
            extra = max(r["peak_kb"] - r["base_kb"] for r in rs) / 1024
            res[side] = {
                "median_ms": statistics.median(r["ms"] for r in rs),
                "best_ms": min(r["ms"] for r in rs),
                "median_cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                "peak_extra_mb": extra,
                "extra_vs_dense_copy": extra / dense_mb,
                "runs_ms": [r["ms"] for r in rs],
            }
        coord = res["coordinator"]
        for side in SIDES:
            res[side]["updates_per_s"] = a.updates / (res[side]["median_ms"] / 1e3)
            res[side]["coordinator_speedup"] = res[side]["median_ms"] / coord["median_ms"]
        # the old engine adds the mean to the global model (zeros), numpy reports the mean
        diff = float(np.max(np.abs(models["coordinator"] - models["old engine"])))
        diff_np = float(np.max(np.abs(models["coordinator"] - models["numpy"])))
        print(
            f"\n{name}: {n:,} params, {wl['spec']}, {wire / a.updates / 1e3:.0f} kB per message,"
            f" {a.repeat} interleaved runs per side (median; best in brackets)"
        )
        heads = ["side", "wall ms", "cpu ms", "updates/s", "coordinator is", "peak extra MB",
                 "extra / dense copy"]  # fmt: skip
        rows = [
            [side, f"{r['median_ms']:.0f} ({r['best_ms']:.0f})", f"{r['median_cpu_ms']:.0f}",
             f"{r['updates_per_s']:.0f}", f"{r['coordinator_speedup']:.1f}x faster"
             if side != "coordinator" else "-", f"{r['peak_extra_mb']:.0f}",
             f"{r['extra_vs_dense_copy']:.2f}x"]
            for side, r in res.items()
        ]  # fmt: skip
        print(table(heads, rows))
        print(
            f"max |model difference| coordinator vs old engine {diff:.2e}, vs numpy {diff_np:.2e}"
        )
        report["workloads"][name] = {  # type: ignore[index]
            **wl, "params": n, "bytes_per_message": wire / a.updates, "dense_copy_mb": dense_mb,
            "results": res, "max_abs_diff_vs_old": diff, "max_abs_diff_vs_numpy": diff_np,
        }  # fmt: skip
    wa = report["workloads"]["A"]["results"]  # type: ignore[index]
    wb = report["workloads"]["B"]["results"]  # type: ignore[index]
    report["targets"] = {
        "A_speedup_vs_numpy": wa["numpy"]["coordinator_speedup"],
        "A_peak_extra_vs_dense": wa["coordinator"]["extra_vs_dense_copy"],
        "B_speedup_vs_old_engine": wb["old engine"]["coordinator_speedup"],
    }
    t = report["targets"]
    print(
        f"\ntargets: A {t['A_speedup_vs_numpy']:.1f}x numpy (>= 10x), peak extra "
        f"{t['A_peak_extra_vs_dense']:.2f}x a dense model (<= 3x); B "
        f"{t['B_speedup_vs_old_engine']:.1f}x the old handle_update (>= 3x)"
    )
    print(f"wrote {write_json('aggregate', report)}")


if __name__ == "__main__":
    main()
