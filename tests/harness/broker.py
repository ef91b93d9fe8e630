"""mosquitto on loopback, plain or secured by ``edgefed broker-config`` (issue 7).

A test that needs mosquitto FAILS when it is missing (never skips): CI installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.net import free_port, wait_for_port


@dataclass
class Mosquitto:
    """A running mosquitto on loopback with its own config; restartable for fault tests."""

    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError(
                "mosquitto is not installed: run tools/test.sh (apt-get install mosquitto)"
            )
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=err
            )
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None


def write_mosquitto_config(directory: Path, port: int, extra: str = "") -> Path:
    """A minimal loopback config. The queue limits are raised because mosquitto's
    default max_queued_messages (1000) silently drops QoS 1 messages."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 0\n"
        "message_size_limit 0\n"
        f"log_dest file {directory / 'mosquitto.log'}\n"
        "log_type error\nlog_type warning\n" + extra
    )
    return conf


@dataclass
class SecuredMosquitto:
    """A real mosquitto running the config written by ``edgefed broker-config`` (issue 7)."""

    broker: Mosquitto
    tls_port: int
    plain_port: int
    written: object  # edgefed.fleetops.broker_config.Written: passwords, CA path, client certs
    spec: object  # edgefed.fleetops.broker_config.FleetSpec


def start_secured_mosquitto(directory: Path, **spec_changes: object) -> SecuredMosquitto:
    """Generate a fleet's secured config in ``directory`` and start mosquitto on it.

    Default fleet "farm": devices dev-0..dev-3, account "coordinator", observer "dash"; a TLS
    listener (certificate for 127.0.0.1 and localhost) and an authenticated plain listener
    on loopback. As root, mosquitto runs as root (it would drop to user mosquitto otherwise).
    """
    from edgefed.fleetops.broker_config import Device, FleetSpec, write_broker_config

    tls_port, plain_port = free_port(), free_port()
    fields: dict[str, object] = {
        "fleet": "farm",
        "devices": tuple(Device(f"dev-{i}") for i in range(4)),
        "observers": ("dash",),
        "hosts": ("127.0.0.1", "localhost"),
        "bind": "127.0.0.1",
        "tls_port": tls_port,
        "plain_port": plain_port,
        "broker_user": "root" if os.geteuid() == 0 else None,
        "persistence": False,
    }
    fields.update(spec_changes)
    spec = FleetSpec(**fields)  # type: ignore[arg-type]
    written = write_broker_config(spec, directory)
    broker = Mosquitto(tls_port, written.config, directory / "mosquitto.stderr")
    try:
        broker.start()
        wait_for_port(plain_port)
    except BaseException:
        if broker.proc is not None:
            broker.stop(kill=True)
        raise
    return SecuredMosquitto(broker, tls_port, plain_port, written, spec)
