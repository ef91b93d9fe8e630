"""Write a secured mosquitto set-up for one fleet: TLS, per-account passwords, ACLs.

Output directory layout (re-running keeps the CA and existing accounts' passwords, so devices
already deployed keep working; the server certificate is re-issued for the current hosts)::

    mosquitto.conf         broker config (absolute paths to the files below)
    passwd                 mosquitto password file ($7$ PBKDF2-SHA512)          0600
    acl                    per-account topic rights (edgefed.fleetops.acl)
    certs/ca.crt, ca.key   fleet CA (move ca.key offline after set-up)           key 0600
    certs/server.crt/.key  broker certificate for ``hosts``                       key 0600
    certs/clients/<id>.*   client certificates (with ``client_certs``)           key 0600
    accounts/<name>.toml   a ready ``[transport]`` table per account (password)  0600
    fleet.json             inventory: fleet, topics prefix, devices and groups (no secrets)

Decisions: every listener requires a password (``allow_anonymous false``, global settings, so
the optional plain loopback listener for tests is authenticated too); ``use_username_as_clientid``
stops a device from taking over another device's session by choosing its client id; queue
limits are raised because mosquitto's default of 1000 queued QoS 1 messages drops silently;
packets are capped at 16 MiB (the runtime chunks larger payloads).
"""

from __future__ import annotations

import json
import os
import pwd
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefed.fleetops import certs
from edgefed.fleetops.acl import render_acl
from edgefed.fleetops.passwords import new_password, password_file
from edgefed.transport.topics import Topics, check_name


class FleetConfigError(ValueError):
    """The fleet description is invalid; the message names the key or device."""


@dataclass(frozen=True)
class Device:
    id: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetSpec:
    """What the broker must know about a fleet (loaded from TOML or built from CLI flags)."""

    fleet: str = "default"
    prefix: str = "edgefed"
    devices: tuple[Device, ...] = ()
    coordinators: tuple[str, ...] = ("coordinator",)
    observers: tuple[str, ...] = ()
    aggregators: tuple[str, ...] = ()  # sharded-aggregation worker accounts (one per worker)
    publishers: tuple[str, ...] = ("publisher",)  # `edgefed bundle publish`: roll-out topics only
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    bind: str = "0.0.0.0"
    tls_port: int = 8883
    plain_port: int | None = None  # plain listener on 127.0.0.1 only (tests, local tools)
    client_certs: bool = False
    require_client_cert: bool = False
    broker_user: str | None = "mosquitto"
    persistence: bool = True
    max_queued_messages: int = 100_000
    # Largest MQTT packet the broker accepts (0 = the MQTT maximum, 256 MiB). The runtime
    # chunks payloads (transport chunk_size, 256 KiB by default), so no honest packet comes near
    # 16 MiB, while a hostile client can no longer make the broker buffer 256 MiB per message.
    max_packet_size: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        try:
            Topics(self.fleet, self.prefix)
            names = [d.id for d in self.devices] + list(self.coordinators) + list(self.observers)
            names += list(self.aggregators) + list(self.publishers)
            for n in names:
                check_name("account name", n)
            for d in self.devices:
                for g in d.groups:
                    check_name(f"group of device {d.id}", g)
        except ValueError as e:
            raise FleetConfigError(str(e)) from None
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FleetConfigError(f"account names must be unique, repeated: {dup}")
        if not self.coordinators:
            raise FleetConfigError("a fleet needs at least one coordinator account")
        if not self.hosts:
            raise FleetConfigError("hosts: list the names/IPs devices use to reach the broker")
        for name, port in (("tls_port", self.tls_port), ("plain_port", self.plain_port)):
            if port is not None and not 1 <= port <= 65535:
                raise FleetConfigError(f"{name} must be 1..65535, got {port}")
        if self.require_client_cert and not self.client_certs:
            raise FleetConfigError("require_client_cert needs client_certs = true")
        if self.max_queued_messages < 1 or self.max_packet_size < 0:
            raise FleetConfigError("max_queued_messages must be >= 1, max_packet_size >= 0")

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet, self.prefix)


