"""``edgefed broker-config``: write a secured mosquitto set-up for a fleet.

Examples::

    edgefed broker-config --fleet-file fleet.toml --out /etc/edgefed/broker
    edgefed broker-config --out ./broker --fleet farm --device pi-01 --device pi-02 \\
        --host broker.lan --host 192.168.1.10
    mosquitto -c ./broker/mosquitto.conf
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgefed.fleetops.broker_config import (
    Device,
    FleetConfigError,
    FleetSpec,
    load_fleet_toml,
    write_broker_config,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--fleet-file", type=Path, help="TOML fleet description (devices, groups...)")
    p.add_argument("--fleet", help="fleet name (overrides the file)")
    p.add_argument("--prefix", help="topic prefix (default edgefed)")
    p.add_argument("--device", action="append", default=[], help="device id (repeatable)")
    p.add_argument("--devices", type=int, default=0, help="add N devices named <device-prefix>N")
    p.add_argument("--device-prefix", default="dev-", help="name prefix for --devices")
    p.add_argument("--coordinator", action="append", default=[], help="coordinator account")
    p.add_argument("--observer", action="append", default=[], help="read-only metrics account")
    p.add_argument(
        "--publisher", action="append", default=[], help="roll-out account (default: publisher)"
    )
    p.add_argument("--host", action="append", default=[], help="broker host name/IP (repeat)")
    p.add_argument("--bind", help="TLS listener address (default 0.0.0.0)")
    p.add_argument("--tls-port", type=int, help="TLS listener port (default 8883)")
    p.add_argument("--plain-port", type=int, help="also listen without TLS on 127.0.0.1:PORT")
    p.add_argument("--client-certs", action="store_true", help="issue client certificates")
    p.add_argument("--require-client-cert", action="store_true", help="mutual TLS only")
    p.add_argument("--broker-user", help="user mosquitto runs as (default mosquitto)")
    p.add_argument("--no-persistence", action="store_true", help="no broker session storage")
    p.add_argument(
        "--max-packet-size", type=int, help="largest MQTT packet in bytes (default 16 MiB)"
    )


def spec_from_args(args: argparse.Namespace) -> FleetSpec:
    spec = load_fleet_toml(args.fleet_file) if args.fleet_file else FleetSpec()
    devices = list(spec.devices)
    devices += [Device(d) for d in args.device]
    devices += [Device(f"{args.device_prefix}{i}") for i in range(args.devices)]
    changes: dict[str, object] = {"devices": tuple(devices)}
    for flag, key in (
        ("fleet", "fleet"),
        ("prefix", "prefix"),
        ("bind", "bind"),
        ("tls_port", "tls_port"),
        ("plain_port", "plain_port"),
        ("broker_user", "broker_user"),
        ("max_packet_size", "max_packet_size"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = value
    for flag, key in (
        ("coordinator", "coordinators"),
        ("observer", "observers"),
        ("publisher", "publishers"),
        ("host", "hosts"),
    ):
        if getattr(args, flag):
            changes[key] = tuple(getattr(args, flag))
    if args.client_certs:
        changes["client_certs"] = True
    if args.require_client_cert:
        changes["require_client_cert"] = True
    if args.no_persistence:
        changes["persistence"] = False
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        if not spec.devices:
            raise FleetConfigError("no devices: give --fleet-file, --device or --devices")
        written = write_broker_config(spec, args.out)
    except (FleetConfigError, ValueError, OSError) as e:
        print(f"edgefed broker-config: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written.config}")
    print(f"  {len(spec.devices)} devices, coordinators {list(spec.coordinators)}")
    if spec.publishers:
        print(f"  roll-out accounts (bundle topics only) {list(spec.publishers)}")
    print(f"  CA for devices: {written.ca_cert}")
    print(f"  per-account [transport] tables (secret, 0600): {written.directory / 'accounts'}")
    print(f"  keep {written.directory / 'certs' / 'ca.key'} offline once set up")
    if spec.broker_user and spec.broker_user != "root":
        print(
            f"  mosquitto drops to user {spec.broker_user!r}: it must be able to read passwd and "
            "certs/server.key and write data/ (chowned automatically when run as root)"
        )
    print(f"start: mosquitto -c {written.config}")
    return 0
