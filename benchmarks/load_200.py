"""Load: 200 device agents on one machine against a real mosquitto, 10 rounds of a
~1M-parameter model with ``topk:0.01+int8`` updates (error feedback on).

What is real: mosquitto (started here, ``sys_interval 1`` for its $SYS counters), the
coordinator (``CoordinatorService`` + ``RoundEngine`` + FedAvg, in this process, so its peak
RSS is this process's), every agent's MQTT client (own connection, persistent session,
presence with Last Will, flow window, chunked 1 MB int8 task download and reassembly), the
task decode, and the compressed update encode with a real ``ErrorFeedback`` per agent.
What is NOT real: local training. 2 cores cannot train 200 models per round, so each agent
"trains" by taking a fixed, agent-seeded synthetic delta. Agents run as threads, 50 per
worker process (4 processes).

Counts: "sent" = update messages the agents published and the broker acknowledged (PUBACK);
"accepted" = participants summed over the coordinator's round metrics. Nothing lost means
sent == accepted == 200 x rounds, no drops in the metrics, and mosquitto's
``publish/messages/dropped`` unchanged.

Run: ``PYTHONPATH=. python benchmarks/load_200.py [--devices 200 --rounds 10]``; prints a
table, writes benchmarks/out/load_200.json and benchmarks/results/reliability.md (the table
part between the LOAD markers). About 1-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    "fc1.weight": (1000, 992),
    "fc1.bias": (1000,),
    "fc2.weight": (10, 1000),
    "fc2.bias": (10,),
}
FLEET = "load"
SYS_TOPICS = [
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/publish/messages/dropped",
    "$SYS/broker/clients/connected",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def transport(url: str):
    from edgefed.transport import TransportConfig

    # protocol "5": skip the per-client probe; window 50 per client keeps 200 clients x
    # in-flight far below the broker queue limit set below.
    return TransportConfig(url=url, fleet=FLEET, protocol="5", inflight_window=50, keepalive=60)


# ---------------------------------------------------------------- agent worker process
class LightAgent:
    """One device: real MQTT client, real decode of the task, real compressed encode with
    error feedback; a fixed synthetic delta instead of training."""

    def __init__(self, dev: str, url: str, seed: int) -> None:
        from edgefed.codec import ErrorFeedback, ModelSchema
        from edgefed.transport import Topics
        from edgefed.transport.client import MqttClient

        self.dev = dev
        self.topics = Topics(FLEET)
        self.schema = ModelSchema(SHAPES)
        self.ef = ErrorFeedback(self.schema)
        r = np.random.default_rng(seed)
        self.delta = {
            k: (r.standard_normal(s) * 1e-3).astype(np.float32) for k, s in SHAPES.items()
        }
        will = json.dumps({"status": "offline", "device_id": dev}).encode()
        self.client = MqttClient(
            transport(url),
            dev,
            subscriptions=[self.topics.task(dev)],
            will=(self.topics.presence(dev), will),
        )
        self.sent = 0
        self.errors = 0

    def handle(self, data: bytes) -> None:
        from edgefed.codec import CompressionSpec, UpdateMeta, decode_update, encode_update
        from edgefed.transport.message import pack, unpack

        header, parts = unpack(data)
        rnd = header["round"]
        decode_update(parts["weights"], self.schema).to_dense()  # what a device must do
        meta = UpdateMeta(rnd, self.dev, 100, header["model_version"], kind="delta")
        payload = encode_update(self.delta, meta, CompressionSpec.parse(header["uplink"]), self.ef)
        h = {
            "round": rnd,
            "device_id": self.dev,
            "update_id": f"{self.dev}-{rnd}",
            "num_samples": 100,
            "loss": 0.5,
        }
        self.client.publish(self.topics.update(self.dev), pack(h, {"update": payload}))
        self.sent += 1

    def announce(self) -> None:
        msg = {"status": "online", "device_id": self.dev, "capabilities": {"profile": "load"}}
        self.client.publish(self.topics.presence(self.dev), json.dumps(msg).encode(), retain=True)


def worker_main(first: int, n: int, url: str) -> None:
    agents = [LightAgent(f"dev-{i:03d}", url, i) for i in range(first, first + n)]
    for a in agents:
        a.client.start(timeout=60)
        a.announce()
    stop = threading.Event()

    def serve() -> None:  # one thread serves all agents of this process: the work is CPU
        while not stop.is_set():
            idle = True
            for a in agents:
                m = a.client.get(timeout=0)
                if m is not None:
                    idle = False
                    try:
                        a.handle(m.payload)
                    except Exception as e:  # count, never die
                        a.errors += 1
                        print(f"{a.dev}: {e}", file=sys.stderr)
            if idle:
                time.sleep(0.01)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sys.stdin.read()  # the parent closes stdin when the run is over
    stop.set()
    t.join(10)
    for a in agents:
        a.client.flush(10)
    out = {
        "sent": sum(a.sent for a in agents),
        "errors": sum(a.errors for a in agents),
        "acked_pending": sum(a.client.window.inflight for a in agents),
    }
    for a in agents:
        a.client.stop(flush=1)
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- main: broker + coordinator
class SysStats:
    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.values: dict[str, float] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="load-sys")
        self.c.on_connect = lambda c, u, f, rc, p: [c.subscribe(t) for t in SYS_TOPICS]
        self.c.on_message = lambda c, u, m: self.values.__setitem__(m.topic, float(m.payload))
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()

    def snapshot(self, wait: float = 2.2) -> dict[str, float]:
        time.sleep(wait)  # sys_interval is 1 s: a fresh value of every counter
        return {k.rsplit("broker/", 1)[1]: v for k, v in self.values.items()}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def fake_model():
    """A FederatedModel without torch: the agents never run the graph (see module doc)."""
    from edgefed.coordinator.model import FederatedModel, GraphBundle

    r = np.random.default_rng(0)
    initial = {k: (r.standard_normal(s) * 0.05).astype(np.float32) for k, s in SHAPES.items()}
    manifest = {"trainable": list(SHAPES), "updated_buffers": []}
    return FederatedModel(initial, {"full": GraphBundle("full", b"synthetic", manifest, b"")})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--worker", nargs=3, type=str, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return

    from _util import machine, table, write_json

    from edgefed.coordinator.metrics import MetricsWriter
    from edgefed.coordinator.rounds import RoundConfig, RoundEngine
    from edgefed.coordinator.service import CoordinatorService
    from edgefed.strategies import FedAvg

    tmp = Path(tempfile.mkdtemp(prefix="edgefed-load-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "sys_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
        "message_size_limit 0\nmax_connections -1\n"
    )
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        time.sleep(0.5)
        url = f"mqtt://127.0.0.1:{port}"
        stats = SysStats(port)
        per = -(-args.devices // args.procs)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        for i in range(args.procs):
            n = min(per, args.devices - i * per)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(i * per), str(n), url],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        fm = fake_model()
        cfg = RoundConfig(
            min_devices=args.devices, uplink="topk:0.01+int8", downlink="int8", round_timeout=120.0
        )
        engine = RoundEngine(fm, FedAvg(), cfg)
        svc = CoordinatorService(
            engine,
            transport(url),
            args.rounds,
            metrics=MetricsWriter(tmp / "metrics.jsonl", None),
            wait_timeout=180,
        )
        t0 = time.monotonic()
        svc.start_thread()
        # the first round starts once all devices are online; measure broker traffic from here
        while engine.open_round is None and not svc.finished.is_set():
            time.sleep(0.05)
        startup = time.monotonic() - t0
        s0, ts0 = stats.snapshot(0), time.monotonic()
        svc.finished.wait()
        wall = time.monotonic() - ts0
        s1 = stats.snapshot()
        if svc.error is not None:
            raise svc.error
        counts = []
        for p in procs:
            out, _ = p.communicate("", timeout=60)
            counts.append(json.loads(out.strip().splitlines()[-1]))
        stats.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    hist = engine.history
    sent = sum(c["sent"] for c in counts)
    accepted = sum(h["participants"] for h in hist)
    drops = sum(sum(h["dropped"].values()) for h in hist)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    d = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
    rows = [
        [
            h["round"],
            h["participants"],
            f"{h['wall_seconds']:.2f}",
            f"{h['aggregate_seconds']:.2f}",
            f"{h['bytes_up'] / 1e6:.2f}",
            f"{h['bytes_down'] / 1e6:.1f}",
        ]
        for h in hist
    ]
    per_round = table(["round", "accepted", "wall s", "aggregate s", "up MB", "down MB"], rows)
    walls = [h["wall_seconds"] for h in hist]
    summary_rows = [
        ["devices x rounds", f"{args.devices} x {len(hist)}"],
        ["model parameters", f"{fm.num_params:,}"],
        ["round wall time, median / max (s)", f"{np.median(walls):.2f} / {max(walls):.2f}"],
        ["coordinator peak RSS (MB) (process also ran the $SYS reader)", f"{peak_rss:.0f}"],
        [
            "broker messages/s received / sent",
            f"{d.get('messages/received', 0) / wall:.0f} / {d.get('messages/sent', 0) / wall:.0f}",
        ],
        [
            "broker MB/s received / sent",
            f"{d.get('bytes/received', 0) / wall / 1e6:.1f} / "
            f"{d.get('bytes/sent', 0) / wall / 1e6:.1f}",
        ],
        [
            "broker publish/messages/dropped during the run",
            f"{d.get('publish/messages/dropped', 0):.0f}",
        ],
        [
            "updates sent (PUBACKed) / accepted / expected",
            f"{sent} / {accepted} / {args.devices * args.rounds}",
        ],
        ["updates dropped by the coordinator", str(drops)],
        ["agent errors", str(sum(c["errors"] for c in counts))],
        ["start-up until round 1 (s)", f"{startup:.1f}"],
    ]
    summary = table(["measure", "value"], summary_rows)
    lost = not (
        sent == accepted == args.devices * args.rounds
        and drops == 0
        and d.get("publish/messages/dropped", 0) == 0
    )
    print(f"machine: {machine()}\n\n{summary}\n\n{per_round}")
    print("\nNOTHING LOST" if not lost else "\nLOSS DETECTED")
    write_json(
        "load_200",
        {
            "machine": machine(),
            "devices": args.devices,
            "rounds": args.rounds,
            "params": fm.num_params,
            "history": hist,
            "peak_rss_mb": peak_rss,
            "broker_delta": d,
            "wall_s": wall,
            "sent": sent,
            "accepted": accepted,
            "dropped": drops,
            "lost": lost,
            "agent_counts": counts,
        },
    )
    res = ROOT / "benchmarks" / "results" / "reliability.md"
    block = (
        f"<!-- LOAD -->\nMachine: {machine()}. Command: `PYTHONPATH=. python "
        f"benchmarks/load_200.py` (synthetic local training: see the script's docstring).\n\n"
        f"{summary}\n\n{per_round}\n\n{'Nothing lost.' if not lost else 'LOSS DETECTED.'}\n"
        "<!-- /LOAD -->"
    )
    text = (
        res.read_text()
        if res.exists()
        else "# Reliability and load (issue 7)\n\n<!-- LOAD -->\n<!-- /LOAD -->\n"
    )
    a, b = text.index("<!-- LOAD -->"), text.index("<!-- /LOAD -->") + len("<!-- /LOAD -->")
    res.write_text(text[:a] + block + text[b:])
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
