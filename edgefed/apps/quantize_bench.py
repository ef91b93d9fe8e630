"""``edgefed quantize-bench``: a quick int8 throughput check of this machine's C++ core.

For the side-by-side comparison with numpy / torch / onnxruntime use
``benchmarks/quantize.py``; this command needs only numpy and runs in a few seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from edgefed import quant


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=16_000_000, help="float32 elements")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument(
        "--isa", default="auto", choices=["auto", *quant.available_isas()],
        help="C++ kernel instruction set (default: the best available)",
    )  # fmt: skip


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    if args.size <= 0 or args.repeats <= 0:
        raise SystemExit("--size and --repeats must be positive")
    n, kw = args.size, {"threads": args.threads, "isa": args.isa}
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    q = np.empty(n, np.int8)
    y = np.empty(n, np.float32)
    qt = quant.quantize(x, **kw)
    isa = quant.best_isa() if args.isa == "auto" else args.isa
    print(f"edgefed quantize-bench: {n:,} float32, isa {isa}, threads {args.threads or 'all'}")
    cases: dict[str, Callable[[], object]] = {
        "quantize, scale given": lambda: quant.quantize(x, qt.scale, out=q, **kw),
        "quantize per tensor incl. scale": lambda: quant.quantize(x, out=q, **kw),
        "quantize blockwise(256) incl. scales": lambda: quant.quantize(
            x, block_size=256, out=q, **kw
        ),
        "dequantize": lambda: quant.dequantize(qt, out=y, **kw),
    }
    for name, fn in cases.items():
        sec = _median_s(fn, args.repeats)
        print(f"  {name:38} {sec * 1e3:8.2f} ms  {4 * n / sec / 1e9:6.1f} GB/s (of float32)")
    return 0
