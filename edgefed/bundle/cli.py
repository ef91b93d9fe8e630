"""``edgefed bundle inspect|verify|sign|publish``. Exit code 0 ok, 1 refused (reason on stderr)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgefed.atomic import atomic_write
from edgefed.bundle.builder import sign_bundle
from edgefed.bundle.format import DEFAULT_LIMITS, BundleError, Manifest
from edgefed.bundle.signing import load_signing_key
from edgefed.bundle.unpack import inspect_bundle, read_bundle_file, verify_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="show the manifest (signature NOT checked)")
    p.add_argument("file", help="the bundle (.efb)")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p = sub.add_parser("verify", help="check signature and every member hash")
    p.add_argument("file", help="the bundle (.efb)")
    p.add_argument("--key", required=True, help="public key file (.pub) or its hex text")
    p = sub.add_parser("sign", help="sign (or re-sign) a bundle")
    p.add_argument("file", help="the bundle (.efb)")
    p.add_argument("--key", required=True, help="private key file")
    p.add_argument("-o", "--output", help="write here instead of replacing FILE")
    p = sub.add_parser(
        "publish",
        help="roll a signed bundle out to a fleet group over MQTT (canary: --promote)",
        description="Publish a signed bundle to a device group. With --promote the group is a "
        "canary: its devices evaluate the bundle and their current model on their own held-out "
        "data; the bundle then goes to the whole fleet, or the canaries are rolled back.",
    )
    p.add_argument("file", help="the signed bundle (.efb)")
    p.add_argument(
        "--config",
        help="TOML with a [transport] table (broker URL, fleet, CA, username/password, client "
        "cert), e.g. accounts/publisher.toml written by `edgefed broker-config`",
    )
    p.add_argument("--broker", help="mqtt://host:port or mqtts://... (overrides --config)")
    p.add_argument("--fleet", help="fleet name (overrides --config; default 'default')")
    p.add_argument("--group", default="all", help="device group (default: all)")
    p.add_argument("--key", help="public key: refuse to publish a bundle it does not verify")
    p.add_argument("--wait", nargs="*", default=[], metavar="DEVICE",
                   help="wait for these devices' reports and print them")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the devices' reports (default 120)")  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the broker connection (default 10)")  # fmt: skip
    p.add_argument("--promote", action="store_true",
                   help="--group is a canary group (--wait lists its devices): promote the bundle "
                   "to the fleet if they accept it, else roll them back")  # fmt: skip
    p.add_argument("--accuracy-budget", type=float, default=1.0, metavar="PP",
                   help="largest accepted drop of the canaries' sample-weighted accuracy below "
                   "the current model's, in percentage points (default 1.0)")  # fmt: skip
    p.add_argument("--latency-budget", type=float, default=1.5, metavar="RATIO",
                   help="largest accepted median batch-1 latency relative to the current "
                   "model's (default 1.5)")  # fmt: skip


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


class PublishError(Exception):
    """A roll-out that cannot start: the message is the one line the user sees."""


def _transport(args: argparse.Namespace) -> Any:
    """``[transport]`` from ``--config`` (the table every other edgefed service reads), with
    ``--broker`` / ``--fleet`` overriding it."""
    import tomllib

    from edgefed.transport import TransportConfig

    table: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PublishError(f"--config {args.config}: {e}") from None
        table = doc.get("transport")
        if not isinstance(table, dict):
            raise PublishError(f"--config {args.config}: no [transport] table")
        table = dict(table)
    if args.broker:
        table["url"] = args.broker
    if args.fleet:
        table["fleet"] = args.fleet
    if "url" not in table:
        raise PublishError("no broker: give --config (with [transport] url) or --broker")
    try:
        return TransportConfig.from_dict(table)
    except (ValueError, TypeError) as e:
        where = f"--config {args.config} [transport]" if args.config else "--broker"
        raise PublishError(f"{where}: {e}") from None


def _connect(t: Any, client_id: str, subscriptions: list[str], timeout: float) -> Any:
    """Connect or raise PublishError naming the broker and the last cause seen (TLS, refused
    credentials, unreachable); the client's own log lines are held back meanwhile."""
    from edgefed.transport.client import MqttClient

    causes: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            causes.append(record.getMessage())

    clog = logging.getLogger("edgefed.transport.client")
    keep, propagate, level = _Keep(), clog.propagate, clog.level
    clog.addHandler(keep)
    clog.propagate = False
    clog.setLevel(logging.INFO)
    try:
        client = MqttClient(t, client_id, subscriptions=subscriptions)
        try:
            client.start(timeout=timeout)
        except TimeoutError:
            raise PublishError(
                f"cannot connect to {t.url} within {timeout:g}s: {_cause(causes)}"
            ) from None
    finally:
        clog.removeHandler(keep)
        clog.propagate = propagate
        clog.setLevel(level)
    return client


