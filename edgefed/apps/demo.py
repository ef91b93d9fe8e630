"""``edgefed demo``: the whole system in one command.

Starts an embedded MQTT broker (amqtt, in-process; ``--broker mqtt://host:port`` uses a real
one), a coordinator service and ``--devices`` device agents (threads, each with its own MQTT
connection, on-disk state and onnxruntime session) on sklearn digits split non-IID by
Dirichlet label skew, runs ``--rounds`` rounds, prints accuracy and bytes per round and
writes metrics (JSON lines) and a PNG (accuracy vs round and vs cumulative uplink bytes).
Defaults finish in about a minute on two cores.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--compression", default="topk:0.1+int8", help="uplink compression spec")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weak", type=int, default=2, help="devices that train only the head")
    p.add_argument("--broker", default="embedded", help="'embedded' or mqtt://host:port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="edgefed-demo", help="output directory")


def run(args: argparse.Namespace) -> int:
    from edgefed.apps.plot import plot_runs
    from edgefed.apps.simulate import run_digits
    from edgefed.transport import parse_broker_url

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.broker != "embedded":
        try:
            parse_broker_url(args.broker)
        except ValueError as e:
            print(f"edgefed demo: {e}", file=sys.stderr)
            return 2
    if not 1 <= args.devices <= 500 or not 0 <= args.weak <= args.devices or args.rounds < 1:
        print("edgefed demo: need 1 <= devices <= 500, 0 <= weak <= devices, rounds >= 1")
        return 2
    out = Path(args.out)
    shutil.rmtree(out / "state", ignore_errors=True)  # a demo starts fresh
    where = "embedded MQTT broker (amqtt)" if args.broker == "embedded" else args.broker
    print(
        f"edgefed demo: {args.devices} devices ({args.weak} head-only), digits non-IID "
        f"(alpha={args.alpha}), {args.rounds} rounds, uplink {args.compression}, via {where}",
        flush=True,
    )
    ns = argparse.Namespace(
        devices=args.devices,
        rounds=args.rounds,
        alpha=args.alpha,
        model=args.model,
        downlink="int8",
        strategy=args.strategy,
        strategy_param=[],
        no_error_feedback=False,
        lr=args.lr,
        epochs=1,
        batch_size=16,
        fraction=1.0,
        weak=args.weak,
        seed=args.seed,
        broker=args.broker,
        out=str(out),
    )
    t0 = time.time()
    runs = run_digits(ns, [args.compression], verbose=True)
    hist = runs[args.compression]
    png = plot_runs(runs, out / "accuracy.png", f"edgefed demo: digits, {args.devices} devices")
    last = hist[-1]
    dense = 4 * 64 * 64 + 4 * 64 + 4 * 64 * 10 + 40  # float32 MLP delta, for the ratio
    per_update = last["cum_bytes_up"] / max(1, sum(h["participants"] for h in hist))
    print(
        f"\nfinal accuracy {100 * last['accuracy']:.1f}% after {last['round']} rounds; "
        f"uplink {last['cum_bytes_up']:,} bytes total, {per_update:,.0f} per update"
        + (f" (float32 would be ~{dense:,})" if args.model == "mlp" else "")
        + f"; downlink {last['cum_bytes_down']:,} bytes; {time.time() - t0:.0f}s"
    )
    print(f"metrics: {out}/metrics-*.jsonl   plot: {png}")
    return 0
