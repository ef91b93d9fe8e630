"""Round overhead of the MQTT runtime: 50 devices, a real mosquitto, one machine.

For models of growing size (digits MLP 64-h-10), a coordinator PROCESS runs R rounds with 50
device agents (50 MQTT sessions, threads in a second process, each with 16 samples: one
training step, so the measurement is dominated by the runtime, not by training). Reported
per model: median round wall time, the devices' summed training CPU time in that round,
the overhead = wall - training CPU / cores (devices train in parallel threads; the rest is
int8 downlink encode, 50 task publishes, chunking, broker, decode + validation of 50
updates, FedAvg, held-out evaluation, checkpoint), and the coordinator's peak RSS next to
the model's float32 size, the RSS of a bare Python process (idle) and of the coordinator
ready to run (imports, model, engine; before the first round).
Baseline for the wall time: the same rounds in-process (no broker, no threads, devices one
after another) through the same engine and workers.

    python benchmarks/round_overhead.py            # ~2-3 min
    python benchmarks/round_overhead.py --hidden 32,1024 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data(n_dev: int, n: int):
    import numpy as np

    from edgefed.zoo.data import load_digits_arrays

    x, y = load_digits_arrays()
    r = np.random.default_rng(0)
    return [(x[idx], y[idx]) for idx in (r.choice(len(x), n, replace=False) for _ in range(n_dev))]


def role_coordinator(a: argparse.Namespace) -> None:
    idle = _rss_mb()
    from edgefed.coordinator.metrics import MetricsWriter
    from edgefed.coordinator.model import FederatedModel
    from edgefed.coordinator.rounds import RoundConfig, RoundEngine
    from edgefed.coordinator.service import CoordinatorService
    from edgefed.simulation import make_evaluator
    from edgefed.strategies import FedAvg
    from edgefed.transport import TransportConfig
    from edgefed.zoo.data import load_digits_arrays, train_test_split

    fm = FederatedModel.load(a.model_dir)
    x, y = load_digits_arrays()
    _, _, xt, yt = train_test_split(x, y)
    g = fm.graphs["full"]
    ev = make_evaluator(g.inference_onnx, g.manifest, xt, yt)
    rc = RoundConfig(min_devices=a.devices, round_timeout=120, uplink="int8", downlink="int8")
    eng = RoundEngine(fm, FedAvg(), rc, ev)
    loaded = _rss_mb()
    cpu0 = time.process_time()
    tc = TransportConfig(url=a.url, fleet="bench")
    svc = CoordinatorService(
        eng,
        tc,
        a.rounds,
        checkpoint=Path(a.work) / "ck.npz",
        metrics=MetricsWriter(None, None),
        wait_timeout=120,
    )
    ms = svc.run()
    cpu = time.process_time() - cpu0  # includes waiting for devices: an upper bound
    print(
        json.dumps(
            {
                "coordinator_cpu_per_round": cpu / max(1, len(ms)),
                "idle_rss_mb": idle,
                "loaded_rss_mb": loaded,
                "peak_rss_mb": _rss_mb(),
                "rounds": [m.to_dict() for m in ms],
            }
        )
    )


def role_agents(a: argparse.Namespace) -> None:
    from device_agent.agent import AgentService, DeviceWorker
    from edgefed.transport import TransportConfig

    tc = TransportConfig(url=a.url, fleet="bench", backoff_min=0.2, backoff_max=2.0)
    agents = [
        AgentService(DeviceWorker(f"b{i:03d}", x, y, Path(a.work) / f"b{i:03d}", durable=True), tc)
        for i, (x, y) in enumerate(_data(a.devices, 16))
    ]
    threads = [ag.start_thread() for ag in agents]
    Path(a.work, "agents.ready").write_text("1")
    Path(a.work, "stop").parent.mkdir(exist_ok=True)
    while not Path(a.work, "stop").exists():
        time.sleep(0.2)
    for ag in agents:
        ag.stop()
    for t in threads:
        t.join(timeout=10)
    per_round: dict[int, float] = {}
    for ag in agents:
        for rnd, _wall, cpu in ag.worker.train_log:
            per_round[rnd] = per_round.get(rnd, 0.0) + cpu
    print(json.dumps({"train_seconds": per_round}))


def inprocess_baseline(fm, devices: int, rounds: int) -> float:
    """Median round wall time through the same engine + workers without any broker."""
    from device_agent.agent import DeviceWorker
    from edgefed.coordinator.rounds import RoundConfig, RoundEngine
    from edgefed.strategies import FedAvg

    eng = RoundEngine(fm, FedAvg(), RoundConfig(uplink="int8", downlink="int8"))
    with tempfile.TemporaryDirectory() as d:
        ws = {
            f"b{i:03d}": DeviceWorker(f"b{i:03d}", x, y, Path(d) / str(i))
            for i, (x, y) in enumerate(_data(devices, 16))
        }
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for dev, task in eng.start_round(sorted(ws)).items():
                eng.handle_update(dev, ws[dev].handle_task(task))
            eng.finish_round()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(hidden: int, a: argparse.Namespace, work: Path) -> dict:
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.zoo.data import load_digits_arrays

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    x, y = load_digits_arrays()
    fm = build_federated_model(net, (torch.from_numpy(x[:8]), torch.from_numpy(y[:8])))
    mdir = work / f"model-{hidden}"
    fm.save(mdir)
    from _util import start_mosquitto

    mosq, port = start_mosquitto(work, f"mosquitto-{hidden}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = f"mqtt://127.0.0.1:{port}"
    aw = work / f"agents-{hidden}"
    aw.mkdir()
    common = ["--url", url, "--devices", str(a.devices), "--rounds", str(a.rounds)]
    try:
        time.sleep(0.5)
        agents = subprocess.Popen(
            [sys.executable, __file__, "--role", "agents", "--work", str(aw), *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        while not (aw / "agents.ready").exists():
            time.sleep(0.1)
        coord = subprocess.run(
            [
                sys.executable,
                __file__,
                "--role",
                "coordinator",
                "--work",
                str(work),
                "--model-dir",
                str(mdir),
                *common,
            ],
            capture_output=True,
            env=env,
            text=True,
            timeout=600,
        )
        (aw / "stop").write_text("1")
        aout, _ = agents.communicate(timeout=60)
    finally:
        mosq.terminate()
        mosq.wait(timeout=10)
    if coord.returncode != 0:
        raise RuntimeError(f"coordinator failed: {coord.stderr[-2000:]}")
    c = json.loads(coord.stdout.strip().splitlines()[-1])
    tr = {int(k): v for k, v in json.loads(aout.strip().splitlines()[-1])["train_seconds"].items()}
    walls = [r["wall_seconds"] for r in c["rounds"]]
    trains = [tr.get(r["round"], 0.0) for r in c["rounds"]]
    # Devices train in parallel threads (onnxruntime releases the GIL): the least wall time
    # their training can take on this machine is its summed CPU time over the cores.
    cores = os.cpu_count() or 1
    over = [w - t / cores for w, t in zip(walls, trains, strict=True)]
    # (ck.npz is reused across models: remove so the next model starts fresh)
    (work / "ck.npz").unlink(missing_ok=True)
    return {
        "hidden": hidden,
        "params": fm.num_params,
        "model_mb": 4 * fm.num_params / 2**20,
        "round_wall_s": statistics.median(walls),
        "train_s": statistics.median(trains),
        "overhead_s": statistics.median(over),
        "inprocess_round_s": inprocess_baseline(fm, a.devices, a.rounds),
        "participants": [r["participants"] for r in c["rounds"]],
        "bytes_down_per_round": c["rounds"][-1]["bytes_down"],
        "bytes_up_per_round": c["rounds"][-1]["bytes_up"],
        "idle_rss_mb": c["idle_rss_mb"],
        "peak_rss_mb": c["peak_rss_mb"],
        "loaded_rss_mb": c["loaded_rss_mb"],
        "coordinator_cpu_per_round_s": c["coordinator_cpu_per_round"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["main", "coordinator", "agents"], default="main")
    ap.add_argument("--url")
    ap.add_argument("--work")
    ap.add_argument("--model-dir")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", default="32,1024,16384")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    a = ap.parse_args()
    if a.role == "coordinator":
        role_coordinator(a)
        return 0
    if a.role == "agents":
        role_agents(a)
        return 0
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edgefed-overhead-") as d:
        for h in (int(v) for v in a.hidden.split(",")):
            rows.append(run_one(h, a, Path(d)))
            r = rows[-1]
            print(
                f"  hidden {h}: {r['params']:,} params, round {r['round_wall_s']:.2f}s", flush=True
            )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"\nRound overhead, {a.devices} devices over mosquitto, int8 up/down, median of "
        f"{a.rounds} rounds ({machine}; {time.time() - t0:.0f}s)"
    )
    print(
        f"{'params':>10} {'model MB':>8} {'round s':>8} {'train CPU':>9} {'overhead s':>10} "
        f"{'coord CPU':>9} "
        f"{'in-proc s':>9} {'down/round':>11} {'up/round':>10} {'idle RSS':>9} "
        f"{'ready RSS':>9} {'peak RSS':>9}"
    )
    for r in rows:
        print(
            f"{r['params']:>10,} {r['model_mb']:>8.2f} {r['round_wall_s']:>8.2f} "
            f"{r['train_s']:>9.2f} {r['overhead_s']:>10.2f} "
            f"{r['coordinator_cpu_per_round_s']:>9.2f} {r['inprocess_round_s']:>9.2f} "
            f"{r['bytes_down_per_round']:>11,} {r['bytes_up_per_round']:>10,} "
            f"{r['idle_rss_mb']:>8.0f}M {r['loaded_rss_mb']:>8.0f}M {r['peak_rss_mb']:>8.0f}M"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_overhead.json").write_text(json.dumps({"machine": machine, "rows": rows}))
    print(f"wrote {out}/round_overhead.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
