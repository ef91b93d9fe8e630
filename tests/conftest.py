"""Shared fixtures: real brokers started by the tests themselves.

A test that needs mosquitto FAILS when it is missing (never skips): CI installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


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


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    port = free_port()
    broker = Mosquitto(
        port, write_mosquitto_config(tmp_path / "mosquitto", port), tmp_path / "mosquitto.stderr"
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
