"""Mixed links over real network namespaces (issue 15, item 4): adaptive uplink compression
vs one fixed spec, with real processes behind real rate limits.

benchmarks/intermittent.py measures the same comparison on a simulated clock; this one puts
the whole system on the wire, so TCP, the token buckets, MQTT acknowledgements, the agent's
measured uplink (from PUBACK timing) and the coordinator's choice from it are all real:

* a hub network namespace with a real mosquitto and a real ``python -m edgefed coordinator
  --config coordinator.toml`` process (tests/netlinks.py ``NetLab`` + ``LinkFleet``, shared
  with tests/test_constrained_links.py);
* N real agent processes (``python -m device_agent.cli --config dev-<i>.toml``, what the
  ``edgefed-agent`` script runs), each in its own namespace behind a veth pair whose device
  end has a ``tc tbf`` rate: one device at 10 kB/s, the others geometric from 100 kB/s to
  10 MB/s (uplink; the downlink is not limited);
* a user model file written here (``user_digits.py``: MLP 64-256-10, 19,210 parameters, so
  an int8 update, ~19.6 kB, is large enough for the agent's uplink meter to take a sample)
  exported with the Python API; data: sklearn ``load_digits`` split over the devices
  (``edgefed.zoo.data.digits_federated``, Dirichlet alpha 0.5, 397 held out for the
  coordinator's evaluation).

Sync FedAvg rounds sampling ``--fraction`` of the devices (so the 10 kB/s device is in about
that share of rounds), 1 local epoch SGD lr 0.05 batch 16. Fixed: ``uplink = "int8"``.
Adaptive: the same plus ``upload_budget_s`` (``--budget``: ``auto`` by default, i.e.
``(budget_ratio - 1) x`` the median of the last 20 rounds' wall time, see
edgefed/coordinator/adaptive.py; or a number of seconds, the absolute budget of the earlier
runs) over the default ladder (int8 -> topk:0.1+int8 -> topk:0.01+int8 -> topk:0.001+int8);
int8 while a device's rate is unknown (and, with ``auto``, in round 1).

Realistic round lengths (``--train-s``, default 1.5): a device of a real fleet trains for
seconds per round; this one trains the digits MLP in a few ms, so its rounds (~0.12 s) were
scheduling jitter of 10 processes on 2 cores, and no budget relative to them could mean
anything. Each agent gets ``[agent] emulate_step_s`` (its training lasts at least steps x
that: it sleeps out what the real ~0.2 ms steps did not take, so the CPU idles and ten
emulated devices do not slow each other down), set per device from its own steps per epoch
so that every device trains ``--train-s`` seconds: equal compute, links that differ, which
is what the target is about. ``--train-s 0`` runs the earlier, unemulated fleet. Measured
from the coordinator's metrics file: round time (``wall_seconds``: tasks out -> aggregated
and evaluated) p50 / p95 over rounds 2.. (round 1 ships the graph to every device, the
same in both variants; reported separately), final accuracy, the 10 kB/s device's specs and
bytes. A third variant, "control", is the fixed run with the 10 kB/s device given 10 MB/s
instead: the p95/p50 of rounds with no slow device at all on this machine (the noise floor
adaptive compression can at best reach). Variants are interleaved per seed (order
alternating). Needs root and iproute2.
Prints a table, writes benchmarks/out/intermittent_links.json.

    python benchmarks/intermittent_links.py --seeds 0,1 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # netlinks: the namespace lab of the tests
from _util import machine, table, write_json  # noqa: E402

SLOW = 10_000  # bytes/s of the slowest device
USER_MODEL = '''
"""A user's model, outside the edgefed package (written by benchmarks/intermittent_links.py)."""
import torch


