"""Longer fuzz run of the update decoder (atheris / libFuzzer, coverage-guided).

Every input must either decode into a valid update (finite float32 tensors of the
schema's shapes) or raise CodecError; anything else (another exception, a crash, a
hang, memory blow-up) is a finding. The seed corpus holds valid payloads of every
encoding in both wire versions (v2 compact, the default, and v1 safetensors). The first
input byte picks a mode: raw bytes (exercises framing and the integrity check), or
"re-signed" (v1: the sha256 in the header is recomputed; v2: the trailing crc32 is
recomputed), so mutations reach the per-tensor checks behind the integrity check.

Run: PYTHONPATH=. python benchmarks/fuzz_wire.py [--seconds 120]
Falls back to hypothesis with many examples if atheris is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The libFuzzer worker runs with cwd benchmarks/out, where a relative PYTHONPATH=. would
# resolve to the wrong folder and an installed (older) edgefed would be fuzzed instead of
# this tree (this happened): always put the repository root first.
sys.path.insert(0, str(HERE.parent))


def resign(data: bytes) -> bytes:
    if data[:4] == b"EFU\x02" and len(data) >= 8:  # v2: recompute the trailing crc32
        return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))
    try:
        n = struct.unpack_from("<Q", data, 0)[0]
        if n > len(data) - 8 or n > 1 << 20:
            return data
        header = json.loads(data[8 : 8 + n])
        md = header["__metadata__"]
        body = data[8 + n :]
        h = hashlib.sha256(b"edgefed.update/1\n")
        h.update(md["meta"].encode() + b"\n" + md["tensors"].encode() + b"\n" + body)
        md["sha256"] = h.hexdigest()
        hb = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack("<Q", len(hb)) + hb + body
    except Exception:  # malformed in a way resigning cannot fix: decode as is
        return data


def target_factory():
    from edgefed.codec import CodecError, ModelSchema, decode_update

    schema = ModelSchema({"w": (40, 50), "b": (50,)})

    def one_input(data: bytes) -> None:
        if not data:
            return
        payload = resign(data[1:]) if data[0] & 1 else data[1:]
        try:
            u = decode_update(payload, schema, accept_v1=True)  # the intake's superset
        except CodecError:
            return
        for name, arr in u.to_dense().items():
            if arr.shape != schema[name] or arr.dtype != np.float32:
                raise AssertionError(f"decoded {name} has shape {arr.shape} / {arr.dtype}")
            if not np.isfinite(arr).all():
                raise AssertionError(f"decoded {name} is not finite")

    return one_input


def seeds(folder: Path) -> None:
    from edgefed.codec import UpdateMeta, encode_update

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    upd = {"w": rng.standard_normal((40, 50)).astype(np.float32),
           "b": rng.standard_normal(50).astype(np.float32)}  # fmt: skip
    meta = UpdateMeta(round=1, device_id="d", num_samples=5, model_version="v1")
    specs = ["none", "fp16", "int8", "int8:block=64", "int8:channel", "int4:block=16",
             "topk:0.05", "topk:0.05+int8", "topk:0.6+fp16"]  # fmt: skip
    for i, spec in enumerate(specs):
        for version in (1, 2):
            p = encode_update(upd, meta, f"{spec}; min_elements=40", version=version)
            for mode in (0, 1):
                (folder / f"seed_v{version}_{i}_{mode}").write_bytes(bytes([mode]) + p)


def worker(seconds: int, corpus: Path) -> None:
    import atheris

    with atheris.instrument_imports():
        one_input = target_factory()
    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-rss_limit_mb=2048",
         "-timeout=10", "-print_final_stats=1"],
        one_input,
    )  # fmt: skip
    atheris.Fuzz()


def run_atheris(seconds: int) -> dict:
    corpus = HERE / "out" / "fuzz_corpus"
    seeds(corpus)
    t = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--seconds", str(seconds)],
        capture_output=True, text=True, cwd=HERE / "out",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    done = re.findall(r"Done (\d+) runs", out)
    n = int(runs[-1]) if runs else int(done[-1]) if done else -1
    crashed = proc.returncode != 0 or "ERROR: libFuzzer" in out or "Uncaught Python" in out
    cov = re.findall(r"cov: (\d+)", out)
    return {"engine": "atheris (libFuzzer)", "seconds": round(time.time() - t, 1),
            "inputs": n, "crashes": int(crashed), "returncode": proc.returncode,
            "coverage_edges": int(cov[-1]) if cov else None,
            "tail": out.strip().splitlines()[-12:]}  # fmt: skip


def run_hypothesis(examples: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    one_input = target_factory()
    corpus = HERE / "out" / "fuzz_corpus"
    seeds(corpus)
    base = [p.read_bytes() for p in sorted(corpus.iterdir())]
    count = {"n": 0}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from(base), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255))))
    def prop(seed: bytes, edits: list[tuple[int, int]]) -> None:
        b = bytearray(seed)
        for pos, val in edits:
            b[pos % len(b)] = val
        count["n"] += 1
        one_input(bytes(b))

    t = time.time()
    prop()
    return {"engine": "hypothesis", "seconds": round(time.time() - t, 1),
            "inputs": count["n"], "crashes": 0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        worker(a.seconds, HERE / "out" / "fuzz_corpus")
        return
    from _util import machine, write_json

    try:
        import atheris  # noqa: F401

        res = run_atheris(a.seconds)
    except ImportError:
        res = run_hypothesis(20_000)
    res["machine"] = machine()
    print(f"fuzz_wire: {res['engine']}, {res['inputs']:,} inputs in {res['seconds']} s, "
          f"{res['crashes']} crashes")  # fmt: skip
    for line in res.get("tail", []):
        print("  " + line)
    print(f"wrote {write_json('fuzz_wire', res)}")


if __name__ == "__main__":
    main()
