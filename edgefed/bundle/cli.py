"""``edgefed bundle inspect|verify|sign|publish``. Exit code 0 ok, 1 refused (reason on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from edgefed.atomic import atomic_write
from edgefed.bundle.builder import sign_bundle
from edgefed.bundle.format import DEFAULT_LIMITS, BundleError, Manifest
from edgefed.bundle.signing import load_signing_key
from edgefed.bundle.unpack import inspect_bundle, read_bundle_file, verify_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="show the manifest (signature NOT checked)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p = sub.add_parser("verify", help="check signature and every member hash")
    p.add_argument("file")
    p.add_argument("--key", required=True, help="public key file (.pub) or its hex text")
    p = sub.add_parser("sign", help="sign (or re-sign) a bundle")
    p.add_argument("file")
    p.add_argument("--key", required=True, help="private key file")
    p.add_argument("-o", "--output", help="write here instead of replacing FILE")
    p = sub.add_parser("publish", help="roll a signed bundle out to a fleet group over MQTT")
    p.add_argument("file")
    p.add_argument("--broker", required=True, help="mqtt://host:port (or mqtts://)")
    p.add_argument("--fleet", default="default")
    p.add_argument("--group", default="all", help="device group (default: all)")
    p.add_argument("--key", help="public key: refuse to publish a bundle it does not verify")
    p.add_argument("--wait", nargs="*", default=[], metavar="DEVICE",
                   help="wait for these devices' reports and print them")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0)


def _summary(m: Manifest) -> str:
    lines = [
        f"model_version  {m.model_version}",
        f"format         {m.format_version}, opset {m.opset}, created {m.created}, {m.producer}",
    ]
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            lines.append(f"{kind:<14} {s.name} {s.dtype}{s.shape}")
    if m.labels:
        lines.append(f"labels         {', '.join(m.labels)}")
    if m.preprocessing:
        lines.append(f"preprocessing  {json.dumps(m.preprocessing, sort_keys=True)}")
    chosen = m.metrics.get("chosen")
    if chosen:
        lines.append(f"chosen stage   {chosen}")
    lines.append(f"train_step     {'yes' if m.train_step else 'no'}")
    for name, info in m.members.items():
        lines.append(f"member         {name:<18} {info.size:>10} B  sha256 {info.sha256[:16]}…")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "inspect":
            m = inspect_bundle(args.file)
            print(json.dumps(asdict(m), indent=1) if args.json else _summary(m))
            print("(signature not checked: use `edgefed bundle verify --key`)", file=sys.stderr)
        elif args.action == "verify":
            m = verify_bundle(args.file, args.key)
            print(f"OK: {args.file} model_version {m.model_version}, {len(m.members)} members")
        elif args.action == "publish":
            return _publish(args)
        else:
            signed = sign_bundle(
                read_bundle_file(args.file, DEFAULT_LIMITS), load_signing_key(args.key)
            )
            out = Path(args.output or args.file)
            atomic_write(out, signed, mode=0o644)
            print(f"signed: {out}")
    except BundleError as e:
        print(f"REFUSED: {args.file}: {e.reason}", file=sys.stderr)
        return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    """Exit 0 when every ``--wait`` device installed it, 1 otherwise (reports on stdout)."""
    from edgefed.bundle.rollout import all_status_topic, collect_reports, publish_bundle
    from edgefed.transport import Topics, TransportConfig
    from edgefed.transport.client import MqttClient

    data = read_bundle_file(args.file, DEFAULT_LIMITS)
    if args.key:
        verify_bundle(args.file, args.key)
    t = TransportConfig(url=args.broker, fleet=args.fleet)
    topics = Topics(t.fleet, t.topic_prefix)
    client = MqttClient(
        t, f"edgefed-bundle-{os.getpid()}", subscriptions=[all_status_topic(topics)]
    )
    client.start(timeout=30)
    try:
        publish_bundle(client, topics, data, args.group)
        print(f"published {args.file} to group {args.group!r} of fleet {args.fleet!r}")
        reps = collect_reports(client, topics, set(args.wait), args.timeout) if args.wait else {}
    finally:
        client.stop()
    for dev in args.wait:
        r = reps.get(dev)
        print(
            json.dumps(asdict(r), sort_keys=True)
            if r
            else f'{{"device": "{dev}", "status": "no report"}}'
        )
    return 0 if all(reps.get(d) and reps[d].status == "installed" for d in args.wait) else 1