class DigitsMLP(torch.nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''


def prepare(d: Path, devices: int, seed: int) -> None:
    """The user model file, the exported model, eval set and one data file per device."""
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.usermodel import load_factory
    from edgefed.zoo.data import digits_federated

    src = d / "user_digits.py"
    src.write_text(USER_MODEL)
    devs, (xte, yte) = digits_federated(devices, alpha=0.5, seed=seed)
    torch.manual_seed(seed)
    x0, y0 = devs[0]
    ex = (torch.from_numpy(x0[:8].astype(np.float32)), torch.from_numpy(y0[:8].astype(np.int64)))
    net = load_factory(f"{src}:DigitsMLP")()  # the user's file, as `[model] factory` loads it
    build_federated_model(net, ex).save(d / "model")
    np.savez(d / "eval.npz", x=xte, y=yte)
    for i, (x, y) in enumerate(devs):
        np.savez(d / f"data-{i}.npz", x=x, y=y)


def rates(devices: int, slow: int = SLOW) -> list[int]:
    """Device 0 at ``slow`` (10 kB/s), the others geometric from 100 kB/s to 10 MB/s."""
    return [slow, *(int(r) for r in np.geomspace(1e5, 1e7, devices - 1))]


def step_times(model: Path, devices: int, train_s: float, batch: int = 16) -> list[float]:
    """``emulate_step_s`` per device so that its one local epoch takes ``train_s``: every
    device computes alike and only its link differs (the target is about links; with one
    step time for all, a device's data share would set its round time)."""
    if train_s <= 0:
        return [0.0] * devices
    out = []
    for i in range(devices):
        with np.load(model / f"data-{i}.npz") as z:
            steps = -(-len(z["y"]) // batch)
        out.append(round(train_s / steps, 4))
    return out


def run(
    work: Path, model: Path, variant: str, a: argparse.Namespace, seed: int, step_s: list[float]
) -> dict[str, Any]:
    from netlinks import LinkFleet, NetLab

    lab = NetLab(work)
    try:
        extra = ""
        if variant == "adaptive":
            budget = '"auto"' if a.budget == "auto" else float(a.budget)
            extra = f"upload_budget_s = {budget}\nbudget_ratio = {a.budget_ratio}"
        fleet = LinkFleet(
            lab, model, a.devices, compression=extra,
            training="local_epochs = 1\nbatch_size = 16\nlr = 0.05",
            rounds=a.rounds, fraction=a.fraction, min_devices=a.devices, seed=seed,
            agent_lines={f"dev-{i}": f"emulate_step_s = {t}" for i, t in enumerate(step_s)},
        )  # fmt: skip
        slow = 10_000_000 if variant == "control" else SLOW
        for dev, rate in zip(fleet.devices, rates(a.devices, slow), strict=True):
            lab.links[dev].throttle(rate, burst=max(4096, rate // 50))
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        fleet.start()
        hist = fleet.wait_rounds(a.rounds, a.rounds * 60)
        total = time.monotonic() - t0
    finally:
        lab.close()
    per = [float(h["wall_seconds"]) for h in hist[1:]]
    slow = [h["uplink"]["dev-0"] for h in hist if "dev-0" in h["uplink"]]
    return {
        "variant": variant,
        "seed": seed,
        "p50_round_s": float(np.percentile(per, 50)),
        "p95_round_s": float(np.percentile(per, 95)),
        "max_round_s": max(per),
        "round1_s": float(hist[0]["wall_seconds"]),
        "final_accuracy": hist[-1]["accuracy"],
        "rounds_with_slow_device": len(slow),
        "slow_device_specs": [s["spec"] for s in slow],
        "slow_device_bytes": [s["bytes"] for s in slow],
        "bytes_up": int(hist[-1]["cum_bytes_up"]),
        "dropped": sum(sum(h["dropped"].values()) for h in hist),
        "round_s": [float(h["wall_seconds"]) for h in hist],
        "round_uplink": [h["uplink"] for h in hist],  # device -> spec, bytes per round
        "round_budget_s": [h.get("upload_budget_s") for h in hist],
        "round_aggregate_s": [float(h["aggregate_seconds"]) for h in hist],
        "total_s": total,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg()[0],
    }


def _budget_text(budgets: list[float | None]) -> str:
    got = [b for b in budgets if b is not None]
    if not got:
        return "-"
    return f"{min(got):.2f} / {statistics.median(got):.2f} / {max(got):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated; variants run per seed")
    ap.add_argument("--devices", type=int, default=10, help="agent processes (namespaces)")
    ap.add_argument("--rounds", type=int, default=30, help="sync rounds per run")
    ap.add_argument("--fraction", type=float, default=0.3, help="devices sampled per round")
    ap.add_argument(
        "--budget", default="auto", help='upload_budget_s (adaptive): "auto" or seconds'
    )
    ap.add_argument("--budget-ratio", type=float, default=1.5, help="budget_ratio (auto)")
    ap.add_argument(
        "--train-s", type=float, default=1.5,
        help="emulated training seconds per round per device (0: none, the earlier runs)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    import pytest
    from netlinks import _remove_stale, require_tools

    try:
        require_tools()
    except pytest.fail.Exception as e:
        sys.exit(f"intermittent_links: {e}")
    _remove_stale()
    logging.disable(logging.WARNING)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="links-bench-") as tmp:
        # processes inherit the cwd: never the checkout, whose edgefed/ lacks the built core
        os.chdir(tmp)
        for k, seed in enumerate(seeds):
            model = Path(tmp) / f"model-{seed}"
            model.mkdir()
            prepare(model, a.devices, seed)
            step_s = step_times(model, a.devices, a.train_s)
            print(f"seed {seed}: emulate_step_s per device {step_s}", flush=True)
            order = ("fixed", "adaptive", "control")[:: 1 if k % 2 == 0 else -1]
            for variant in order:  # interleaved, order alternating per seed
                r = run(Path(tmp) / f"{variant}-{seed}", model, variant, a, seed, step_s)
                r["emulate_step_s"] = step_s
                runs.append(r)
                print(f"seed {seed} {variant}: p50 {r['p50_round_s']:.2f} s  p95 "
                      f"{r['p95_round_s']:.2f} s  acc {r['final_accuracy']:.4f}  slow device "
                      f"{sorted(set(r['slow_device_specs']))}  load {r['loadavg_start']:.1f}"
                      f"->{r['loadavg_end']:.1f}  ({time.monotonic() - t_start:.0f} s)",
                      flush=True)  # fmt: skip
    by = {(r["seed"], r["variant"]): r for r in runs}
    rows = []
    for seed in seeds:
        f, ad, c = by[(seed, "fixed")], by[(seed, "adaptive")], by[(seed, "control")]
        rows.append([
            seed, f"{f['p50_round_s']:.2f} / {f['p95_round_s']:.2f}",
            f"{f['p95_round_s'] / f['p50_round_s']:.2f}",
            f"{ad['p50_round_s']:.2f} / {ad['p95_round_s']:.2f}",
            f"{ad['p95_round_s'] / ad['p50_round_s']:.2f}",
            f"{c['p50_round_s']:.2f} / {c['p95_round_s']:.2f}",
            f"{c['p95_round_s'] / c['p50_round_s']:.2f}",
            f"{100 * f['final_accuracy']:.2f}% / {100 * ad['final_accuracy']:.2f}%",
            ",".join(sorted(set(ad["slow_device_specs"]))),
            _budget_text(ad["round_budget_s"]),
            f"{statistics.mean(f['slow_device_bytes'] or [0]):,.0f} / "
            f"{statistics.mean(ad['slow_device_bytes'] or [0]):,.0f}",
        ])  # fmt: skip

    def mean(variant: str, fn: Any) -> float:
        return statistics.mean(fn(by[(s, variant)]) for s in seeds)

    def ratio(r: dict[str, Any]) -> float:
        return float(r["p95_round_s"] / r["p50_round_s"])

    def acc(r: dict[str, Any]) -> float:
        return float(r["final_accuracy"])

    summary = {
        "fixed_p95_over_p50_mean": mean("fixed", ratio),
        "adaptive_p95_over_p50_mean": mean("adaptive", ratio),
        "control_p95_over_p50_mean": mean("control", ratio),
        "accuracy_gap_pp_mean": 100 * (mean("adaptive", acc) - mean("fixed", acc)),
    }
    rows.append(["mean", "", f"{summary['fixed_p95_over_p50_mean']:.2f}", "",
                 f"{summary['adaptive_p95_over_p50_mean']:.2f}", "",
                 f"{summary['control_p95_over_p50_mean']:.2f}",
                 f"{summary['accuracy_gap_pp_mean']:+.2f} pp", "", "", ""])  # fmt: skip
    print(f"\n{a.devices} devices over netns + tc tbf (one at 10 kB/s, the others 100 kB/s-"
          f"10 MB/s), {a.rounds} sync rounds sampling {a.fraction:.0%}, digits MLP 64-256-10; "
          f"round time over rounds 2..{a.rounds} (coordinator metrics); budget {a.budget} "
          f"(ratio {a.budget_ratio}), emulated training {a.train_s} s per round")  # fmt: skip
    head = ["seed", "fixed p50/p95 s", "fixed p95/p50", "adaptive p50/p95 s", "adaptive p95/p50",
            "control p50/p95 s", "control p95/p50", "acc fixed / adaptive",
            "10 kB/s device specs (adaptive)", "budget s min/median/max",
            "10 kB/s device bytes/update fixed / adaptive"]  # fmt: skip
    print(table(head, rows))
    met = summary["adaptive_p95_over_p50_mean"] <= 1.5 and summary["accuracy_gap_pp_mean"] >= -1
    print("summary:", json.dumps(summary), "targets", "met" if met else "NOT met")
    load = os.getloadavg()
    path = write_json("intermittent_links", {
        "machine": machine(), "loadavg": load, "args": vars(a), "rates": rates(a.devices),
        "runs": runs, "summary": summary, "total_s": time.monotonic() - t_start,
    })  # fmt: skip
    print(f"{machine()}; load {load[0]:.1f}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