def _cause(messages: list[str]) -> str:
    """The most telling of the client's connection messages, as a hint the user can act on."""
    refused = [m for m in messages if "refused connection" in m]
    if refused:
        why = refused[-1].split("refused connection:", 1)[1].strip()
        return f"the broker refused the credentials ({why}): check username/password"
    failed = [m for m in messages if "connect failed" in m]
    if not failed:
        return "no answer from the broker (wrong port, or a TLS listener spoken to in plain?)"
    err = failed[-1].split("connect failed (", 1)[1].rsplit("); retry", 1)[0]
    if "CERTIFICATE_VERIFY_FAILED" in err or "unknown ca" in err.lower():
        return f"TLS: the broker's certificate is not trusted by the CA given ({err})"
    if "refused" in err.lower() or "unreachable" in err.lower() or "Name or service" in err:
        return f"broker unreachable ({err})"
    return err


def _publish(args: argparse.Namespace) -> int:
    """Exit 0 when every ``--wait`` device installed it (and, with ``--promote``, the canary
    passed and the fleet got it), 1 otherwise, 2 when the roll-out could not start."""
    try:
        return _publish_checked(args)
    except PublishError as e:
        print(f"edgefed bundle publish: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as e:  # the connection broke while publishing
        print(f"edgefed bundle publish: {args.file}: roll-out interrupted: {e}", file=sys.stderr)
        return 2


def _publish_checked(args: argparse.Namespace) -> int:
    from edgefed.bundle.rollout import (
        ALL,
        all_status_topic,
        collect_reports,
        decide,
        publish_bundle,
        publish_rollback,
    )
    from edgefed.transport import Topics

    data = read_bundle_file(args.file, DEFAULT_LIMITS)
    if args.key:
        verify_bundle(args.file, args.key)
    if args.promote and (args.group == ALL or not args.wait):
        raise PublishError("--promote needs a canary --group (not 'all') and its devices in --wait")
    # A roll-out is one-shot: no broker session kept for it (MQTT 5; 3.1.1 keeps one, whose
    # queued reports collect_reports filters out by version and mode).
    t = dataclasses.replace(_transport(args), session_expiry=0)
    topics = Topics(t.fleet, t.topic_prefix)
    client_id = f"edgefed-publisher-{t.fleet}-{os.getpid()}"
    client = _connect(t, client_id, [all_status_topic(topics)], args.connect_timeout)
    version = inspect_bundle(args.file).model_version
    wait = set(args.wait)
    try:
        mode = "canary" if args.promote else "install"
        publish_bundle(client, topics, data, args.group, mode=mode)
        print(f"published {args.file} ({version}) to group {args.group!r} of fleet {t.fleet!r}")
        reps = collect_reports(client, topics, wait, args.timeout, version, mode) if wait else {}
        _print_reports(args.wait, reps)
        if not args.promote:
            return 0 if all(reps.get(d) and reps[d].status == "installed" for d in wait) else 1
        d = decide(reps, wait, version, args.accuracy_budget, args.latency_budget)
        if d.promote:
            publish_bundle(client, topics, data, ALL)
            print(f"PROMOTED {version} to fleet {t.fleet!r}: {d.reason}")
            return 0
        publish_rollback(client, topics, version, args.group)
        print(f"ROLLED BACK {version} on group {args.group!r}: {d.reason}")
        back_from = {r for r in wait if r in reps}
        back = collect_reports(client, topics, back_from, args.timeout, version, "rollback")
        _print_reports(sorted(back), back)
        return 1
    finally:
        client.stop()


def _print_reports(devices: list[str], reps: dict[str, Any]) -> None:
    for dev in devices:
        r = reps.get(dev)
        print(
            json.dumps(asdict(r), sort_keys=True)
            if r
            else f'{{"device": "{dev}", "status": "no report"}}'
        )