_KEYS = {
    "fleet": str,
    "prefix": str,
    "devices": list,
    "coordinators": list,
    "observers": list,
    "aggregators": list,
    "publishers": list,
    "hosts": list,
    "bind": str,
    "tls_port": int,
    "plain_port": int,
    "client_certs": bool,
    "require_client_cert": bool,
    "broker_user": str,
    "persistence": bool,
    "max_queued_messages": int,
    "max_packet_size": int,
}


def spec_from_dict(doc: dict[str, Any]) -> FleetSpec:
    """Validate a parsed TOML document (unknown keys are errors: a typo must not pass)."""
    unknown = set(doc) - set(_KEYS)
    if unknown:
        raise FleetConfigError(f"unknown fleet config keys: {sorted(unknown)}")
    kw: dict[str, Any] = {}
    for key, value in doc.items():
        want = _KEYS[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise FleetConfigError(f"{key} must be {want.__name__}, got {type(value).__name__}")
        kw[key] = value
    devices = []
    for i, d in enumerate(kw.pop("devices", [])):
        if isinstance(d, str):
            d = {"id": d}
        if not isinstance(d, dict) or set(d) - {"id", "groups"} or "id" not in d:
            raise FleetConfigError(f"devices[{i}] must be a table with id and optional groups")
        groups = d.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise FleetConfigError(f"devices[{i}].groups must be a list of strings")
        devices.append(Device(str(d["id"]), tuple(groups)))
    for key in ("coordinators", "observers", "aggregators", "publishers", "hosts"):
        if key in kw:
            if not all(isinstance(x, str) for x in kw[key]):
                raise FleetConfigError(f"{key} must be a list of strings")
            kw[key] = tuple(kw[key])
    return FleetSpec(devices=tuple(devices), **kw)


def load_fleet_toml(path: Path) -> FleetSpec:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FleetConfigError(f"cannot read fleet config {path}: {e}") from None
    return spec_from_dict(doc)


@dataclass(frozen=True)
class Written:
    """Where everything went, and the plaintext credentials (for tests and the caller)."""

    directory: Path
    config: Path
    ca_cert: Path
    passwords: dict[str, str]
    client_certs: dict[str, tuple[Path, Path]]


def render_mosquitto_conf(spec: FleetSpec, d: Path) -> str:
    """The mosquitto.conf text; every path absolute (mosquitto resolves relative to its cwd)."""
    c = d / "certs"
    lines = ["# edgefed broker config for fleet " + repr(spec.fleet) + " (generated)"]
    if spec.broker_user:
        lines.append(f"user {spec.broker_user}")
    lines += [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
        f"max_queued_messages {spec.max_queued_messages}",
        "max_inflight_messages 0",
    ]
    if spec.max_packet_size:
        lines.append(f"max_packet_size {spec.max_packet_size}")
    if spec.persistence:
        lines += ["persistence true", f"persistence_location {d / 'data'}/"]
    else:
        lines.append("persistence false")
    lines += [
        f"log_dest file {d / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
        f"listener {spec.tls_port} {spec.bind}",
        f"cafile {c / 'ca.crt'}",
        f"certfile {c / 'server.crt'}",
        f"keyfile {c / 'server.key'}",
        f"require_certificate {'true' if spec.require_client_cert else 'false'}",
        "use_username_as_clientid true",
    ]
    if spec.plain_port is not None:
        lines += ["", f"listener {spec.plain_port} 127.0.0.1", "use_username_as_clientid true"]
    return "\n".join(lines) + "\n"


def _existing_password(path: Path) -> str | None:
    """Keep a deployed account's password across re-runs (read back from its account file)."""
    try:
        doc = tomllib.loads(path.read_text())
        pw = doc["transport"]["password"]
        return pw if isinstance(pw, str) and pw else None
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def account_toml(
    spec: FleetSpec, user: str, password: str, ca: Path, cert: tuple[Path, Path] | None
) -> str:
    """A ``[transport]`` table for ``edgefed.transport.config.TransportConfig``."""
    host = spec.hosts[0]
    lines = [
        "[transport]",
        f"url = {_toml_str(f'mqtts://{host}:{spec.tls_port}')}",
        f"fleet = {_toml_str(spec.fleet)}",
        f"topic_prefix = {_toml_str(spec.prefix)}",
        f"username = {_toml_str(user)}",
        f"password = {_toml_str(password)}",
        f"ca_file = {_toml_str(str(ca))}",
    ]
    if cert is not None:
        lines += [f"cert_file = {_toml_str(str(cert[0]))}", f"key_file = {_toml_str(str(cert[1]))}"]
    return "\n".join(lines) + "\n"


def _give_to_broker(paths: Sequence[Path], user: str | None) -> None:
    """Files the broker reads after dropping privileges must belong to its user.

    Only possible (and only needed) when we run as root; otherwise the operator must make
    them readable, which run() reports.
    """
    if user is None or os.geteuid() != 0 or user == "root":
        return
    try:
        ent = pwd.getpwnam(user)
    except KeyError:
        return
    for p in paths:
        os.chown(p, ent.pw_uid, ent.pw_gid)


def write_broker_config(spec: FleetSpec, out: Path) -> Written:
    """Generate (or refresh) everything for ``spec`` under ``out``; see the module docstring."""
    d = Path(out).resolve()
    c = d / "certs"
    acc_dir = d / "accounts"
    for sub in (d, c, acc_dir):
        sub.mkdir(parents=True, exist_ok=True)
    if spec.persistence:
        (d / "data").mkdir(exist_ok=True)

    if (c / "ca.crt").exists() and (c / "ca.key").exists():
        ca = certs.load_ca(c / "ca.crt", c / "ca.key")
    else:
        ca = certs.make_ca(f"edgefed {spec.fleet} CA")
        ca.write(c / "ca.crt", c / "ca.key")
    certs.make_server_cert(ca, list(spec.hosts)).write(c / "server.crt", c / "server.key")

    accounts = [
        *spec.coordinators, *spec.observers, *spec.aggregators, *spec.publishers,
        *(dev.id for dev in spec.devices),
    ]  # fmt: skip
    passwords: dict[str, str] = {}
    client_certs: dict[str, tuple[Path, Path]] = {}
    for user in accounts:
        acc_file = acc_dir / f"{user}.toml"
        passwords[user] = _existing_password(acc_file) or new_password()
        cert = None
        if spec.client_certs:
            cert = (c / "clients" / f"{user}.crt", c / "clients" / f"{user}.key")
            certs.make_client_cert(ca, user).write(*cert)
            client_certs[user] = cert
        text = account_toml(spec, user, passwords[user], c / "ca.crt", cert)
        certs.write_private(acc_file, text.encode())

    certs.write_private(d / "passwd", password_file(passwords).encode())
    acl = render_acl(
        spec.topics, [x.id for x in spec.devices], spec.coordinators, spec.observers,
        groups={x.id: x.groups for x in spec.devices}, aggregators=spec.aggregators,
        publishers=spec.publishers,
    )  # fmt: skip
    (d / "acl").write_text(acl)
    (d / "fleet.json").write_text(
        json.dumps(
            {
                "fleet": spec.fleet,
                "prefix": spec.prefix,
                "coordinators": list(spec.coordinators),
                "observers": list(spec.observers),
                "aggregators": list(spec.aggregators),
                "publishers": list(spec.publishers),
                "devices": [{"id": x.id, "groups": list(x.groups)} for x in spec.devices],
            },
            indent=2,
        )
        + "\n"
    )
    conf = d / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(spec, d))
    log_file = d / "mosquitto.log"  # opened after mosquitto drops privileges
    log_file.touch(mode=0o640, exist_ok=True)
    broker_files = [d / "passwd", c / "server.key", log_file]
    if spec.persistence:
        broker_files.append(d / "data")
    _give_to_broker(broker_files, spec.broker_user)
    return Written(d, conf, c / "ca.crt", passwords, client_certs)
