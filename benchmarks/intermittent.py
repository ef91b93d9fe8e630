"""Intermittent fleets (issue 15, item 4): asynchronous buffered aggregation (FedBuff) vs
synchronous FedAvg, and per-device adaptive uplink vs one fixed spec, on simulated time.

Both parts run ``edgefed.simulate`` in process with a simulated fleet
(``edgefed.coordinator.fleet_clock.FleetProfile``): every update is real (the exported step graph
trained in onnxruntime on the device's digits shard, compressed, checked by the intake,
aggregated), only the clock is simulated: a task takes ``step_time * speed`` seconds of the
device's online time (plus bytes / link rate with links), devices are offline a given
fraction of the time in exponential spells and train only while online.

1. Speed spread: 20 devices (digits, Dirichlet alpha 0.5), speeds 1x..10x (geometric, shuffled
   per seed), 30 % offline at any moment (spells of 5 s), step 1 s. Sync FedAvg samples the
   devices online at round start and waits for all of them (a round ends when the last
   sampled device answered, however long it was offline); "sync-deadline" closes each round
   at 15 s (1.5x the slowest device's step) without the devices still out. Async:
   ``buffer_size`` 5, every online device holds a task, ``max_staleness`` 20, weight
   1/sqrt(1+s). Measured: simulated time for each to first reach the sync run's final
   accuracy (and the sync-deadline run's), async accuracy after the sync run's simulated
   time, real seconds of each run.
2. Mixed links: 20 devices, one behind 10 kB/s and 19 between 100 kB/s and 10 MB/s, all
   online, equal speed (step 0.5 s), sync rounds sampling 5 devices. Fixed ``int8`` vs
   adaptive (``upload_budget_s`` 0.5 over the default ladder). Measured: p50 / p95 simulated
   round time and final accuracy.

The same mixed-links comparison over real links (netns + ``tc tbf``, real mosquitto,
coordinator and agent processes): benchmarks/intermittent_links.py.

Seeds interleave the variants (sync, async, fixed, adaptive per seed). Prints tables, writes
``benchmarks/results/intermittent.json``.

    python benchmarks/intermittent.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table

RESULTS = Path(__file__).resolve().parent / "results" / "intermittent.json"


def _model(seed: int) -> Any:
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.zoo.data import digits_federated
    from edgefed.zoo.models import digits_mlp

    devices, test = digits_federated(20, alpha=0.5, seed=seed)
    torch.manual_seed(seed)
    x, y = devices[0]
    ex = (torch.from_numpy(x[:8].astype(np.float32)), torch.from_numpy(y[:8].astype(np.int64)))
    return build_federated_model(digits_mlp(128), ex), devices, test


def _first_reaching(h: list[dict[str, Any]], target: float) -> float | None:
    r = _record_reaching(h, target)
    return None if r is None else float(r["clock_s"])


def _record_reaching(h: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    for r in h:
        if r["accuracy"] is not None and r["accuracy"] >= target - 1e-9:
            return r
    return None


def _work_to(h: list[dict[str, Any]], target: float) -> dict[str, int] | None:
    """Device work and uplink until ``target`` was first reached: updates accepted (and
    received, dropped ones included) and update bytes."""
    r = _record_reaching(h, target)
    if r is None:
        return None
    upto = h[: h.index(r) + 1]
    return {
        "accepted_updates": sum(x["participants"] for x in upto),
        "dropped_updates": sum(sum(x["dropped"].values()) for x in upto),
        "bytes_up": int(r["cum_bytes_up"]),
    }


def speed_spread(
    seed: int, sync_rounds: int, max_versions: int, deadline: float = 15.0
) -> dict[str, Any]:
    import edgefed

    fm, devices, test = _model(seed)
    rng = np.random.default_rng(seed)
    speeds = list(rng.permutation(np.geomspace(1.0, 10.0, 20)))
    common: dict[str, Any] = dict(
        federated_model=fm, test_data=test, lr=0.05, batch_size=16, compression="int8",
        speeds=speeds, offline_fraction=0.3, offline_period=5.0, step_time=1.0, seed=seed,
        round_timeout=1e9,
    )  # fmt: skip
    t0 = time.perf_counter()
    sync = edgefed.simulate(None, devices, rounds=sync_rounds, **common)
    sync_real = time.perf_counter() - t0
    # a stronger synchronous baseline: rounds close at a deadline (1.5x the slowest
    # device's step), the devices still out are dropped and their updates come in late
    t0 = time.perf_counter()
    kw = {**common, "round_timeout": deadline}
    sync_dl = edgefed.simulate(None, devices, rounds=sync_rounds, **kw)
    sync_dl_real = time.perf_counter() - t0
    target = float(sync.final_accuracy or 0.0)
    target_dl = float(sync_dl.final_accuracy or 0.0)
    sync_t = _first_reaching(sync, target)
    sync_dl_t = _first_reaching(sync_dl, target_dl)
    budget = float(sync[-1]["clock_s"])
    t0 = time.perf_counter()
    asy = edgefed.simulate(
        None, devices, rounds=max_versions, mode="async", buffer_size=5, max_staleness=20,
        **common,
    )  # fmt: skip
    async_real = time.perf_counter() - t0
    within = [r for r in asy if r["clock_s"] <= budget] or asy[:1]
    async_t = _first_reaching(asy, target)
    async_dl_t = _first_reaching(asy, target_dl)
    stale = sum(r["dropped"].get("stale", 0) for r in asy)
    return {
        "seed": seed,
        "sync_final_accuracy": target,
        "sync_time_to_final_s": sync_t,
        "sync_total_s": budget,
        "sync_rounds": len(sync),
        "sync_real_s": sync_real,
        "sync_deadline_s": deadline,
        "sync_deadline_final_accuracy": target_dl,
        "sync_deadline_time_to_final_s": sync_dl_t,
        "sync_deadline_total_s": float(sync_dl[-1]["clock_s"]),
        "sync_deadline_real_s": sync_dl_real,
        "async_time_to_sync_final_s": async_t,
        "async_time_to_sync_deadline_final_s": async_dl_t,
        "async_accuracy_at_sync_total": within[-1]["accuracy"],
        "async_best_accuracy_at_sync_total": max(r["accuracy"] for r in within),
        "async_versions_at_sync_total": len(within),
        "async_versions": len(asy),
        "async_total_s": float(asy[-1]["clock_s"]),
        "async_final_accuracy": asy.final_accuracy,
        "async_real_s": async_real,
        "async_stale_drops": stale,
        "async_mean_staleness": statistics.mean(
            r["staleness_mean"] for r in asy if r["staleness_mean"] is not None
        ),
        "sync_work_to_final": _work_to(sync, target),
        "async_work_to_sync_final": _work_to(asy, target),
        "time_ratio": (async_t / sync_t) if async_t is not None and sync_t else None,
        "time_ratio_vs_deadline": (
            async_dl_t / sync_dl_t if async_dl_t is not None and sync_dl_t else None
        ),
    }


def mixed_links(seed: int, rounds: int) -> dict[str, Any]:
    import edgefed

    fm, devices, test = _model(seed)
    links = [10_000.0, *np.geomspace(1e5, 1e7, 19).tolist()]
    common: dict[str, Any] = dict(
        federated_model=fm, test_data=test, lr=0.05, batch_size=16, fraction=0.25,
        links=links, step_time=0.5, seed=seed, round_timeout=1e9, rounds=rounds,
    )  # fmt: skip
    out: dict[str, Any] = {"seed": seed}
    for name, extra in (("fixed", {}), ("adaptive", {"upload_budget_s": 0.5})):
        t0 = time.perf_counter()
        h = edgefed.simulate(None, devices, compression="int8", **common, **extra)
        real = time.perf_counter() - t0
        clocks = [0.0, *h.clock_s]
        per = np.diff(clocks)
        slow = [r["uplink"]["dev-000"] for r in h if "dev-000" in r["uplink"]]
        out[name] = {
            "p50_round_s": float(np.percentile(per, 50)),
            "p95_round_s": float(np.percentile(per, 95)),
            "final_accuracy": h.final_accuracy,
            "real_s": real,
            "slow_device_specs": sorted({s["spec"] for s in slow}),
            "slow_device_bytes": sorted({s["bytes"] for s in slow}),
            "bytes_up": int(h[-1]["cum_bytes_up"]),
        }
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sync-rounds", type=int, default=30)
    ap.add_argument("--async-versions", type=int, default=400)
    ap.add_argument("--link-rounds", type=int, default=40)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # stale / late drops are expected here, by the hundred
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    spread, links = [], []
    for seed in seeds:  # interleaved: sync, async, fixed, adaptive per seed
        spread.append(speed_spread(seed, args.sync_rounds, args.async_versions))
        links.append(mixed_links(seed, args.link_rounds))
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    rows = [
        [
            r["seed"], _pct(r["sync_final_accuracy"]), _s(r["sync_time_to_final_s"]),
            _s(r["async_time_to_sync_final_s"]), _ratio(r["time_ratio"]),
            _pct(r["async_accuracy_at_sync_total"]), f"{r['sync_total_s']:.0f}",
            _pct(r["sync_deadline_final_accuracy"]), _s(r["sync_deadline_time_to_final_s"]),
            _s(r["async_time_to_sync_deadline_final_s"]), _ratio(r["time_ratio_vs_deadline"]),
            f"{r['sync_real_s']:.1f} / {r['sync_deadline_real_s']:.1f} / {r['async_real_s']:.1f}",
            r["async_stale_drops"],
        ]
        for r in spread
    ]  # fmt: skip
    print("\n20 devices, 10x speed spread, 30% offline (simulated seconds)")
    head = ["seed", "sync final acc", "sync t to it", "async t to it", "async/sync",
            "async acc at sync end", "sync total", "sync-deadline final acc", "its t",
            "async t to it", "async/sync-deadline", "real s sync/deadline/async",
            "stale drops"]  # fmt: skip
    print(table(head, rows))
    rows = [
        [r["seed"], *(f"{w['accepted_updates']} / {w['bytes_up'] / 1e6:.2f} MB" if w else "n/a"
                      for w in (r["sync_work_to_final"], r["async_work_to_sync_final"]))]
        for r in spread
    ]  # fmt: skip
    print("\nDevice work to reach the sync final accuracy (accepted updates / uplink bytes)")
    print(table(["seed", "sync", "async"], rows))
    ratios = [r["time_ratio"] for r in spread if r["time_ratio"] is not None]
    ratios_dl = [r["time_ratio_vs_deadline"] for r in spread]
    gaps = [r["async_accuracy_at_sync_total"] - r["sync_final_accuracy"] for r in spread]
    summary: dict[str, Any] = {
        "time_ratio_mean": statistics.mean(ratios) if len(ratios) == len(spread) else None,
        "time_ratio_vs_deadline_mean": (
            statistics.mean(ratios_dl) if None not in ratios_dl else None
        ),
        "accuracy_gap_pp_mean": 100 * statistics.mean(gaps),
    }
    rows = [
        [
            r["seed"], f"{r['fixed']['p50_round_s']:.2f} / {r['fixed']['p95_round_s']:.2f}",
            f"{r['fixed']['p95_round_s'] / r['fixed']['p50_round_s']:.2f}",
            f"{r['adaptive']['p50_round_s']:.2f} / {r['adaptive']['p95_round_s']:.2f}",
            f"{r['adaptive']['p95_round_s'] / r['adaptive']['p50_round_s']:.2f}",
            f"{_pct(r['fixed']['final_accuracy'])} / {_pct(r['adaptive']['final_accuracy'])}",
            ",".join(r["adaptive"]["slow_device_specs"]),
        ]
        for r in links
    ]  # fmt: skip
    print("\nMixed links (one 10 kB/s device, 19 at 0.1-10 MB/s), sync, 5 of 20 per round")
    head = ["seed", "fixed p50/p95 s", "fixed p95/p50", "adaptive p50/p95 s",
            "adaptive p95/p50", "acc fixed / adaptive", "slow device spec"]  # fmt: skip
    print(table(head, rows))
    summary["adaptive_p95_over_p50_mean"] = statistics.mean(
        r["adaptive"]["p95_round_s"] / r["adaptive"]["p50_round_s"] for r in links
    )
    summary["fixed_p95_over_p50_mean"] = statistics.mean(
        r["fixed"]["p95_round_s"] / r["fixed"]["p50_round_s"] for r in links
    )
    summary["adaptive_accuracy_gap_pp_mean"] = 100 * statistics.mean(
        r["adaptive"]["final_accuracy"] - r["fixed"]["final_accuracy"] for r in links
    )
    print("\nsummary:", json.dumps(summary))
    load = os.getloadavg()
    out = {
        "machine": machine(),
        "nproc": os.cpu_count(),
        "loadavg": load,
        "seeds": seeds,
        "args": vars(args),
        "speed_spread": spread,
        "mixed_links": links,
        "summary": summary,
        "total_real_s": time.perf_counter() - t_start,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"{machine()}; load {load[0]:.1f}; wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
