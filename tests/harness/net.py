"""Loopback ports for the brokers and services the tests start."""

from __future__ import annotations

import socket

from harness.wait import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: port_open(port), timeout, f"something listening on 127.0.0.1:{port}")
