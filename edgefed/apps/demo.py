"""``edgefed demo``: the whole life of a model in one command.

federate -> export (distil + prune + int8) -> sign -> canary -> promote -> predict on a device.

Starts an embedded MQTT broker (amqtt, in-process; ``--broker mqtt://host:port`` uses a real
one), a coordinator service and ``--devices`` device agents (threads, each with its own MQTT
connection, on-disk state and onnxruntime session) on sklearn digits split non-IID by
Dirichlet label skew. An ephemeral Ed25519 key (written under ``--out``) signs every task and
the bundle, so agents run with signature checks on, exactly as a secured fleet. After
``--rounds`` rounds the federated model (the coordinator's artefact) is exported by the same
code as ``edgefed export --run``, published to a canary group (a quarter of each device's data
is held out for the canary's evaluation) and promoted to the fleet if the canaries accept
it (or rolled back), then ``edgefed-agent predict`` runs the deployed bundle on one device.
Prints per-round accuracy, the candidates table, the fp32-vs-bundle table and each stage's
time, writes metrics (JSON lines) and a PNG (accuracy vs round and vs uplink bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=8, help="device agents (threads)")
    p.add_argument("--rounds", type=int, default=40, help="federated rounds")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="built-in model")
    p.add_argument("--compression", default="topk:0.1+int8", help="uplink compression spec")
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy name")
    p.add_argument("--lr", type=float, default=0.1, help="device learning rate")
    p.add_argument("--weak", type=int, default=2, help="devices that train only the head")
    p.add_argument("--broker", default="embedded", help="'embedded' or mqtt://host:port")
    p.add_argument("--seed", type=int, default=0, help="seeds data split, model and export")
    p.add_argument("--out", default="edgefed-demo", help="output directory")
    p.add_argument(
        "--canaries", type=int, default=None, help="devices in the canary group (default half)"
    )
    p.add_argument(
        "--budget", type=float, default=1.0,
        help="accuracy budget in pp: export candidates and the canary gate",
    )  # fmt: skip
    p.add_argument(
        "--no-rollout", action="store_true", help="federate only (no export, canary, predict)"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch/onnx export chatter (warnings, onnxscript's logging) is not the demo's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = ("torch", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
        noisy = [logging.getLogger(n) for n in names]
        levels = [lg.level for lg in noisy]
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(noisy, levels, strict=True):
                lg.setLevel(lv)


class _Fleet:
    """Broker + coordinator + agents of the demo, signed downlink, canary group."""

    def __init__(self, args: argparse.Namespace, out: Path, key: Path) -> None:
        from device_agent.agent import AgentService, DeviceWorker
        from edgefed.bundle.signing import load_signing_key, load_verify_key
        from edgefed.coordinator.metrics import MetricsWriter
        from edgefed.coordinator.model import federated_model_from_config
        from edgefed.coordinator.rounds import RoundConfig, RoundEngine
        from edgefed.coordinator.service import CoordinatorService
        from edgefed.security.downlink import DownlinkSigner, DownlinkVerifier
        from edgefed.simulation import make_evaluator
        from edgefed.strategies import make_strategy
        from edgefed.transport import TransportConfig
        from edgefed.transport.broker import EmbeddedBroker
        from edgefed.zoo.data import digits_federated

        image = args.model == "cnn"
        devs, self.test = digits_federated(args.devices, args.alpha, args.seed, image=image)
        model = {"builtin": f"digits_{args.model}", "head": "last" if args.weak else None}
        with _quiet():  # the built-in by name: the artefact knows how to rebuild it
            fm = federated_model_from_config(model, seed=args.seed)
        fm.evaluation = self.test  # the artefact carries it: export calibrates and measures
        self.emb = EmbeddedBroker().start() if args.broker == "embedded" else None
        self.url = self.emb.url if self.emb else args.broker
        self.fleet = f"demo-{int(time.time() * 1000) % 10**9}"
        tc = TransportConfig(url=self.url, fleet=self.fleet, backoff_min=0.2, backoff_max=5.0)
        g = fm.graphs["full"]
        cfg = RoundConfig(
            min_devices=args.devices, lr=args.lr, uplink=args.compression, downlink="int8",
            round_timeout=120.0, seed=args.seed,
        )  # fmt: skip
        evaluate = make_evaluator(g.inference_onnx, g.manifest, *self.test)
        engine = RoundEngine(fm, make_strategy(args.strategy), cfg, evaluate)
        self.state = out / "state"
        self.metrics = out / f"metrics-{args.compression.replace(':', '_').replace('+', '_')}.jsonl"
        self.metrics.unlink(missing_ok=True)
        writer = MetricsWriter(self.metrics, None)
        writer.progress = sys.stdout
        vk = load_verify_key(Path(f"{key}.pub"))
        self.svc = CoordinatorService(
            engine, tc, args.rounds, checkpoint=self.state / "coordinator.ckpt.npz",
            metrics=writer, wait_timeout=120.0, signer=DownlinkSigner(load_signing_key(key)),
        )  # fmt: skip
        n_canary = args.canaries if args.canaries is not None else max(1, args.devices // 2)
        self.ids = [f"dev-{i:03d}" for i in range(args.devices)]
        self.canaries = self.ids[:n_canary]
        self.holdout: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.agents = []
        for i, (d, (x, y)) in enumerate(zip(self.ids, devs, strict=True)):
            cut = max(1, len(x) * 3 // 4)  # a quarter held out: what a canary evaluates on
            self.holdout[d] = (x[cut:], y[cut:])
            w = DeviceWorker(d, x[:cut], y[:cut], self.state / d, persist_model=True)
            agent = AgentService(
                w, tc, profile="weak" if i < args.weak else None,
                verifier=DownlinkVerifier(vk), bundle_key=f"{key}.pub",
                groups=("all", "canary") if d in self.canaries else ("all",),
                holdout=self.holdout[d] if len(x) > cut else None,
            )  # fmt: skip
            self.agents.append(agent)
        self.threads = [a.start_thread() for a in self.agents]

    def federate(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.svc.run()]

    def stop(self) -> None:
        self.svc.stop()
        for a in self.agents:
            a.stop()
        for t in self.threads:
            t.join(timeout=15)
        if self.emb:
            self.emb.stop()


def _cli(*argv: str) -> tuple[int, str]:
    """Run one edgefed command in-process (exactly what a user types); its stdout back."""
    from edgefed.apps.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip("\n").splitlines())


def run(args: argparse.Namespace) -> int:
    from edgefed.apps.plot import plot_runs
    from edgefed.bundle.signing import write_keypair
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
    shutil.rmtree(out / "keys", ignore_errors=True)
    key = out / "keys" / "demo.key"
    write_keypair(key)  # ephemeral: signs the downlink and the bundle
    where = "embedded MQTT broker (amqtt)" if args.broker == "embedded" else args.broker
    print(
        f"edgefed demo: {args.devices} devices ({args.weak} head-only), digits non-IID "
        f"(alpha={args.alpha}), {args.rounds} rounds, uplink {args.compression}, via {where}; "
        f"downlink and bundles signed with the ephemeral key {key}",
        flush=True,
    )
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    fleet = _Fleet(args, out, key)
    try:
        print("\n== 1. federate", flush=True)
        hist = fleet.federate()
        timings["federate"] = time.perf_counter() - t0
        png = plot_runs(
            {args.compression: hist}, out / "accuracy.png",
            f"edgefed demo: digits, {args.devices} devices",
        )  # fmt: skip
        last = hist[-1]
        per_update = last["cum_bytes_up"] / max(1, sum(h["participants"] for h in hist))
        print(
            f"final accuracy {100 * last['accuracy']:.1f}% after {last['round']} rounds; "
            f"uplink {last['cum_bytes_up']:,} bytes total, {per_update:,.0f} per update; "
            f"downlink {last['cum_bytes_down']:,} bytes ({timings['federate']:.0f}s)"
        )
        print(f"metrics: {fleet.metrics}   plot: {png}", flush=True)
        if not args.no_rollout:
            rc = _rollout(args, out, key, fleet, timings)
            if rc:
                return rc
    finally:
        fleet.stop()
    timings["total"] = time.perf_counter() - t_all
    print("\nstage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return 0


def _rollout(
    args: argparse.Namespace, out: Path, key: Path, fleet: _Fleet, timings: dict[str, float]
) -> int:
    """Stages 2-6 through the user's own commands: export, verify, publish, predict."""
    bundle, table = out / "model.efb", out / "export.json"
    print("\n== 2. export the federated model: distil + prune + int8 (edgefed export --run)")
    t0 = time.perf_counter()
    err = io.StringIO()
    with _quiet(), contextlib.redirect_stderr(err):
        rc, text = _cli(
            "export", "--run", str(fleet.state), "-o", str(bundle), "--key", str(key),
            "--json", str(table), "--threads", "1", "--budget", str(args.budget),
            "--seed", str(args.seed), "--model-version", f"r{args.rounds}-edge",
        )  # fmt: skip
    timings["export"] = time.perf_counter() - t0
    if rc:
        print(text + err.getvalue(), file=sys.stderr)
        return rc
    print(_indent(text), end="", flush=True)

    print("== 3. sign (done by the export with the ephemeral key) and verify")
    t0 = time.perf_counter()
    rc, text = _cli("bundle", "verify", str(bundle), "--key", f"{key}.pub")
    timings["sign+verify"] = time.perf_counter() - t0
    print(_indent(text), end="", flush=True)
    if rc:
        return rc

    print(f"== 4. canary on {', '.join(fleet.canaries)}, then promote (edgefed bundle publish)")
    t0 = time.perf_counter()
    rc, text = _cli(
        "bundle", "publish", str(bundle), "--broker", fleet.url, "--fleet", fleet.fleet,
        "--key", f"{key}.pub", "--group", "canary", "--promote", "--wait", *fleet.canaries,
        "--accuracy-budget", str(args.budget), "--timeout", "60",
    )  # fmt: skip
    timings["canary+promote"] = time.perf_counter() - t0
    print(_indent(text), end="", flush=True)
    promoted = rc == 0

    device = next((d for d in fleet.ids if d not in fleet.canaries), fleet.ids[-1])
    print(f"== 5. predict on {device} (edgefed-agent predict)")
    t0 = time.perf_counter()
    version = _wait_deployed(fleet, device, bundle) if promoted else None
    xh, yh = fleet.holdout[device]
    if len(xh) == 0:
        xh, yh = fleet.test
    sample, logits = out / "predict-input.npz", out / "predict-logits.npy"
    np.savez(sample, x=xh)
    from device_agent.cli import main as agent_main

    buf = io.StringIO()
    argv = ["predict", "--state-dir", str(fleet.state / device), "--input", str(sample)]
    with contextlib.redirect_stdout(buf):
        rc = agent_main([*argv, "--output", str(logits)])
    timings["predict"] = time.perf_counter() - t0
    if rc:
        return rc
    acc = float((np.load(logits).argmax(1) == yh).mean())
    runs = version or "the federated model (no bundle promoted)"
    print(f"    edgefed-agent {' '.join(argv)}\n    {device} runs {runs}: "
          f"{100 * acc:.1f}% on its {len(yh)} held-out samples")  # fmt: skip
    _summary(json.loads(table.read_text()), bundle)
    return 0 if promoted else 1


