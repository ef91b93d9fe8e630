"""edgefed sync and async (FedBuff) vs Flower FedAvg on the same digits task (issue 15, item 4).

Same MLP (edgefed.zoo.models.digits_mlp, 64-128-10), same initial weights, same Dirichlet split
(edgefed.zoo.data.digits_federated), same local training (1 epoch SGD lr 0.05 batch 16, no
momentum), same sample-weighted FedAvg, same rounds, all devices every round, evaluation
of the global model on the same held-out set after every round.

Both sides run as real processes on loopback:

* edgefed: mosquitto, ``python -m edgefed coordinator`` (its own process), and one process
  holding the N device agents as threads (``AgentService``: onnxruntime step graph, codec,
  MQTT). Uplink spec ``--spec`` (default ``topk:0.05+int8``), downlink float32.
  Run twice: synchronous rounds, and asynchronous buffered aggregation (``[coordinator]
  mode = "async"``, ``buffer_size`` ``--async-buffer``, ``max_staleness``
  ``--async-staleness``, every online device holding a task) producing
  ``rounds * devices / buffer_size`` model versions: the same number of device updates as
  the synchronous run and Flower.
* Flower ``flwr==1.42.0`` in its own venv (``--flwr-venv``; created with
  ``--system-site-packages`` and ``pip install flwr==1.42.0`` when missing, so torch comes
  from the system): a server process (``flwr.server.start_server``, FedAvg, server-side
  evaluation) and one process holding the N clients as threads (``start_client``,
  ``NumPyClient`` training the torch MLP). Why the compat gRPC API and not a ServerApp /
  ClientApp: those run under SuperLink + SuperNodes + ``flwr run`` of a packaged app;
  start_server/start_client still ship in 1.42 and put the same FedAvg on the same gRPC wire
  with one server process, which is what is measured here.

Measured per run: final accuracy; uplink bytes per round *on the wire* (every byte the
device side writes to its TCP connections, through a counting proxy of ours: messages,
framing, MQTT / HTTP/2 + gRPC headers, keep-alives, connection set-up; divided by rounds,
or model versions in async mode; and per accepted update); wall-clock per round / model
version (server/coordinator side, median: tasks out, or buffer opened, -> model aggregated
and evaluated); peak RSS of the coordinator / server process (its VmHWM,
polled); client install size (files of the client's dependency closure). Seeds are
interleaved (edgefed sync, edgefed async, Flower per seed). Prints a table, writes
benchmarks/out/flower_compare.json.

    python benchmarks/flower_compare.py --seeds 0,1,2 --rounds 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FLWR_VERSION = "1.42.0"
HERE = Path(__file__).resolve()


# ---- a counting TCP proxy (device side -> server) ----------------------------------------
class CountingProxy:
    """Forwards 127.0.0.1:<port> to ``target``; counts bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0  # device -> server
        self.down = 0
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            for a, b, up in ((c, s, True), (s, c, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_rss(p: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for ``p``; returns (exit code, peak RSS in MB). The peak is the process's own
    VmHWM, polled until it exits: wait4's ru_maxrss is not usable here because Linux keeps
    the high-water mark across fork + exec, so every child would report at least this
    benchmark's own RSS (~500 MB with torch loaded)."""
    deadline = time.monotonic() + timeout
    peak = 0.0
    while time.monotonic() < deadline:
        peak = max(peak, _vm_hwm_mb(p.pid))
        if p.poll() is not None:
            return p.returncode, peak
        time.sleep(0.05)
    p.kill()
    raise TimeoutError(f"{p.args[:3]} did not finish in {timeout}s")


def _stop(procs: list[subprocess.Popen[bytes]], proxy: CountingProxy | None) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    if proxy is not None:
        proxy.close()


# ---- the shared task -------------------------------------------------------------------
def prepare(work: Path, seed: int, devices: int, alpha: float, hidden: int) -> None:
    """Data files, initial weights (npz, in parameter order) and the exported edgefed model."""
    import numpy as np
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.zoo.data import digits_federated
    from edgefed.zoo.models import digits_mlp

    devs, (xte, yte) = digits_federated(devices, alpha=alpha, seed=seed)
    for i, (x, y) in enumerate(devs):
        np.savez(work / f"data-{i}.npz", x=x, y=y)
    np.savez(work / "test.npz", x=xte, y=yte)
    torch.manual_seed(seed)
    net = digits_mlp(hidden)
    init = [p.detach().numpy().copy() for p in net.parameters()]
    np.savez(work / "init.npz", *init)
    x0, y0 = devs[0]
    fm = build_federated_model(net, (torch.from_numpy(x0[:8]), torch.from_numpy(y0[:8])))
    fm.save(work / "model")
    for name, p in net.named_parameters():  # both sides start from the same weights
        assert np.array_equal(np.asarray(fm.initial[name]), p.detach().numpy()), name


# ---- edgefed side ----------------------------------------------------------------------
AGENTS_SRC = """
import sys, signal, threading, numpy as np
from device_agent.agent import AgentService, DeviceWorker
from edgefed.transport import TransportConfig
work, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tc = TransportConfig(url=url, fleet="cmp", backoff_min=0.2, backoff_max=2.0)
agents = []
for i in range(n):
    with np.load(f"{work}/data-{i}.npz") as z:
        w = DeviceWorker(f"dev-{i:03d}", z["x"], z["y"], f"{work}/state/{i}", durable=False)
    agents.append(AgentService(w, tc))
threads = [a.start_thread() for a in agents]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
for a in agents:
    a.stop()
for t in threads:
    t.join(10)
"""


def run_edgefed(
    work: Path, rounds: int, devices: int, spec: str, asynchronous: dict[str, int] | None = None
) -> dict[str, object]:
    """One edgefed run; ``asynchronous``: ``{"buffer_size", "max_staleness"}`` for FedBuff
    (``rounds`` then counts model versions)."""
    from _util import start_mosquitto

    mosq, port = start_mosquitto(work)
    procs = [mosq]
    proxy = None
    try:
        wait_port(port)
        proxy = CountingProxy(("127.0.0.1", port))
        metrics = work / "metrics.jsonl"
        mode = "".join(f"{k} = {v}\n" for k, v in (asynchronous or {}).items())
        if asynchronous:
            mode = f'mode = "async"\n{mode}'
        (work / "coordinator.toml").write_text(
            f"[coordinator]\nrounds = {rounds}\nmin_devices = {devices}\nfraction = 1.0\n{mode}"
            f'round_timeout = 120\nwait_timeout = 120\nmetrics = "{metrics}"\n'
            f'[model]\ndir = "{work / "model"}"\n'
            "[training]\nlocal_epochs = 1\nbatch_size = 16\nlr = 0.05\n"
            f'[compression]\nuplink = "{spec}"\ndownlink = "none"\n'
            f'[evaluation]\ndataset = "{work / "test.npz"}"\n'
            f'[transport]\nurl = "mqtt://127.0.0.1:{port}"\nfleet = "cmp"\n'
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        log = open(work / "edgefed.log", "wb")  # noqa: SIM115 (closed below)
        t0 = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "edgefed",
            "coordinator",
            "--config",
            str(work / "coordinator.toml"),
        ]
        coord = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        procs.append(coord)
        url = f"mqtt://127.0.0.1:{proxy.port}"
        cmd = [sys.executable, "-c", AGENTS_SRC, str(work), url, str(devices)]
        agents = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        procs.append(agents)
        rc, rss = wait_rss(coord, 1800)
        total = time.monotonic() - t0
        log.close()
        if rc != 0:
            tail = (work / "edgefed.log").read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(  # the log's folder is a temporary one: show its end here
                f"edgefed coordinator exited {rc}; end of {work / 'edgefed.log'}:\n"
                + "\n".join(tail)
            )
        hist = [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]
        accepted = sum(int(h["participants"]) for h in hist)
        return {
            "accuracy": hist[-1]["accuracy"],
            "uplink_wire_per_round": proxy.up / rounds,
            "uplink_wire_per_update": proxy.up / accepted,
            "accepted_updates": accepted,
            "dropped_updates": sum(sum(h["dropped"].values()) for h in hist),
            "uplink_messages_per_round": statistics.mean(h["bytes_up"] for h in hist),
            "round_s_median": statistics.median(h["wall_seconds"] for h in hist),
            "total_s": total,
            "server_peak_rss_mb": rss,
            "accuracy_curve": [h["accuracy"] for h in hist],
        }
    finally:
        _stop(procs, proxy)


# ---- Flower side (roles run by the Flower venv's python) ---------------------------------
def _torch_mlp(work: Path):
    import numpy as np
    import torch

    with np.load(work / "init.npz") as z:
        init = [z[f"arr_{i}"] for i in range(len(z.files))]
    hidden = init[0].shape[0]
    net = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    set_params(net, init)
    return net, init


def set_params(net, arrays) -> None:
    import torch

    with torch.no_grad():
        for p, a in zip(net.parameters(), arrays, strict=True):
            p.copy_(torch.from_numpy(a))


def flower_server(work: Path, port: int, rounds: int, devices: int) -> None:
    import flwr
    import numpy as np
    import torch

    net, init = _torch_mlp(work)
    with np.load(work / "test.npz") as z:
        xte, yte = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    times: dict[int, float] = {}
    curve: list[dict[str, float]] = []

    def evaluate(rnd: int, arrays, config):
        set_params(net, arrays)
        with torch.no_grad():
            out = net(xte)
            loss = float(torch.nn.functional.cross_entropy(out, yte))
            acc = float((out.argmax(1) == yte).float().mean())
        if rnd > 0:
            curve.append({"round": rnd, "accuracy": acc, "seconds": time.monotonic() - times[rnd]})
        return loss, {"accuracy": acc}

    class Timed(flwr.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            times[server_round] = time.monotonic()  # tasks out
            return super().configure_fit(server_round, parameters, client_manager)

    strategy = Timed(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=devices,
        min_available_clients=devices, min_evaluate_clients=0,
        initial_parameters=flwr.common.ndarrays_to_parameters(init), evaluate_fn=evaluate,
    )  # fmt: skip
    flwr.server.start_server(
        server_address=f"127.0.0.1:{port}",
        config=flwr.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    (work / "flower_result.json").write_text(json.dumps(curve))


def flower_clients(work: Path, address: str, devices: int) -> None:
    import flwr
    import numpy as np
    import torch

    torch.set_num_threads(1)

    class DigitsClient(flwr.client.NumPyClient):
        def __init__(self, i: int) -> None:
            self.net, _ = _torch_mlp(work)
            with np.load(work / f"data-{i}.npz") as z:
                self.x, self.y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
            self.rnd = 0
            self.i = i

        def get_parameters(self, config):
            return [p.detach().numpy().copy() for p in self.net.parameters()]

        def fit(self, parameters, config):
            set_params(self.net, parameters)
            opt = torch.optim.SGD(self.net.parameters(), lr=0.05)
            self.rnd += 1
            g = torch.Generator().manual_seed(1000 * self.rnd + self.i)
            perm = torch.randperm(len(self.x), generator=g)
            for s in range(0, len(perm), 16):  # 1 local epoch, batch 16
                b = perm[s : s + 16]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(self.net(self.x[b]), self.y[b]).backward()
                opt.step()
            return self.get_parameters(config), len(self.x), {}

    threads = []
    for i in range(devices):
        kw = {"server_address": address, "client": DigitsClient(i).to_client(), "insecure": True}
        threads.append(threading.Thread(target=flwr.client.start_client, kwargs=kw, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flwr_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating the Flower venv {venv} (flwr=={FLWR_VERSION})", flush=True)
        venv_cmd = [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]
        subprocess.run(venv_cmd, check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"flwr=={FLWR_VERSION}"], check=True)
    out = subprocess.run([str(py), "-c", "import flwr; print(flwr.__version__)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    if out.stdout.strip() != FLWR_VERSION:
        raise RuntimeError(f"{venv}: flwr {out.stdout.strip()} installed, {FLWR_VERSION} needed")
    return py


def run_flower(py: Path, work: Path, rounds: int, devices: int) -> dict[str, object]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRPC_VERBOSITY="ERROR")
    log = open(work / "flower.log", "wb")  # noqa: SIM115 (closed below)
    procs: list[subprocess.Popen[bytes]] = []
    proxy = None
    try:
        t0 = time.monotonic()
        server = subprocess.Popen(
            [str(py), str(HERE), "--role", "flower-server", "--work", str(work),
             "--port", str(port), "--rounds", str(rounds), "--devices", str(devices)],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        procs.append(server)
        wait_port(port, 120)
        proxy = CountingProxy(("127.0.0.1", port))
        clients = subprocess.Popen(
            [str(py), str(HERE), "--role", "flower-clients", "--work", str(work),
             "--address", f"127.0.0.1:{proxy.port}", "--devices", str(devices)],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        procs.append(clients)
        rc, rss = wait_rss(server, 1800)
        total = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"Flower server exited {rc}: see {work / 'flower.log'}")
        curve = json.loads((work / "flower_result.json").read_text())
        return {
            "accuracy": curve[-1]["accuracy"],
            "uplink_wire_per_round": proxy.up / rounds,
            "uplink_wire_per_update": proxy.up / (rounds * devices),
            "accepted_updates": rounds * devices,
            "round_s_median": statistics.median(c["seconds"] for c in curve),
            "total_s": total,
            "server_peak_rss_mb": rss,
            "accuracy_curve": [c["accuracy"] for c in curve],
        }
    finally:
        log.close()
        _stop(procs, proxy)


# ---- install size ----------------------------------------------------------------------
SIZE_SRC = """
import sys, importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
seen, todo, total = set(), [canonicalize_name(n) for n in sys.argv[1:]], 0
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    try:
        d = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for f in d.files or []:
        try:
            total += f.locate().stat().st_size
        except OSError:
            pass
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(canonicalize_name(req.name))
print(total, ",".join(sorted(seen)))
"""


def closure_mb(py: str | Path, roots: list[str]) -> tuple[float, str]:
    out = subprocess.run([str(py), "-c", SIZE_SRC, *roots], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return int(out[0]) / 2**20, out[1] if len(out) > 1 else ""


# ---- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="bench", choices=["bench", "flower-server", "flower-clients"])
    ap.add_argument("--work")
    ap.add_argument("--port", type=int)
    ap.add_argument("--address")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--spec", default="topk:0.05+int8", help="edgefed uplink compression spec")
    ap.add_argument("--async-buffer", type=int, default=10, help="edgefed async buffer_size")
    ap.add_argument("--async-staleness", type=int, default=20, help="edgefed max_staleness")
    ap.add_argument("--flwr-venv", default=os.environ.get("FLWR_VENV", "/tmp/flwr-venv"))
    a = ap.parse_args(argv)
    if a.role == "flower-server":
        flower_server(Path(a.work), a.port, a.rounds, a.devices)
        return 0
    if a.role == "flower-clients":
        flower_clients(Path(a.work), a.address, a.devices)
        return 0

    sys.path.insert(0, str(HERE.parent))
    from _util import machine, table, write_json

    py = flwr_python(Path(a.flwr_venv))
    seeds = [int(s) for s in a.seeds.split(",")]
    runs: dict[str, list[dict[str, object]]] = {"edgefed": [], "edgefed-async": [], "flower": []}
    versions = a.rounds * a.devices // a.async_buffer  # as many updates as the sync rounds
    fedbuff = {"buffer_size": a.async_buffer, "max_staleness": a.async_staleness}
    with tempfile.TemporaryDirectory(prefix="flower-cmp-") as tmp:
        for seed in seeds:
            for system in runs:  # interleaved
                work = Path(tmp) / f"{system}-{seed}"
                work.mkdir()
                prepare(work, seed, a.devices, a.alpha, a.hidden)
                print(f"seed {seed}: {system} ...", flush=True)
                if system == "edgefed":
                    r = run_edgefed(work, a.rounds, a.devices, a.spec)
                elif system == "edgefed-async":
                    r = run_edgefed(work, versions, a.devices, a.spec, fedbuff)
                else:
                    r = run_flower(py, work, a.rounds, a.devices)
                r["seed"] = seed
                runs[system].append(r)
                print(f"  acc {r['accuracy']:.4f}  up/round {r['uplink_wire_per_round']:,.0f} B  "
                      f"round {r['round_s_median']:.3f} s  rss {r['server_peak_rss_mb']:.0f} MB",
                      flush=True)  # fmt: skip
    ef_mb, ef_dists = closure_mb(sys.executable, ["edgefed"])
    fl_mb, fl_dists = closure_mb(py, ["flwr"])
    torch_mb, _ = closure_mb(py, ["torch"])

    def mean(system: str, key: str) -> float:
        return statistics.mean(float(r[key]) for r in runs[system])  # type: ignore[arg-type]

    cols = ("edgefed", "edgefed-async", "flower")

    def row(label: str, key: str, fmt: str, vs: str, target: str) -> list[str]:
        """One measure for each column, then each edgefed column against Flower."""
        cells = [label, *(fmt.format(mean(c, key)) for c in cols)]
        fl = mean("flower", key)
        for c in cols[:2]:
            v = mean(c, key)
            cells.append({"pp": f"{100 * (v - fl):+.2f} pp", "fewer": f"{fl / v:.1f}x fewer",
                          "x": f"{fl / v:.2f}x"}.get(vs, ""))  # fmt: skip
        return [*cells, target]

    rows = [
        row("final accuracy (mean of seeds)", "accuracy", "{:.2%}", "pp", "<= 1 pp below"),
        row("uplink bytes/round (async: /version) on the wire", "uplink_wire_per_round",
            "{:,.0f}", "fewer", ">= 25x fewer"),
        row("uplink bytes per accepted update on the wire", "uplink_wire_per_update",
            "{:,.0f}", "fewer", ""),
        row("wall-clock per round / version (median)", "round_s_median", "{:.3f} s", "x",
            "edgefed <= Flower"),
        row("coordinator / server peak RSS", "server_peak_rss_mb", "{:.0f} MB", "", ""),
        row("whole run (incl. start-up)", "total_s", "{:.1f} s", "", ""),
        ["client install (dependency closure)", f"{ef_mb:.0f} MB", f"{ef_mb:.0f} MB",
         f"{fl_mb:.0f} MB (+ torch {torch_mb:.0f} MB to train)", "", "", ""],
    ]  # fmt: skip
    print(f"\n{a.devices} devices, digits MLP 64-{a.hidden}-10, Dirichlet alpha {a.alpha}, "
          f"{a.rounds} rounds (async: {versions} versions of buffer {a.async_buffer}, "
          f"max_staleness {a.async_staleness}), seeds {seeds}; edgefed uplink {a.spec}, "
          f"Flower float32 (flwr {FLWR_VERSION}); {machine()}")  # fmt: skip
    head = ["measure", "edgefed sync", "edgefed async", "Flower", "sync vs Flower",
            "async vs Flower", "target"]  # fmt: skip
    print(table(head, rows))
    path = write_json("flower_compare", {
        "machine": machine(), "flwr": FLWR_VERSION, "args": vars(a), "runs": runs,
        "install_mb": {"edgefed": ef_mb, "flwr": fl_mb, "torch": torch_mb},
        "install_dists": {"edgefed": ef_dists, "flwr": fl_dists},
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
