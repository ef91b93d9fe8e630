"""``edgefed simulate``: federated digits with options; several ``--compression`` values run
side by side (same split, same initial model) and land in one plot.

The options are ``edgefed.simulate``'s: asynchronous buffered aggregation (``--mode async``,
``--buffer-size``, ``--max-staleness``...), a simulated fleet clock (``--speeds``,
``--offline-fraction``, ``--links``...) and the adaptive uplink (``--upload-budget-s``,
``--ladder``). Every bad value is one line on stderr naming the option (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from edgefed.coordinator.rounds import RoundConfig

PROG = "edgefed simulate"
# options passed to edgefed.simulate as they are (--speeds and --links are expanded first)
ASYNC_AND_FLEET = (
    "mode", "buffer_size", "max_staleness", "max_concurrent", "staleness_weight", "step_time",
    "offline_fraction", "offline_period", "upload_budget_s", "ladder",
)  # fmt: skip


def _one_line_error(message: str) -> NoReturn:
    """argparse's error without the usage block: one line naming the option."""
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


def _number(kind: type, lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable:
    """An argparse type: ``kind`` within [lo, hi] (or (lo, hi] with ``lo_open``)."""
    lo_txt = f"> {lo:g}" if lo_open else f">= {lo:g}"
    want = f"{'an integer' if kind is int else 'a number'} {lo_txt}" + (
        f" and <= {hi:g}" if hi < math.inf else ""
    )

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, found {text!r}") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"expected {want}, found {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _fraction(text: str) -> float:
    v = _number(float, 0.0)(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and < 1, found {text!r}")
    return float(v)


def _staleness_weight(text: str) -> str:
    from edgefed.coordinator.staleness import parse_staleness_weight

    try:
        parse_staleness_weight(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return text


def _ladder(text: str) -> list[str]:
    from edgefed.coordinator.adaptive import parse_ladder

    try:
        return list(parse_ladder([x.strip() for x in text.split(",") if x.strip()]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _rates(text: str) -> list[float]:
    """Comma-separated positive numbers (``1e4,1e6``)."""
    out = []
    for x in text.split(","):
        try:
            v = float(x)
        except ValueError:
            v = math.nan
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive numbers, found {x.strip()!r} in {text!r}"
            )
        out.append(v)
    return out


def _speeds(text: str) -> str:
    """``spread:R`` or a comma list; expanded per device by :func:`per_device`."""
    if text.startswith("spread:"):
        _number(float, 1.0)(text[7:])
    else:
        _rates(text)
    return text


def _links(text: str) -> str:
    _rates(text)
    return text


def per_device(option: str, text: str | None, n: int) -> list[float] | None:
    """``--speeds`` / ``--links`` for ``n`` devices: one value per device, one value for all,
    or (speeds) ``spread:R``, multipliers geometric from 1 to R."""
    if text is None:
        return None
    if text.startswith("spread:"):
        r = float(text[7:])
        return [r ** (i / (n - 1)) if n > 1 else 1.0 for i in range(n)]
    vals = _rates(text)
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise ValueError(f"{option}: expected 1 or {n} values (--devices), found {len(vals)}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.error = _one_line_error  # type: ignore[method-assign]
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
    a = p.add_argument_group("asynchronous buffered aggregation (docs/asynchronous.md)")
    a.add_argument(
        "--mode", choices=["sync", "async"], default=RoundConfig.mode,
        help="sync rounds, or async (FedBuff): a model version per --buffer-size updates",
    )  # fmt: skip
    for flag, kind, default, text in (
        ("--buffer-size", _number(int, 1), RoundConfig.buffer_size,
         "async: accepted updates per model version (--rounds counts versions)"),
        ("--max-staleness", _number(int, 0), RoundConfig.max_staleness,
         "async: updates more model versions behind than this are dropped as stale"),
        ("--max-concurrent", _number(int, 0), RoundConfig.max_concurrent,
         "async: tasks out at once (0: every online device)"),
        ("--staleness-weight", _staleness_weight, RoundConfig.staleness_weight,
         'async: weight of an update s versions behind: "poly:A", "constant", "hinge:A,B"'),
    ):  # fmt: skip
        a.add_argument(flag, type=kind, default=default, help=text)
    f = p.add_argument_group("simulated fleet clock (in-process only)")
    f.add_argument(
        "--speeds",
        type=_speeds,
        default=None,
        metavar="R,R,...|spread:R",
        help="per-device slowness: a task takes --step-time * speed simulated seconds; one "
        "value per device, one for all, or spread:R (geometric from 1 to R)",
    )
    f.add_argument(
        "--step-time", type=_number(float, 0.0), default=1.0,
        help="simulated seconds of a task on a device of speed 1",
    )  # fmt: skip
    f.add_argument(
        "--offline-fraction", type=_fraction, default=0.0,
        help="share of the time each device is offline, in [0, 1)",
    )  # fmt: skip
    f.add_argument(
        "--offline-period", type=_number(float, 0.0, lo_open=True), default=5.0,
        help="mean length of an offline spell, simulated seconds",
    )  # fmt: skip
    f.add_argument(
        "--links",
        type=_links,
        default=None,
        metavar="B,B,...",
        help="per-device uplink rate in bytes/s (one per device or one for all): an update "
        "takes bytes / rate, and the rate is reported as the device's measured uplink",
    )
    u = p.add_argument_group("adaptive uplink (docs/asynchronous.md)")
    u.add_argument(
        "--upload-budget-s",
        type=_number(float, 0.0, 86400.0),
        default=0.0,
        help="give each device the first --ladder spec whose upload fits this many seconds "
        "at its link rate (0: off, every device uses --compression)",
    )
    u.add_argument(
        "--ladder",
        type=_ladder,
        default=None,
        metavar="SPEC,SPEC,...",
        help="compression specs from largest to smallest (default int8,topk:0.1+int8,"
        "topk:0.01+int8,topk:0.001+int8)",
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
    speeds = per_device("--speeds", args.speeds, args.devices)  # before the slow part
    links = per_device("--links", args.links, args.devices)
    if args.broker and (speeds or links or args.offline_fraction):
        raise ValueError("--speeds, --links, --offline-fraction simulate time: not with --broker")
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
            speeds=speeds,
            links=links,
            **{k: getattr(args, k) for k in ASYNC_AND_FLEET},
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
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    png = plot_runs(runs, Path(args.out) / "accuracy.png", f"digits, {args.devices} devices")
    print(f"\n{'uplink':<20} {'final acc':>9} {'uplink bytes':>13} {'clock s':>9}")
    for spec, h in runs.items():
        clock = h[-1].get("clock_s") or 0.0
        print(
            f"{spec:<20} {100 * h[-1]['accuracy']:8.1f}% {h[-1]['cum_bytes_up']:>13,} {clock:>9.1f}"
        )
    print(f"plot: {png}  metrics: {args.out}/metrics-*.jsonl  ({time.time() - t0:.0f}s)")
    return 0