def _wait_deployed(fleet: _Fleet, device: str, bundle: Path, timeout: float = 30) -> str | None:
    """The promoted bundle's version once ``device`` runs it (the promotion is asynchronous)."""
    from edgefed.bundle import inspect_bundle
    from edgefed.bundle.unpack import current

    version = inspect_bundle(bundle).model_version
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        c = current(fleet.state / device / "bundles")
        if c is not None and c.manifest.model_version == version:
            return version
        time.sleep(0.1)
    return None


def _summary(table: dict[str, Any], bundle: Path) -> None:
    """The fp32 federated model vs the shipped bundle: size, accuracy, batch-1 latency."""
    stages = table["stages"]
    fp32 = stages[0]
    chosen = next((s for s in stages if s["name"] == table.get("chosen")), stages[-1])
    rows = [("federated fp32 ONNX", fp32), (f"bundle: {chosen['name']}", chosen)]
    print(f"\n{'model':<44} {'bytes':>9} {'accuracy':>9} {'ms (b1)':>8}")
    for name, s in rows:
        print(f"{name:<44} {s['bytes']:>9,} {100 * s['accuracy']:>8.1f}% {s['ms_b1']:>8.3f}")
    print(
        f"bundle file {bundle} ({bundle.stat().st_size:,} bytes on disk: model, manifest, "
        f"signature): "
        f"{fp32['bytes'] / chosen['bytes']:.1f}x smaller model, "
        f"{fp32['ms_b1'] / chosen['ms_b1']:.2f}x the fp32 speed at batch 1, "
        f"{100 * (chosen['accuracy'] - fp32['accuracy']):+.1f} pp accuracy"
    )
