"""Every shared fixture of the suite (registered by tests/conftest.py; names are stable:
tests on other branches use them). The machinery lives in the other harness modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.broker import (
    Mosquitto,
    SecuredMosquitto,
    start_secured_mosquitto,
    write_mosquitto_config,
)
from harness.inproc import InProcFleet
from harness.models import build_model_dir
from harness.net import free_port
from harness.processes import Fleet
from harness.watch import Watcher

T = TypeVar("T")


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


@pytest.fixture
def embedded_broker() -> Iterator[object]:
    """edgefed's embedded amqtt broker (MQTT 3.1.1) on a free loopback port."""
    from edgefed.transport.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def secured_mosquitto(tmp_path: Path) -> Iterator[SecuredMosquitto]:
    """mosquitto with TLS, per-device passwords and ACLs from ``edgefed broker-config``."""
    sm = start_secured_mosquitto(tmp_path / "secured-broker")
    try:
        yield sm
    finally:
        sm.broker.stop()


class Made(list):
    """What a factory fixture made, each stopped at teardown by ``stop`` (even if the test
    failed half-way)."""

    def __init__(self, stop: Callable[[Any], object]) -> None:
        super().__init__()
        self.stop = stop

    def add(self, thing: T) -> T:
        self.append(thing)
        return thing

    def stop_all(self) -> None:
        for thing in self:
            self.stop(thing)


@pytest.fixture
def secured_mosquitto_factory(tmp_path: Path) -> Iterator[object]:
    """Start more secured brokers with other settings: ``factory(name, **spec_changes)``
    (``name``: a directory under tmp_path, or an absolute path)."""
    made = Made(lambda sm: sm.broker.stop())
    try:
        yield lambda name, **changes: made.add(start_secured_mosquitto(tmp_path / name, **changes))
    finally:
        made.stop_all()


@pytest.fixture(scope="session")
def fl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo 10-10-2 MLP exported once per session (FederatedModel.save layout:
    ``model/`` full graph, ``model-head/`` plus a head-only graph), so coordinator processes
    and test modules load it torch-free in milliseconds instead of exporting it again; plus
    a held-out set ``eval.npz`` and per-device data ``data-<i>.npz`` (synthetic: nothing
    downloads). See :mod:`harness.models`."""
    return build_model_dir(tmp_path_factory.mktemp("fl-model"))


@pytest.fixture
def fleet_factory(tmp_path: Path, fl_model_dir: Path) -> Iterator[object]:
    """``fleet_factory(url, n, **coordinator_keys)`` -> :class:`Fleet`; all processes are
    SIGKILLed at teardown."""
    made = Made(Fleet.stop_all)

    def factory(url: str, n: int, **coord: object) -> Fleet:
        return made.add(Fleet(tmp_path / f"fleet{len(made)}", fl_model_dir, url, n, **coord))

    try:
        yield factory
    finally:
        made.stop_all()


@pytest.fixture
def mqtt_watch() -> Iterator[object]:
    """``mqtt_watch(url, [topic filters])`` -> :class:`Watcher`, closed at teardown."""
    made = Made(Watcher.close)
    try:
        yield lambda url, topics: made.add(Watcher(url, topics))
    finally:
        made.stop_all()


@pytest.fixture
def inproc_fleet(tmp_path: Path, fl_model_dir: Path) -> Iterator[object]:
    """``inproc_fleet(url, ["dev-0", ...], rounds=2, **RoundConfig keys)`` -> InProcFleet;
    all threads stopped at teardown."""
    made = Made(InProcFleet.stop)

    def factory(url: str, devices: list[str], **cfg: object) -> InProcFleet:
        root = tmp_path / f"inproc{len(made)}"
        return made.add(InProcFleet(root, fl_model_dir, url, devices, **cfg))

    try:
        yield factory
    finally:
        made.stop_all()
