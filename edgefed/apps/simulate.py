"""``edgefed simulate``: federated digits with options; several ``--compression`` values run
side by side (same split, same initial model) and land in one plot."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from edgefed.coordinator.rounds import RoundConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=10, help="simulated devices")
    p.add_argument("--rounds", type=int, default=20, help="federated rounds")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="built-in model")
    p.add_argument(
        "--compression",
        action="append",
        help="uplink spec (repeatable): none, int8, topk:0.1+int8, ... (default int8)",
    )
    p.add_argument("--downlink", default="int8", help="downlink compression spec")
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy name")
    p.add_argument(
        "--strategy-param", action="append", default=[], metavar="KEY=VALUE",
        help="strategy parameter, e.g. mu=0.01 (repeatable)",
    )  # fmt: skip
    p.add_argument("--no-error-feedback", action="store_true", help="no uplink error feedback")
    p.add_argument("--lr", type=float, default=RoundConfig.lr, help="device learning rate")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size")
    p.add_argument("--fraction", type=float, default=1.0, help="devices sampled per round")
    p.add_argument("--weak", type=int, default=0, help="devices that train the head only")
    p.add_argument("--seed", type=int, default=0, help="seeds data split, model, sampling")
    p.add_argument(
        "--broker", default=None, help="'embedded' or mqtt://host:port (default: in-process)"
    )
    p.add_argument("--out", default="edgefed-simulate", help="output directory")


def _param(kv: str) -> tuple[str, object]:
    k, _, v = kv.partition("=")
    if not k or not v:
        raise ValueError(f"--strategy-param needs KEY=VALUE, got {kv!r}")
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def run_digits(args: argparse.Namespace, specs: list[str], verbose: bool) -> dict[str, list]:
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.simulation import simulate
    from edgefed.strategies import make_strategy
    from edgefed.zoo import models
    from edgefed.zoo.data import digits_federated

    image = args.model == "cnn"
    devs, test = digits_federated(args.devices, args.alpha, args.seed, image=image)
    torch.manual_seed(args.seed)
    net = models.digits_cnn() if image else models.digits_mlp(64)
    sp = dict(_param(kv) for kv in args.strategy_param)
    ex = (torch.from_numpy(devs[0][0][:8].copy()), torch.from_numpy(devs[0][1][:8].copy()))
    fm = build_federated_model(
        net, ex, head="last" if args.weak else None, fedprox=args.strategy == "fedprox"
    )
    out = Path(args.out)
    runs = {}
    for spec in specs:
        if verbose:
            print(f"--- {spec} ---", flush=True)
        name = spec.replace(":", "_").replace("+", "_")
        metrics = out / f"metrics-{name}.jsonl"
        metrics.unlink(missing_ok=True)
        runs[spec] = simulate(
            net,
            devs,
            rounds=args.rounds,
            strategy=make_strategy(args.strategy, **sp),
            compression=spec,
            downlink=args.downlink,
            test_data=test,
            local_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            fraction=args.fraction,
            error_feedback=not args.no_error_feedback,
            seed=args.seed,
            weak_devices=range(args.weak),
            broker=args.broker,
            metrics_path=metrics,
            verbose=verbose,
            federated_model=fm,
            work_dir=out / "state" / name if args.broker else None,
        )
    return runs


def run(args: argparse.Namespace) -> int:
    from edgefed.apps.plot import plot_runs

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    specs = args.compression or ["int8"]
    t0 = time.time()
    try:
        runs = run_digits(args, specs, verbose=True)
    except ValueError as e:
        print(f"edgefed simulate: {e}", file=sys.stderr)
        return 2
    png = plot_runs(runs, Path(args.out) / "accuracy.png", f"digits, {args.devices} devices")
    print(f"\n{'uplink':<20} {'final acc':>9} {'uplink bytes':>13}")
    for spec, h in runs.items():
        print(f"{spec:<20} {100 * h[-1]['accuracy']:8.1f}% {h[-1]['cum_bytes_up']:>13,}")
    print(f"plot: {png}  metrics: {args.out}/metrics-*.jsonl  ({time.time() - t0:.0f}s)")
    return 0
